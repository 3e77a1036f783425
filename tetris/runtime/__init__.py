"""Ray actors executing validated plans, KV transfer, decode batching, the HTTP daemon."""
