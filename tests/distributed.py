"""The multi-rank test harness lives in parallel.spawn (the benchmarks use it too)."""
from parallel.spawn import run_distributed

__all__ = ["run_distributed"]
