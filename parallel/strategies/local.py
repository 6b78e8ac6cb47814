"""The local strategy: a CP world of 1, every kind's single-device op (models/registry.py).

Serves any mixer kind; ``CPContext`` runs the kind's op directly whenever the world is one
rank, so this class only exists to be named (``parallel.cp.strategies.softmax=local``) and to
refuse a larger CP size."""

from __future__ import annotations

from parallel.strategies.base import LayerShape, Strategy, register


@register("local")
class Local(Strategy):
    kinds = ()  # any kind, on one rank

    def check(self, *, cp, **kw):
        super().check(cp=cp, **kw)
        if cp != 1:
            raise ValueError(
                f"strategy 'local' needs parallel.cp.size=1 (got {cp}): "
                "pick a context-parallel strategy such as allgather"
            )

    def __call__(self, q, k, v, ctx, **options):
        raise ValueError("strategy 'local' cannot run on a CP world of more than one rank")

    def forward_bytes(self, shape: LayerShape) -> int:
        return 0
