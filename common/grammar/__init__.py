"""Structured output: grammar backends (xgrammar, llguidance), per-request matcher state and the
token bitmask (docs/structured_output.md). Used by both workers; the gateway never imports it."""
