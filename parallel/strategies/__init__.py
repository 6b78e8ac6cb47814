"""Context-parallel strategies: one module each, one base per mixer kind (base.py).

A new strategy is a new file that subclasses its kind's base (``SoftmaxStrategy``,
``LinearStrategy``) and decorates itself with ``@register("name")``, plus its import below.
"""

from parallel.strategies import (  # noqa: F401
    allgather,
    cad,
    gather_keys,
    halo,
    lasp1,
    lasp2,
    local,
    mla_latent,
    ring,
    s2,
    ulysses,
    usp,
)
from parallel.strategies.base import (
    DEFAULTS,
    STRATEGIES,
    LayerShape,
    LinearStrategy,
    SoftmaxStrategy,
    Strategy,
    build_strategies,
    build_strategy,
    register,
    strategy_names,
)

__all__ = [
    "DEFAULTS",
    "STRATEGIES",
    "LayerShape",
    "LinearStrategy",
    "SoftmaxStrategy",
    "Strategy",
    "build_strategies",
    "build_strategy",
    "register",
    "strategy_names",
]
