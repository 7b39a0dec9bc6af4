"""Credentials of the runtime: user API keys at the router, the internal token between its processes."""
