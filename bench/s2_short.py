"""S2 attention at short rows on CPU: the pattern kernel's two paths, where they cross, and the
dense kernel beside them; then a whole training step of an S2 model against the same model with
softmax layers.

    python -m bench.s2_short                      # about a minute on 2 cores
    python -m bench.s2_short --seq-lens 256 1024 4096 --batch 2

Kernel cells (``models.ops.attention.attention``, fp32, forward + backward, [B, T, H, D] rows of
packed documents of uneven lengths, S2 pattern with per-document blocks):
    tiles        the tile plan: per query tile, its active key tiles, batched by shape into
                 calls of PyTorch's fused CPU flash op (``cpu_path("tiles")``)
    masked_call  one call of the fused op under the pattern's additive [B, H, T, T] mask
                 (``cpu_path("masked_call")``)
    auto         the kernel's own choice (masked_call up to ``DENSE_SCORES`` scores a row)
    dense        the softmax kind on the same rows (documents mask, no pattern): the peer S2
                 has to beat, or at least come near, for sparsity to be worth it at this size
``scores`` is H * T * T, a row's scores, the quantity ``DENSE_SCORES`` bounds; ``ratio`` is that row's time over
``dense``. Train-step cells (``--train``): the retrieval recipe's model (2 layers, width 64, 4 heads
of 32) with ``[s2]`` or ``[softmax]`` layers, one optimizer-free forward + backward over B rows.
Writes ``s2_short.csv`` and ``s2_short.png`` into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

import torch

from bench.runner import plot_axes, write_outputs
from models.ops.attention import MaskSpec, attention
from models.ops.attention import pattern as pattern_kernel
from models.ops.documents import doc_ids
from models.s2_pattern import s2_pattern

COLUMNS = ["cell", "seq_len", "batch", "scores", "impl", "fwd_bwd_ms", "ratio", "max_err"]


def packed_starts(batch: int, n: int, seed: int, lo: int = 20, hi: int = 200) -> torch.Tensor:
    """cu_seqlens over [batch * n] tokens: documents of lo..hi tokens, the last of a row cut."""
    r, cu = random.Random(seed), [0]
    for b in range(batch):
        pos = 0
        while pos < n:
            pos = min(n, pos + r.randint(lo, hi))
            cu.append(b * n + pos)
    return torch.tensor(cu)


def _median_ms(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def kernel_rows(n: int, args) -> list[dict]:
    b, h, d = args.batch, args.heads, args.head_dim
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(b, n, h, d, generator=g) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    cu = packed_starts(b, n, n)
    pos = torch.arange(n)
    doc = doc_ids(cu, torch.arange(b)[:, None] * n + pos[None])
    pattern = s2_pattern(block=args.block, stride=args.stride, local=args.local, n_kv_heads=h, n_heads=h)
    masks = {
        "dense": MaskSpec(pos, pos, doc, doc, True, None),
        "sparse": MaskSpec(pos, pos, doc, doc, True, None, pattern.bind(cu, b, n)),
    }
    scores = h * n * n
    impls = [("tiles", "sparse", "tiles"), ("masked_call", "sparse", "masked_call")]
    impls += [("auto", "sparse", None), ("dense", "dense", None)]  # None: the kernel's own limits
    rows, outs = [], {}
    for impl, which, path in impls:

        def step(mask=masks[which]):
            for x in leaves:
                x.grad = None
            o, _ = attention(q, k, v, mask, None, args.block)
            o.backward(do)
            return [o.detach(), *(x.grad for x in leaves)]

        with pattern_kernel.cpu_path(path) if path else contextlib.nullcontext():
            ms = _median_ms(step, args.repeats)
            outs[impl] = step()
        rows.append(dict(cell="kernel", seq_len=n, batch=b, scores=scores, impl=impl, fwd_bwd_ms=ms))
    for r in rows:
        r["ratio"] = round(r["fwd_bwd_ms"] / rows[-1]["fwd_bwd_ms"], 3)
        ref = outs["tiles"] if r["impl"] != "dense" else outs["dense"]
        r["max_err"] = f"{max((a - c).abs().max().item() for a, c in zip(outs[r['impl']], ref)):.1e}"
    return rows


def _train_step(mixer: str, n: int, args):
    """One forward + backward of the recipe's model with ``mixer`` layers, a new batch (tokens,
    documents, so a new plan) each call."""
    from models.config import ModelConfig
    from models.context import SingleDeviceContext
    from models.llama import Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=32, mixer_pattern=[mixer],
                      s2_block=args.block, s2_stride=args.stride, s2_local=args.local)  # fmt: skip
    model, seeds = Transformer(cfg), iter(range(10**6))

    def step():
        i = next(seeds)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, n), generator=torch.Generator().manual_seed(i))
        ctx = SingleDeviceContext(args.batch, n, packed_starts(args.batch, n, i))
        model.zero_grad(set_to_none=True)
        model(ids, ctx=ctx).float().mean().backward()

    return step


def train_rows(n: int, args) -> list[dict]:
    rows = [
        dict(cell="train_step", seq_len=n, batch=args.batch, scores="", impl=mixer,
             fwd_bwd_ms=_median_ms(_train_step(mixer, n, args), args.repeats))
        for mixer in ("s2", "softmax")
    ]  # fmt: skip
    for r in rows:
        r["ratio"], r["max_err"] = round(r["fwd_bwd_ms"] / rows[-1]["fwd_bwd_ms"], 3), ""
    return rows


def plot(rows, path):
    fig, axes = plot_axes(1)
    for ax, cell in zip(axes[:, 0], ("kernel", "train_step")):
        for impl in sorted({r["impl"] for r in rows if r["cell"] == cell}):
            pts = [(r["seq_len"], r["fwd_bwd_ms"]) for r in rows if r["cell"] == cell and r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="row length (tokens)", ylabel="forward + backward (ms)")
        ax.set_title(f"S2 {cell.replace('_', ' ')} on CPU, batch {rows[0]['batch']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--train-seq-lens", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--local", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = [r for n in args.seq_lens for r in kernel_rows(n, args)]
    rows += [r for n in args.train_seq_lens for r in train_rows(n, args)]
    write_outputs(rows, args.out, "s2_short", plot, COLUMNS)
    print(f"DENSE_SCORES = {pattern_kernel.DENSE_SCORES} (auto: masked_call up to that many scores a row)")


if __name__ == "__main__":
    main()
