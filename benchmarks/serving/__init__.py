"""Serving processes end to end (one and two GPUs) and the KV transport between them."""
