"""The measuring harness: what benchmarks and evaluations share (caches under test, data, results, process memory)."""
