"""Benchmark helpers and the mock LLM upstream used by tests and benchmarks."""
