"""Training step against Hugging Face: the longctx decoder and transformers' LlamaForCausalLM
(SDPA attention) with the same configuration, forward + backward of the next-token loss, one
process, fp32 weights (``--precision bf16``: both under bf16 autocast, as trainer.precision=bf16),
interleaved repeats, medians (``--clock process``: CPU time of the process, for a shared CPU).

    python -m bench.train_step                               # 4 layers, dim 512, seq 2048
    python -m bench.train_step --seq-lens 2048 4096 --threads 1 --repeats 5
    python -m bench.train_step --seq-lens 8192 --vocab 32000 --dim 256 --layers 2 --heads 4 \\
        --kv-heads 2 --loss-chunks 0 1024 --repeats 3        # a long row: chunked cross-entropy

Both models get the same weights (exported from ours with models.hf_io), so the loss is also
compared (``max_err`` of the loss). longctx computes its loss inside the model (labels given,
the loss head of ``trainer.parallelize.apply_loss_head`` for each of --loss-chunks: 0 full
logits, else tokens per chunk of models/ops/cross_entropy.py); Hugging Face's logits go through
``F.cross_entropy`` in fp32, the logits dropped before backward as in its own loss. ``ratio`` =
longctx / transformers time (< 1: longctx faster).

Memory, one more step of each after the timed ones, gradients freed first:
``peak_mb``   peak tensor memory allocated during forward + backward above the level before it
              (bench.runner.peak_allocated_bytes: CUDA's max_memory_allocated; on CPU the
              allocator's allocation/free events recorded by torch.profiler, summed in order):
              activations, transients (logits, their gradient, attention scratch) and the
              parameter gradients, which both models allocate alike.
``saved_mb``  activations autograd keeps for backward after forward (saved-tensor hooks, each
              storage once, parameters not counted).
``mem_ratio`` = longctx / transformers peak.
Writes ``train_step.csv`` and ``train_step.png`` into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.runner import peak_allocated_bytes, plot_axes, saved_storage_bytes, write_outputs
from models import ModelConfig, Transformer
from models.hf_io import save_hf_checkpoint
from trainer.parallelize import apply_loss_head

COLUMNS = [
    "seq_len",
    "precision",
    "loss_chunk",
    "params_m",
    "longctx_ms",
    "hf_ms",
    "ratio",
    "longctx_peak_mb",
    "hf_peak_mb",
    "mem_ratio",
    "longctx_saved_mb",
    "hf_saved_mb",
    "longctx_tok_s",
    "hf_tok_s",
    "max_err",
]


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


def _loss_ours(model, ids, labels):
    return model(ids, labels=labels) / labels.numel()


def _loss_hf(model, ids, labels):
    return F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1).float(), labels.flatten())


def _step(loss_fn, model, ids, labels, autocast):
    with autocast():
        loss = loss_fn(model, ids, labels)
    loss.backward()
    return loss.detach()


def _memory(loss_fn, model, ids, labels, autocast) -> tuple[float, float]:
    """(peak MB of one forward + backward, MB saved for backward) from fresh gradients."""
    model.zero_grad(set_to_none=True)
    peak = peak_allocated_bytes(lambda: _step(loss_fn, model, ids, labels, autocast), ids.device)
    model.zero_grad(set_to_none=True)
    box, hooks = saved_storage_bytes(skip=list(model.parameters()))
    with hooks, autocast():
        loss = loss_fn(model, ids, labels)
    del loss
    return peak / 2**20, box["bytes"] / 2**20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048])
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--loss-chunks", type=int, nargs="+", default=[0], help="longctx loss chunk sizes (0: off)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: CPU time of this process (a shared CPU's neighbours do not count; with --threads 1)",
    )
    p.add_argument("--out", default="bench_out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    write_outputs(measure(args), args.out, "train_step", plot, COLUMNS)


def measure(args) -> list[dict]:
    """One row per (sequence length, loss chunk) of ``args`` (see ``parser``)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cpu_clock = time.process_time if args.clock == "process" else time.perf_counter

    def clock():  # on CUDA the step's kernels are queued, not done, when it returns
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return cpu_clock()

    ours, hf = (m.to(device) for m in _models(args))

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_ours(chunk):
        def fn(model, ids, labels):
            apply_loss_head(model, chunk)
            return _loss_ours(model, ids, labels)

        return fn

    params = sum(x.numel() for x in ours.parameters()) / 1e6
    rows = []
    for n in args.seq_lens:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, args.vocab, (1, n), generator=g).to(device)
        labels = torch.randint(0, args.vocab, (1, n), generator=g).to(device)
        steps = {c: (loss_ours(c), ours) for c in args.loss_chunks}
        steps["hf"] = (_loss_hf, hf)
        times, losses = {k: [] for k in steps}, {}
        for k, (fn, m) in steps.items():  # warm-up
            m.zero_grad(set_to_none=True)
            losses[k] = _step(fn, m, ids, labels, autocast)
        for _ in range(args.repeats):  # interleaved
            for k, (fn, m) in steps.items():
                m.zero_grad(set_to_none=True)
                t0 = clock()
                _step(fn, m, ids, labels, autocast)
                times[k].append(clock() - t0)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        mem = {k: _memory(fn, m, ids, labels, autocast) for k, (fn, m) in steps.items()}
        for c in args.loss_chunks:
            rows.append(
                dict(
                    seq_len=n,
                    precision=args.precision,
                    loss_chunk=c,
                    params_m=round(params, 2),
                    longctx_ms=round(ms[c], 1),
                    hf_ms=round(ms["hf"], 1),
                    ratio=round(ms[c] / ms["hf"], 3),
                    longctx_peak_mb=round(mem[c][0], 1),
                    hf_peak_mb=round(mem["hf"][0], 1),
                    mem_ratio=round(mem[c][0] / mem["hf"][0], 3),
                    longctx_saved_mb=round(mem[c][1], 1),
                    hf_saved_mb=round(mem["hf"][1], 1),
                    longctx_tok_s=round(n / ms[c] * 1e3),
                    hf_tok_s=round(n / ms["hf"] * 1e3),
                    max_err=float(f"{abs(float(losses[c] - losses['hf'])):.3g}"),
                )
            )
    apply_loss_head(ours, 0)
    return rows


