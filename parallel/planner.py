"""Rank the ways to train one model at one length on one cluster (parallel/cost_model.py).

For a world of ``world`` devices it enumerates, per mixer kind, every registered strategy
(USP at every Ulysses degree the heads and the node allow, CAD with and without ping-pong),
every CP size that divides the world (the rest is data parallelism), both layouts,
activation checkpointing on / off and the loss in full or in 4096-token chunks; configurations
a strategy refuses (heads, layout, divisibility) are left out. Ranked by predicted step time,
those that fit in memory first.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from models.config import ModelConfig
from parallel.cost_model import Cluster, RunSpec, StepCost, registered_strategies, step_cost

TIE = " (a tie within the model: the winner moves fewer bytes or holds less)"
LOSS_CHUNK = 4096  # tokens per lm_head -> loss chunk when the full logits do not fit


@dataclass
class Choice:
    spec: RunSpec
    cost: StepCost

    def label(self) -> str:
        parts = []
        for kind, name in sorted(self.spec.strategies.items()):
            opts = self.spec.options.get(kind) or {}
            extra = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
            parts.append(f"{kind}={name}" + (f"[{extra}]" if extra else ""))
        return " ".join(parts)

    def row(self) -> dict:
        s, c = self.spec, self.cost
        return dict(
            strategies=self.label(),
            cp=s.cp,
            dp=s.dp,
            layout=s.layout,
            ckpt=s.activation_checkpointing,
            loss_chunk=s.loss_chunk,
            step_s=round(c.step_s, 4),
            tokens_per_s=round(c.tokens_per_s),
            mfu=round(c.mfu, 3),
            mem_gib=round(c.memory_bytes / 2**30, 1),
            fits=c.fits,
        )


def _strategy_options(kind: str, name: str, cp: int, cfg: ModelConfig, cluster: Cluster) -> list[dict]:
    if name == "usp":  # Ulysses inside a node, ring across: every degree the heads allow
        g = math.gcd(cp, cfg.n_heads)
        return [{"ulysses_size": u} for u in range(2, min(g, cluster.gpus_per_node) + 1) if g % u == 0 and u < cp]
    if name == "cad":
        return [{"ping_pong": True}, {}]
    return [{}]


def candidates(cfg: ModelConfig, seq_len: int, world: int, cluster: Cluster, doc_lens=None, batch: int = 1):
    """Every RunSpec to cost (unchecked: ``plan`` drops those a strategy refuses)."""
    kinds = cfg.kinds()
    cps = [c for c in range(1, world + 1) if world % c == 0 and seq_len % (2 * c) == 0]
    for cp in cps:
        per_kind = []
        for kind in kinds:
            names = registered_strategies(kind) if cp > 1 else ["local"]
            per_kind.append(
                [
                    (kind, n, o)
                    for n in names
                    for o in (_strategy_options(kind, n, cp, cfg, cluster) if cp > 1 else [{}])
                ]
            )
        for combo in itertools.product(*per_kind):
            for layout in ("zigzag", "contiguous") if cp > 1 else ("zigzag",):
                for ckpt, chunk in itertools.product((False, True), (0, LOSS_CHUNK)):
                    yield RunSpec(
                        cfg,
                        seq_len,
                        cp=cp,
                        strategies={k: n for k, n, _ in combo},
                        options={k: o for k, _, o in combo},
                        layout=layout,
                        batch=batch,
                        doc_lens=tuple(doc_lens) if doc_lens else None,
                        dp=world // cp,
                        activation_checkpointing=ckpt,
                        loss_chunk=chunk,
                    )


def plan(cfg: ModelConfig, seq_len: int, world: int, cluster: Cluster, doc_lens=None, max_cp: int | None = None):
    """Choices ranked: fitting ones by tokens per second over the whole world (a CP group of
    cp ranks and dp such groups: step times of different cp are not comparable), then the rest
    by memory."""
    out = []
    for spec in candidates(cfg, seq_len, world, cluster, doc_lens):
        if max_cp is not None and spec.cp > max_cp:
            continue
        try:
            out.append(Choice(spec, step_cost(cluster, spec)))
        except ValueError:
            continue  # a strategy refuses this shape (heads, layout, divisibility)
    # tokens/s within 0.5% tie (below the model's resolution): fewer seconds of communication
    # (busy links), then less memory win
    out.sort(
        key=lambda c: (
            not c.cost.fits,
            -round(math.log(c.cost.tokens_per_s) / math.log(1.005)) if c.cost.fits else 0,
            c.cost.summary()["comm_s"],
            c.cost.memory_bytes,
        )
    )
    return out


def why(choices: list[Choice]) -> str:
    """One paragraph: why the first choice wins, against the best of every other strategy."""
    if not choices:
        return "no configuration: every strategy refused this shape"
    best = choices[0]
    if not best.cost.fits:
        return (
            f"nothing fits in {best.cost.memory_bytes / 2**30:.1f} GiB or less: the smallest needs "
            f"{best.cost.memory_bytes / 2**30:.1f} GiB per device ({best.cost.memory_parts}); use more devices"
        )
    s = best.cost.summary()
    lines = [
        f"{best.label()} at cp {best.spec.cp} x dp {best.spec.dp} ({best.spec.layout}) wins: "
        f"per step {s['gemm_s']:.3g} s GEMMs, {s['core_s']:.3g} s core attention, "
        f"{s['comm_s']:.3g} s of communication ({best.cost.layers[0].overlap} with the core op), "
        f"compute balance {max(c.balance for c in best.cost.layers):.2f}."
    ]
    seen = {best.label()}
    for c in choices[1:]:
        if c.label() in seen or not c.cost.fits:
            continue
        seen.add(c.label())
        o = c.cost.summary()
        lines.append(
            f"  best {c.label()} (cp {c.spec.cp}): {o['tokens_per_s'] / s['tokens_per_s']:.3f}x the tokens/s"
            f"{TIE if s['tokens_per_s'] < 1.005 * o['tokens_per_s'] else ''}: "
            f"core {o['core_s']:.3g} s (balance {max(x.balance for x in c.cost.layers):.2f}), "
            f"communication {o['comm_s']:.3g} s ({c.cost.layers[0].overlap})"
        )
    return "\n".join(lines)
