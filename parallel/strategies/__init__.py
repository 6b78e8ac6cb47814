"""Context-parallel strategies: one module each, all behind ``Strategy``.

A new strategy is a new file that subclasses Strategy and decorates itself with
``@register("name")``, plus its import below.
"""
from parallel.strategies.base import STRATEGIES, Strategy, build_strategy, register
from parallel.strategies import local, allgather  # noqa: F401  (registration)
from parallel.strategies import ring, ulysses, usp  # noqa: F401  (registration: softmax CP)
from parallel.strategies import lasp1, lasp2  # noqa: F401  (registration: linear-attention CP)

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "register"]
