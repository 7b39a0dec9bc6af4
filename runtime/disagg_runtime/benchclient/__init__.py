"""`disagg bench`: Poisson load from a workload's length distributions against an OpenAI-compatible server."""
