"""Benchmarks: throughput (nano-vllm's bench.py workload) and latency, for any milestone."""
