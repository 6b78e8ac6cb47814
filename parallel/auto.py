"""``parallel.cp.strategies.<kind>=auto``: the cost model chooses the kind's strategy at start-up.

    resolve_auto(cfg, world_size, cluster)   # before validation; replaces each "auto" in place

For every mixer kind set to ``auto`` it costs each registered strategy of that kind (the
other kinds as configured, ``auto`` ones at their defaults meanwhile) at the run's own CP size,
layout, length, data parallelism, activation checkpointing and loss chunk, on ``cluster``
(``cluster_for_device``: the profile of this machine's accelerator), picks the fastest that
the shape allows (ties within 0.5% go to fewer seconds of communication), writes it into
``cfg.parallel.cp.strategies`` and returns the prediction to log. ``check_prediction`` gives
the warning when the measured step time leaves the prediction by more than 30%.
"""

from __future__ import annotations

import math
import os

from parallel.cost_model import Cluster, RunSpec, load_cluster, registered_strategies, step_cost

AUTO = "auto"
TOLERANCE = 0.30  # measured step time / predicted beyond which the trainer warns


def cluster_for_device(conf: str, device_name: str | None = None) -> Cluster:
    """The profile in ``conf``/cluster of the accelerator named ``device_name`` (e.g.
    torch.cuda.get_device_name()): h200, h100, h800, a100 by name fragment; cpu otherwise."""
    name = "cpu"
    for key in ("h200", "h100", "h800", "a100"):
        if device_name and key in device_name.lower():
            name = key
            break
    return load_cluster(os.path.join(conf, "cluster", f"{name}.yaml"))


def _spec(cfg, world: int, strategies: dict) -> RunSpec:
    p, t = cfg.parallel.cp, cfg.trainer
    return RunSpec(
        cfg.model,
        cfg.data.seq_len,
        cp=p.size,
        strategies=strategies,
        options={k: dict(v or {}) for k, v in p.options.items()},
        layout=p.layout,
        batch=cfg.data.micro_batch,
        dp=max(1, world // p.size),
        fsdp=cfg.parallel.dp_mode == "fsdp",
        activation_checkpointing=t.activation_checkpointing,
        loss_chunk=t.loss_chunk_tokens,
        dtype="bf16" if t.precision == "bf16" else "fp32",
    )


def resolve_auto(cfg, world_size: int, cluster: Cluster) -> dict:
    """Replace each ``auto`` in ``cfg.parallel.cp.strategies`` by the cost model's choice.
    Returns {kind: {strategy, step_s, tokens_per_s, mfu, memory_gib, fits, considered}} (empty
    when nothing is ``auto``). ValueError naming the setting when no strategy serves the shape."""
    from parallel.strategies import DEFAULTS

    names = dict(cfg.parallel.cp.strategies)
    autos = [k for k, v in names.items() if v == AUTO]
    if not autos:
        return {}
    fixed = {k: (DEFAULTS.get(k) if v == AUTO else v) for k, v in names.items()}
    fixed = {k: v for k, v in fixed.items() if v}
    out = {}
    for kind in autos:
        if kind not in cfg.model.kinds() or cfg.parallel.cp.size == 1:
            fixed[kind] = DEFAULTS[kind]  # no layer of this kind, or no CP: nothing to choose
            continue
        best = None
        considered = {}
        for name in registered_strategies(kind):
            try:
                cost = step_cost(cluster, _spec(cfg, world_size, {**fixed, kind: name}))
            except ValueError:
                continue  # the strategy refuses this shape (heads, layout, options)
            considered[name] = round(cost.step_s, 6)
            bucket = -round(math.log(cost.tokens_per_s) / math.log(1.005))
            key = (not cost.fits, bucket, cost.summary()["comm_s"])
            if best is None or key < best[0]:
                best = (key, name, cost)
        if best is None:
            raise ValueError(
                f"parallel.cp.strategies.{kind}=auto: no registered strategy serves this shape "
                f"(cp {cfg.parallel.cp.size}, heads {cfg.model.n_heads}, layout {cfg.parallel.cp.layout}): "
                "name a strategy or change parallel.cp.size"
            )
        _, name, cost = best
        fixed[kind] = name
        s = cost.summary()
        out[kind] = dict(
            strategy=name,
            step_s=s["step_s"],
            tokens_per_s=s["tokens_per_s"],
            mfu=s["mfu"],
            memory_gib=s["memory_gib"],
            fits=s["fits"],
            considered=considered,
            cluster=cluster.name,
        )
    cfg.parallel.cp.strategies = {k: fixed.get(k, v) for k, v in names.items()}
    return out


def check_prediction(predicted_s: float, measured_s: float) -> str | None:
    """A one-line warning when the measured step time (after warm-up) differs from the
    prediction by more than ``TOLERANCE``; None otherwise."""
    if predicted_s <= 0 or abs(measured_s / predicted_s - 1) <= TOLERANCE:
        return None
    return (
        f"measured step time {measured_s:.3g} s is {measured_s / predicted_s:.2f}x the cost model's "
        f"prediction {predicted_s:.3g} s (parallel.cp.strategies=auto chose from it): the cluster "
        "profile (conf/cluster) may not describe this machine; python -m bench.plan --calibrate checks it"
    )
