"""Benchmarks users decide by: ``bns-pipe bench`` (speed, memory, bytes) and its report."""