def plot(rows, path):
    fig, axes = plot_axes(2)
    for c in sorted({r["loss_chunk"] for r in rows}):
        sub = [r for r in rows if r["loss_chunk"] == c]
        xs = [r["seq_len"] for r in sub]
        name = "longctx" + (f" (loss chunk {c})" if c else "")
        axes[0][0].plot(xs, [r["longctx_ms"] for r in sub], "o-", label=name)
        axes[1][0].plot(xs, [r["ratio"] for r in sub], "o-", label=name)
        axes[0][1].plot(xs, [r["longctx_peak_mb"] for r in sub], "o-", label=name)
        axes[1][1].plot(xs, [r["mem_ratio"] for r in sub], "o-", label=name)
    hf = {r["seq_len"]: r for r in rows}
    axes[0][0].plot(list(hf), [r["hf_ms"] for r in hf.values()], "o-", label="transformers (sdpa)")
    axes[0][1].plot(list(hf), [r["hf_peak_mb"] for r in hf.values()], "o-", label="transformers (sdpa)")
    axes[0][0].set_title("training step fwd+bwd, ms")
    axes[1][0].set_title("time, longctx / transformers")
    axes[0][1].set_title("peak memory of the step, MB")
    axes[1][1].set_title("peak memory, longctx / transformers")
    for ax in (axes[1][0], axes[1][1]):
        ax.axhline(1.0, color="gray", lw=0.5)
    for ax in axes.flat:
        ax.set_xlabel("sequence length")
        ax.legend(fontsize=7) if ax.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
