"""KV cache transport: the per-request KV payload and the channels that ship it prefill -> decode."""
