"""Parallelism applied to plain models: device mesh, CP sharding, strategies, DP wrapping."""
