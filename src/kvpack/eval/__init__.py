"""Evaluation: streamed perplexity and agreement with the full-precision cache, passkey retrieval."""
