"""Training step against Hugging Face: the longctx decoder and transformers' LlamaForCausalLM
(SDPA attention) with the same configuration, forward + backward of the next-token loss, one
process, fp32, interleaved repeats, medians.

    python -m bench.train_step                               # 4 layers, dim 512, seq 2048
    python -m bench.train_step --seq-lens 2048 4096 --threads 1 --repeats 5

Both models get the same weights (exported from ours with models.hf_io), so the loss is also
compared (``max_err`` of the loss). ``ratio`` = longctx / transformers (< 1: longctx faster).
Writes ``train_step.csv`` and ``train_step.png`` into --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.runner import plot_axes, write_outputs
from models import ModelConfig, Transformer
from models.hf_io import save_hf_checkpoint

COLUMNS = ["seq_len", "params_m", "longctx_ms", "hf_ms", "ratio", "longctx_tok_s", "hf_tok_s", "max_err"]


def _models(args):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads
    )
    ours = Transformer(cfg)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(ours, d, model_type="llama", max_position_embeddings=max(args.seq_lens))
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").float()
    return ours, hf


def _step_ours(model, ids, labels):
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.detach()


def _step_hf(model, ids, labels):
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    return loss.detach()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048])
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    ours, hf = _models(args)
    params = sum(x.numel() for x in ours.parameters()) / 1e6
    rows = []
    for n in args.seq_lens:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, args.vocab, (1, n), generator=g)
        labels = torch.randint(0, args.vocab, (1, n), generator=g)
        steps = {"longctx": (_step_ours, ours), "hf": (_step_hf, hf)}
        times, losses = {k: [] for k in steps}, {}
        for k, (fn, m) in steps.items():  # warm-up
            losses[k] = fn(m, ids, labels)
        for _ in range(args.repeats):  # interleaved
            for k, (fn, m) in steps.items():
                m.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                fn(m, ids, labels)
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append(
            dict(
                seq_len=n,
                params_m=round(params, 2),
                longctx_ms=round(ms["longctx"], 1),
                hf_ms=round(ms["hf"], 1),
                ratio=round(ms["longctx"] / ms["hf"], 3),
                longctx_tok_s=round(n / ms["longctx"] * 1e3),
                hf_tok_s=round(n / ms["hf"] * 1e3),
                max_err=float(f"{abs(float(losses['longctx'] - losses['hf'])):.3g}"),
            )
        )
    write_outputs(rows, args.out, "train_step", plot, COLUMNS)


def plot(rows, path):
    fig, axes = plot_axes(1)
    xs = [r["seq_len"] for r in rows]
    axes[0][0].plot(xs, [r["longctx_ms"] for r in rows], "o-", label="longctx")
    axes[0][0].plot(xs, [r["hf_ms"] for r in rows], "o-", label="transformers (sdpa)")
    axes[0][0].set_title("training step fwd+bwd, ms")
    axes[1][0].plot(xs, [r["ratio"] for r in rows], "o-")
    axes[1][0].axhline(1.0, color="gray", lw=0.5)
    axes[1][0].set_title("longctx / transformers")
    for ax in axes[:, 0]:
        ax.set_xlabel("sequence length")
        ax.legend(fontsize=7) if ax.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
