"""OpenAI-compatible router: picks a prefill and a decode instance per request and relays tokens."""
