"""Benchmarks: the worker against the bare libraries, measured in the same run."""
