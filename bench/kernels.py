"""Local kernel benchmark: the softmax attention kernel and the chunked linear op against
PyTorch / flash-linear-attention references, forward + backward, on one process.

    python -m bench.kernels                                 # CPU defaults, a few minutes
    python -m bench.kernels --seq-lens 2048 4096 8192 16384 --kv-heads 4 2 --repeats 7

Softmax (``models.ops.attention.attention``, fp32 (--precision bf16: bf16 inputs), [B, T, H, D]
tensors, B = 1, on --device: CUDA when available; there also ``kernel``, the PyTorch kernel without
flash-attn's dispatch, and ``flash_attn`` on its own) against
    sdpa         F.scaled_dot_product_attention(is_causal=True); with packed documents, called
                 once per document (outputs concatenated, one backward)
    sdpa_mask    one SDPA call with the dense boolean [T, T] mask (causal, block-diagonal)
                 (up to --dense-mask-max-len)
    generic      the kernel forced onto its fixed-block plan (``MAX_PIECES = 0``), --generic
on a dense causal row ("causal") and on --docs packed documents of uneven lengths ("docs").
Linear (``chunk_linear_attention``, no documents, autograd backward for the references) against
flash-linear-attention's own torch references, loaded from ``fla/ops/*/naive.py`` of an installed
fla-core (the ``bench`` extra; the files are read by path, since importing the ``fla`` package
needs triton):
    nodecay      vs ``fla_naive``: ``naive_chunk_linear_attn`` (chunks of 64: intra-chunk masked
                 q k^T v plus the exclusive cumulative sum of chunk states)
    scalar       scalar log-decay g [B, T, H] (simple GLA / lightning / retention) vs
                 ``fla_simple_gla``: ``naive_chunk_simple_gla`` (a loop over chunks of 64)
Without fla-core, ``nodecay`` uses a copy of ``naive_chunk_linear_attn`` (impl ``fla_naive_copy``)
and ``scalar`` is skipped.

Training step (--train-seq-lens; bench.train_step's defaults: a 4-layer Llama, dim 512, fp32)
against transformers' ``LlamaForCausalLM`` (sdpa) on the same weights: op ``train_step``, impl
``hf``; its peak-memory ratio is printed with it (bench.train_step has the memory columns).

The last table, ``targets``, gives each ratio beside the target it has to meet (``TARGETS``).

Every cell times all implementations interleaved (one repeat of each in turn, after one
warm-up each), with the same ``torch.set_num_threads``, and reports medians. ``ratio`` is
ours / that implementation (< 1: ours is faster); ``max_err`` is the largest difference of
output and gradients against ours. Writes ``kernels.csv`` and ``kernels.png`` into --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as F

from models.ops.attention import MaskSpec, attention
from models.ops.attention import plan as attn_plan
from models.ops.documents import doc_ids
from models.ops.linear_attention import chunk_linear_attention
from models.ops.linear_attention.fla_backend import torch_reference

COLUMNS = ["op", "mask", "seq_len", "heads", "kv_heads", "impl", "fwd_bwd_ms", "ratio", "max_err"]
DOC_WEIGHTS = [5, 3, 8, 2, 6, 1, 4, 3]  # uneven packed documents, cycled for --docs
# (op, mask, impl, target): ours / impl must be at or below the target at every length
TARGETS = [
    ("softmax", "causal", "sdpa", 1.1),
    ("softmax", "docs", "sdpa", 1.1),
    ("softmax", "docs", "sdpa_mask", 1.0),
    ("linear", "nodecay", "fla_naive", 1.0),
    ("linear", "nodecay", "fla_naive_copy", 1.0),
    ("linear", "scalar", "fla_simple_gla", 1.0),
    ("train_step", "causal", "hf", 1.0),
]
TARGET_COLUMNS = ["op", "mask", "vs", "seq_len", "kv_heads", "ratio", "target", "met"]


def doc_bounds(n: int, docs: int) -> torch.Tensor:
    """cu_seqlens [docs + 1] of ``docs`` uneven documents filling n tokens."""
    w = torch.tensor([DOC_WEIGHTS[i % len(DOC_WEIGHTS)] for i in range(docs)], dtype=torch.float64)
    cu = torch.round(torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)]) / w.sum() * n)
    return cu.long()


def _sync():
    """Wait for the GPU (kernels return once queued); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument callable, timed interleaved after one warm-up."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            _sync()
            t0 = time.perf_counter()
            f()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def on_device(args, *xs):
    """The benchmark's inputs on ``args.device`` in ``args.precision`` (bf16: what the kernels
    get under CUDA autocast)."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return [x.to(args.device, dtype) for x in xs]


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _fwd_bwd(fn, q, k, v, do):
    """Run fn on fresh leaves, backward with do; returns [o, dq, dk, dv] (detached)."""
    q, k, v = _leaves(q, k, v)
    o = fn(q, k, v)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


# ----------------------------------------------------------------------------- softmax
def _ours(mask, block):
    return lambda q, k, v: attention(q, k, v, mask, None, block)[0]


def _kernel(mask, block):
    """The PyTorch kernel itself (on CUDA ``attention`` hands same-run pairs to flash-attn)."""
    from models.ops.attention import _Attention

    return lambda q, k, v: _Attention.apply(q, k, v, mask, None, block)[0]


def _flash_attn(mask):
    from models.ops import flash

    return lambda q, k, v: flash.flash_attention(q, k, v, mask, None)[0]


def _generic(mask, block):
    def fn(q, k, v):
        saved, attn_plan.MAX_PIECES = attn_plan.MAX_PIECES, 0
        try:
            return attention(q, k, v, mask, None, block)[0]
        finally:
            attn_plan.MAX_PIECES = saved

    return fn


def _sdpa(cu, gqa):
    """SDPA(is_causal) once per document on [B, H, T, D] views of the [B, T, H, D] tensors."""

    def fn(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        outs = [
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=gqa)
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
        return torch.cat(outs, dim=2).transpose(1, 2)

    return fn


def _sdpa_mask(dense, gqa):
    def fn(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa).transpose(1, 2)

    return fn


def softmax_cells(n, h, hkv, d, mask_kind, args):
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, n, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, n, hkv, d, generator=g) for _ in range(2))
    cu = doc_bounds(n, args.docs) if mask_kind == "docs" else torch.tensor([0, n])
    pos = torch.arange(n)
    doc = doc_ids(cu, pos)
    mask = MaskSpec(pos, pos, doc[None], doc[None], True, None)
    q, k, v, do = on_device(args, q, k, v, do)
    gqa = hkv != h
    impls = {"ours": _ours(mask, args.block), "sdpa": _sdpa(cu, gqa)}
    if q.is_cuda:  # the kernel without flash-attn's dispatch, and flash-attn on its own
        from models.ops import flash

        impls["kernel"] = _kernel(mask, args.block)
        if flash.available() and flash.applicable(q, mask):
            impls["flash_attn"] = _flash_attn(mask)
    if n <= args.dense_mask_max_len:
        dense = ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])).to(q.device)  # [T, T]
        impls["sdpa_mask"] = _sdpa_mask(dense, gqa)
    if args.generic:
        impls["generic"] = _generic(mask, args.block)
    return _cells(
        impls, (q, k, v, do), dict(op="softmax", mask=mask_kind, seq_len=n, heads=h, kv_heads=hkv), args.repeats
    )


# ----------------------------------------------------------------------------- linear
def naive_chunk_linear_attn(q, k, v, scale, chunk_size=64):
    """A copy of flash-linear-attention's torch ``naive_chunk_linear_attn`` in the [B, T, H, D]
    layout (T a multiple of chunk_size), used when fla-core is not installed:
    o_t = scale * sum_{s <= t} (q_t . k_s) v_s, chunked."""
    b, t, h, _ = q.shape
    c = chunk_size

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        return x.transpose(1, 2).reshape(b, h, t // c, c, x.shape[-1])

    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    kv = (k.transpose(-1, -2) @ v).cumsum(2)  # state after each chunk
    kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
    inter = q @ kv
    future = torch.triu(torch.ones(c, c, dtype=torch.bool, device=q.device), diagonal=1)
    intra = (q @ k.transpose(-1, -2)).masked_fill_(future, 0) @ v
    return (inter + intra).reshape(b, h, t, -1).transpose(1, 2)


def linear_cells(n, h, d, decay, args):
    """``decay``: "nodecay" or "scalar" (log-decay g in [-0.1, -0.001], weak enough that states
    carry over many chunks)."""
    g = torch.Generator().manual_seed(1)
    q, k, v, do = on_device(args, *(torch.randn(1, n, h, d, generator=g) for _ in range(4)))
    scale = d**-0.5
    key = dict(op="linear", mask=decay, seq_len=n, heads=h, kv_heads=h)
    if decay == "nodecay":
        fla = torch_reference("linear_attn", "naive_chunk_linear_attn")
        impls = {"ours": lambda q, k, v: chunk_linear_attention(q, k, v, scale=scale, chunk_size=args.chunk)[0]}
        if fla is not None and n % 64 == 0:
            impls["fla_naive"] = lambda q, k, v: fla(q, k, v, scale=scale)
        else:
            impls["fla_naive_copy"] = lambda q, k, v: naive_chunk_linear_attn(q, k, v, scale, args.chunk)
        return _cells(impls, (q, k, v, do), key, args.repeats)
    fla = torch_reference("simple_gla", "naive_chunk_simple_gla")
    if fla is None:
        print("[bench.kernels] fla-core is not installed: skipping the scalar-decay cell (pip install fla-core)")
        return []
    gate = -torch.empty(1, n, h).uniform_(1e-3, 0.1, generator=g).to(q.device)
    impls = {
        "ours": lambda q, k, v: chunk_linear_attention(q, k, v, gate, scale=scale, chunk_size=args.chunk)[0],
        "fla_simple_gla": lambda q, k, v: fla(q, k, v, gate, chunk_size=64, scale=scale)[0],
    }
    return _cells(impls, (q, k, v, do), key, args.repeats)


def train_step_cells(args):
    """bench.train_step's rows as ``ours`` / ``hf`` rows of this table (fp32, same threads)."""
    from bench import train_step

    targs = train_step.parser().parse_args(
        ["--seq-lens", *map(str, args.train_seq_lens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        + ["--device", args.device, "--precision", args.precision]
    )
    rows = []
    for r in train_step.measure(targs):
        key = dict(op="train_step", mask="causal", seq_len=r["seq_len"], heads=targs.heads, kv_heads=targs.kv_heads)
        print(f"[bench.kernels] train step N={r['seq_len']}: peak memory longctx / hf = {r['mem_ratio']}")
        rows.append(dict(key, impl="ours", fwd_bwd_ms=r["longctx_ms"], ratio=1.0, max_err=0.0))
        rows.append(dict(key, impl="hf", fwd_bwd_ms=r["hf_ms"], ratio=r["ratio"], max_err=r["max_err"]))
    return rows


def _cells(impls, inputs, key, repeats):
    q, k, v, do = inputs
    ref = _fwd_bwd(impls["ours"], q, k, v, do)
    errs = {
        name: max((a - b).abs().max().item() for a, b in zip(_fwd_bwd(f, q, k, v, do), ref))
        for name, f in impls.items()
    }
    med = timed({name: (lambda f=f: _fwd_bwd(f, q, k, v, do)) for name, f in impls.items()}, repeats)
    return [
        dict(
            key,
            impl=name,
            fwd_bwd_ms=round(t * 1e3, 2),
            ratio=round(med["ours"] / t, 3),
            max_err=float(f"{errs[name]:.3g}"),
        )
        for name, t in med.items()
    ]


# ----------------------------------------------------------------------------- report
def plot(rows, path):
    """One panel per (op, mask or decay, Hkv) in a grid of at most 3 columns: ours / reference
    fwd+bwd time against the sequence length (< 1: ours faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["op"], r["mask"], r["kv_heads"]) for r in rows})
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), dpi=110, squeeze=False, layout="constrained"
    )
    for ax, (op, mask, hkv) in zip(axes.flat, groups):
        sel = [r for r in rows if (r["op"], r["mask"], r["kv_heads"]) == (op, mask, hkv)]
        for impl in sorted({r["impl"] for r in sel} - {"ours"}):
            pts = sorted((r["seq_len"], r["ratio"]) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"ours / {impl}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        lens = sorted({r["seq_len"] for r in sel})
        ax.set_xticks(lens, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lens])
        ax.minorticks_off()
        ax.set_title(f"{op}, {mask}, Hkv={hkv}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    fig.supxlabel("sequence length (tokens)", fontsize=10)
    fig.supylabel("fwd+bwd time, ours / reference (< 1: ours faster)", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def target_rows(rows):
    """One row per measured ratio that has a target in TARGETS."""
    out = []
    for op, mask, impl, target in TARGETS:
        for r in rows:
            if (r["op"], r["mask"], r["impl"]) == (op, mask, impl):
                met = "yes" if r["ratio"] <= target else "NO"
                out.append(
                    dict(
                        op=op,
                        mask=mask,
                        vs=impl,
                        seq_len=r["seq_len"],
                        kv_heads=r["kv_heads"],
                        ratio=r["ratio"],
                        target=target,
                        met=met,
                    )
                )
    return out


def print_table(rows, columns=COLUMNS):
    if not rows:
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print(" ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print(" ".join(str(r[c]).ljust(widths[c]) for c in columns))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--masks", nargs="+", default=["causal", "docs"], choices=["causal", "docs"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[4, 2])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--docs", type=int, default=8, help="packed documents per row for --masks docs")
    p.add_argument("--block", type=int, default=attn_plan.DEFAULT_BLOCK)
    p.add_argument("--chunk", type=int, default=64, help="chunk size of both linear ops")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--generic", action="store_true", help="also time the fixed-block plan")
    p.add_argument(
        "--dense-mask-max-len",
        type=int,
        default=8192,
        help="skip sdpa_mask above this length (its [T, T] mask and scores)",
    )
    p.add_argument("--decays", nargs="+", default=["nodecay", "scalar"], choices=["nodecay", "scalar"])
    p.add_argument(
        "--train-seq-lens",
        type=int,
        nargs="*",
        default=[2048],
        help="training-step lengths against transformers (none: skip)",
    )
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: inputs as autocast hands them")
    p.add_argument("--no-softmax", dest="softmax", action="store_false")
    p.add_argument("--no-linear", dest="linear", action="store_false")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in args.seq_lens:
        if args.softmax:
            for hkv in args.kv_heads:
                for mask_kind in args.masks:
                    rows += softmax_cells(n, args.heads, hkv, args.head_dim, mask_kind, args)
        if args.linear:
            for decay in args.decays:
                rows += linear_cells(n, args.heads, args.head_dim, decay, args)
        print(f"[bench.kernels] N={n} done", flush=True)
    if args.train_seq_lens:
        rows += train_step_cells(args)
    with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, "kernels.png"))
    print_table(rows)
    targets = target_rows(rows)
    print("\ntargets (ratio = ours / reference, fwd+bwd medians)")
    print_table(targets, TARGET_COLUMNS)
    print(f"wrote {args.out}/kernels.csv and {args.out}/kernels.png")


if __name__ == "__main__":
    main()
