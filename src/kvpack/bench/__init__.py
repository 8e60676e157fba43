"""Benchmarks: memory tables, decode speed, peers side by side, reports."""
