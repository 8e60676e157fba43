"""Evaluation: streamed perplexity and agreement with the full-precision cache, passkey retrieval, RULER-style
long-context tasks."""
