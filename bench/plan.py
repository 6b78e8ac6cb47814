"""Plan a cluster run with the cost model (parallel/cost_model.py, parallel/planner.py).

    python -m bench.plan model=llama_1b data.seq_len=1048576 cluster=h100 nodes=8
    python -m bench.plan model=llama_1b data.seq_len=262144 cluster=a100 nodes=2 docs=prolong --top 20
    python -m bench.plan --reproduce         # published cluster results beside the predictions
    python -m bench.plan --calibrate         # bench.cp / bench.linear_cp on this machine beside the predictions

Settings: any Hydra override of the training config (``model=...``, ``model.n_layers=...``,
``data.seq_len=...``), plus ``cluster=<conf/cluster/NAME.yaml>`` (default h100), ``nodes=N``
(devices = nodes x the profile's GPUs per node) and ``docs=<mix>`` (document lengths drawn from
bench.cad_sim's mixes: prolong, lognormal, one_huge; default one document per row). Prints the
ranked configurations (per-kind strategy and options, CP size, DP, layout, activation
checkpointing, loss chunk) with predicted step time, tokens/s, MFU and memory per device, which
fit, and why the first wins; writes <out>/plan.png (step time against length per strategy).
"""

from __future__ import annotations

import argparse
import os

from bench.runner import print_table

DEFAULTS = {"cluster": "h100", "nodes": "1", "docs": ""}


def _split(settings: list[str]) -> tuple[dict, list[str]]:
    ours, hydra = dict(DEFAULTS), []
    for s in settings:
        key, sep, value = s.partition("=")
        if not sep:
            raise ValueError(f"setting {s!r} is not KEY=VALUE: write e.g. cluster=h100")
        (ours.__setitem__(key, value) if key in DEFAULTS else hydra.append(s))
    return ours, hydra


def compose(overrides: list[str]):
    """The TrainConfig the overrides give (the training run's own composition)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import conf_dir
    from trainer.train import to_config

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_config(hydra_compose(config_name="train", overrides=overrides))


def cluster_of(name: str):
    from parallel.cost_model import load_cluster
    from trainer.config import conf_dir

    path = os.path.join(conf_dir(), "cluster", f"{name}.yaml")
    if not os.path.exists(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir(), "cluster")))
        raise ValueError(f"cluster={name!r} has no profile: choose one of {names} (conf/cluster/)")
    return load_cluster(path)


def _docs(mix: str, n: int):
    if not mix:
        return None
    from bench.cad_sim import doc_lengths

    return doc_lengths(mix, n, seed=0)


def plot(cfg, world, cluster, seq_len, mix, path):
    """Step time against length, the best configuration of each strategy of the first kind."""
    from bench.runner import plot_axes
    from parallel.planner import plan

    kind = cfg.kinds()[0]
    lengths = [seq_len >> i for i in range(4, -1, -1) if (seq_len >> i) >= 2 * world]
    series: dict = {}
    for n in lengths:
        for c in plan(cfg, n, world, cluster, _docs(mix, n)):
            name = c.spec.strategies.get(kind, "local") if c.spec.cp > 1 else "local"
            if c.cost.fits and (name, n) not in series:
                series[(name, n)] = c.cost.step_s
    fig, axes = plot_axes(1)
    ax = axes[0][0]
    for name in sorted({k[0] for k in series}):
        pts = [(n, series[(name, n)]) for n in lengths if (name, n) in series]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("predicted step s (best fitting configuration)")
    ax.set_title(f"{cluster.name}, {world} devices, {kind} layers")
    ax.legend(fontsize=7)
    axes[1][0].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help="KEY=VALUE: Hydra overrides, cluster=, nodes=, docs=")
    p.add_argument("--reproduce", action="store_true", help="published results beside the predictions")
    p.add_argument("--calibrate", action="store_true", help="this machine's bench.cp / bench.linear_cp rows")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    from trainer.config import conf_dir

    os.makedirs(args.out, exist_ok=True)
    if args.reproduce:
        from bench.plan_reproduce import all_cases, table

        print(table(all_cases(conf_dir())))
        return
    if args.calibrate:
        from bench.plan_calibrate import TIME_FACTOR, order_agreement, run, time_ratios

        rows = run(conf_dir(), args.out)
        print_table(rows, list(rows[0]))
        spans = "; ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in sorted(time_ratios(rows).items()))
        print(
            f"bytes equal in {sum(r['bytes_equal'] for r in rows)}/{len(rows)} rows; strategy pairs "
            f"measured >1.25x apart ordered as measured: {order_agreement(rows, 1.25):.0%}; "
            f"predicted / measured time: {spans} (stated factor: {TIME_FACTOR})"
        )
        return
    from parallel.planner import plan, why

    ours, hydra = _split(args.settings)
    cfg = compose(hydra)
    cluster = cluster_of(ours["cluster"])
    world = int(ours["nodes"]) * cluster.gpus_per_node
    n = cfg.data.seq_len
    choices = plan(cfg.model, n, world, cluster, _docs(ours["docs"], n))
    print(
        f"{cluster.name} x {world} devices, {n} tokens per row, model layers {cfg.model.n_layers} x {cfg.model.kinds()}"
    )
    print_table([c.row() for c in choices[: args.top]], list(choices[0].row()) if choices else [])
    print(why(choices))
    path = os.path.join(args.out, "plan.png")
    plot(cfg.model, world, cluster, n, ours["docs"], path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
