"""longctx-doctor: does longctx work on this machine, end to end?

    longctx-doctor                      # or: python -m bench.doctor
    longctx-doctor --short              # CI on CPU (about a minute on 2 cores)
    longctx-doctor --out doctor_out     # report.json and report.md there

Prints the environment (torch, CUDA, NCCL, flash-attn, fla, triton, deepspeed, accelerate;
devices and their peaks), then runs on the devices it finds (GPUs with NCCL, else the CPU with
gloo; min(devices, 4) ranks, 2 with --short on CPU):
    cp/<strategy>/<kind>    every registered CP strategy, each mixer kind it serves, on a small
                            packed-document batch, fp32 and bf16 against an fp64 one-device
                            reference: fp32 error <= FP32_TOL, bf16 error <= 2 x the one-device
                            bf16 error of the same op (+ BF16_FLOOR)
    kernel/<backend>        each available kernel backend against the local kernel (the fused
                            piece kernels of every device, flash-attn, FlexAttention, fla)
    engine/<name>           the quickstart model for 20 steps under each installed engine
                            (native, deepspeed, accelerate): finite losses that go down
    perf/* (GPU only)       TFLOP/s of the local kernel and of flash-attn at 8K-32K, and the
                            MFU of a 1B-class training step at 32K (reported, not judged)
Writes report.json and report.md; exits non-zero naming every failing check. On GPU it warns
when training would run in fp32 (trainer.precision=fp32, the default): see README "Precision".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch

FP32_TOL = 1e-4  # CP fp32 vs fp64 (inputs ~N(0, 1), small rows)
BF16_FLOOR = 1e-2  # absolute slack on top of 2 x the one-device bf16 error
PACKAGES = ["torch", "triton", "flash-attn", "fla-core", "deepspeed", "accelerate", "transformers", "hydra-core"]


# ----------------------------------------------------------------------------- environment
def environment() -> dict:
    from trainer.metrics import gpu_peak_flops

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "packages": {},
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nccl": None,
        "devices": [],
    }
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 -- reported, not fatal
            env["nccl"] = f"unavailable ({e})"
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["devices"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 2**30, 1),
                    "peak_bf16_tflops": (gpu_peak_flops(p.name, "bf16") or 0) / 1e12 or None,
                    "peak_fp32_tflops": (gpu_peak_flops(p.name, "fp32") or 0) / 1e12 or None,
                }
            )
    return env


# ----------------------------------------------------------------------------- CP strategies
N_PER_RANK, HEADS, KV_HEADS, HEAD_DIM, BATCH = 32, 4, 4, 16, 2


def _batch(world: int, seed: int = 0):
    """Global fp64 q, k, v, dO [B, N, H, D] (linear: gates too) and cu_seqlens of packed
    documents that cross rank boundaries."""
    n = N_PER_RANK * world
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(BATCH, n, HEADS if i in (0, 3) else KV_HEADS, HEAD_DIM, generator=g,
                               dtype=torch.float64) for i in range(4))  # fmt: skip
    gate = -torch.rand(BATCH, n, KV_HEADS, generator=g, dtype=torch.float64) * 0.2
    cu = torch.tensor(sorted({0, 5, 6, n // 2 + 3, n, n + 1, n + 17, 2 * n}))
    return q, k, v, do, gate, cu


def _pattern():
    from models.s2_pattern import s2_pattern

    return s2_pattern(block=16, stride=3, local=1, n_kv_heads=KV_HEADS, dense_heads=(KV_HEADS - 1,))


def _fixed(*shape, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed (not trained) fp64 tensor in ``like``'s dtype and device: MLA's up-projection,
    lizard's meta tokens."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(like.device, like.dtype)


def _run_kind(ctx, kind, q, k, v, gate):
    """One call of ``kind``'s op on the batch's q, k, v [B, T, H, D] (every registered kind)."""
    if kind == "softmax":
        return ctx.attention(q, k, v, causal=True)
    if kind == "sparse":
        return ctx.run("sparse", q, k, v, causal=True, window=None, pattern=_pattern())
    if kind == "linear":
        return ctx.linear_attention(q, k, v, g=gate, scale=HEAD_DIM**-0.5, chunk_size=8)
    if kind == "mla":  # q: Dn + Dr = 8 + 8; the latent c (Dc = D) and the RoPE key from k and v
        dn, dr = HEAD_DIM // 2, HEAD_DIM // 2
        kv_b = _fixed(HEADS * (dn + HEAD_DIM), HEAD_DIM, seed=7, like=q)
        return ctx.run("mla", q, k[:, :, :1], v[:, :, :1, :dr], kv_b=kv_b, v_head_dim=HEAD_DIM, causal=True)
    if kind == "landmark":
        return ctx.run("landmark", q, k, v, every=5)
    if kind == "delay":
        return ctx.run("delay", v, v, v, delay=7)
    if kind == "meta_window":
        meta = [_fixed(3, KV_HEADS, HEAD_DIM, seed=s, like=k) for s in (8, 9)]
        return ctx.run("meta_window", q, k, v, window=6, meta_k=meta[0], meta_v=meta[1])
    raise ValueError(f"longctx-doctor has no check for mixer kind {kind!r}: add it to bench/doctor.py _run_kind")


def _fwd_bwd(ctx, kind, tensors, idx, dtype, device):
    """This rank's [o, dq, dk, dv] of one kind in ``dtype`` (gates stay fp32 for half inputs)."""
    q, k, v, do, gate, _ = tensors
    leaves = [x[:, idx].to(device, dtype).requires_grad_() for x in (q, k, v)]
    g = gate[:, idx].to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    o = _run_kind(ctx, kind, *leaves, g)
    o.backward(do[:, idx].to(device, dtype))
    return [o.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]  # delay reads v only


def _err(got, want) -> float:
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(got, want))


def _cp_rank(rank, world, names, device_kind):
    """Every (strategy, kind): max errors of this rank's shard in fp32 and bf16 against the fp64
    one-device run, and the one-device errors in the same dtypes. -> rows (rank 0)."""
    import torch.distributed as dist

    from parallel.context import CPContext
    from parallel.mesh import build_subgroups
    from parallel.strategies import STRATEGIES, build_strategy

    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    tensors = _batch(world)
    n, cu = N_PER_RANK * world, tensors[-1]
    rows = []
    for name in names:
        for kind in STRATEGIES[name].kinds:
            row = {"check": f"cp/{name}/{kind}", "world": world}
            try:
                strat = build_strategy(name)
                strat.check(n_heads=HEADS, n_kv_heads=KV_HEADS, cp=world, seq_len=n, layout="contiguous")
                sizes = strat.subgroup_sizes(world, HEADS)
                subs = build_subgroups(dist.group.WORLD, world, sizes) if sizes else {}
                ctx = CPContext({kind: strat}, dist.group.WORLD, rank, world, "contiguous", n, BATCH, cu, 8, subs)
                one = CPContext(build_strategy("local"), None, 0, 1, "contiguous", n, BATCH, cu, 8)
                full = torch.arange(n)
                ref = _fwd_bwd(one, kind, tensors, full, torch.float64, device)
                idx = ctx.local_index
                for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                    local = [x[:, idx] for x in _fwd_bwd(one, kind, tensors, full, dt, device)]
                    got = _fwd_bwd(ctx, kind, tensors, idx, dt, device)
                    want = [x[:, idx] for x in ref]
                    stats = torch.tensor([_err(got, want), _err(local, want)], dtype=torch.float64, device=device)
                    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                    row[f"{label}_err"], row[f"{label}_one_device_err"] = stats.tolist()
                ok32 = row["fp32_err"] <= max(FP32_TOL, 2 * row["fp32_one_device_err"])
                ok16 = row["bf16_err"] <= 2 * row["bf16_one_device_err"] + BF16_FLOOR
                row["status"] = "pass" if ok32 and ok16 else "fail"
                if not (ok32 and ok16):
                    row["detail"] = "fp32 error above tolerance" if not ok32 else "bf16 error above 2x one-device"
            except ValueError as e:  # the strategy rejects this shape / world: say why
                row.update(status="skip", detail=str(e).splitlines()[0])
            rows.append(row)
    return rows


def check_strategies(world: int, device_kind: str) -> list[dict]:
    from parallel.spawn import run_distributed
    from parallel.strategies import STRATEGIES

    names = sorted(n for n, cls in STRATEGIES.items() if cls.kinds)  # "local" serves one rank only
    backend = "nccl" if device_kind == "cuda" else "gloo"
    return run_distributed(_cp_rank, world, names, device_kind, timeout=900, backend=backend)[0]


# ----------------------------------------------------------------------------- kernel backends
def _case(n, h, hkv, d, device, dtype, seed=0):
    from models.ops.attention import MaskSpec
    from models.ops.documents import doc_ids

    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, n // 5, n // 2, n])
    pos = torch.arange(n)
    doc = doc_ids(cu, pos)[None]
    mask = MaskSpec(pos, pos, doc, doc, True, None)
    return [x.to(device, dtype) for x in (q, k, v, do)], mask, cu


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def _kernel_row(name, fn, local_fn, inputs64, inputs, forward_only=False):
    """Error of ``fn`` and of the local kernel (same dtype) against the local kernel in fp64."""
    q, k, v, do = inputs
    if forward_only:
        with torch.no_grad():
            want = [local_fn(*inputs64[:3])]
            got, local = [fn(q, k, v)], [local_fn(q, k, v)]
    else:
        want = _grads(local_fn, *inputs64)
        got, local = _grads(fn, q, k, v, do), _grads(local_fn, q, k, v, do)
    err, base = _err(got, want), _err(local, want)
    ok = err <= 2 * base + (BF16_FLOOR if q.dtype != torch.float32 else FP32_TOL)
    return {"check": f"kernel/{name}", "dtype": str(q.dtype).split(".")[-1], "err": err, "local_err": base,
            "status": "pass" if ok else "fail"}  # fmt: skip


def check_kernels(device: torch.device, short: bool) -> list[dict]:
    from models.ops import flash
    from models.ops.attention import _Attention, fused

    rows = []
    n = 96 if short else 512
    half = torch.bfloat16
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, half]
    for dt in dtypes:
        inputs64, mask, cu = _case(n, 4, 2, 64, device, torch.float64)
        inputs = [x.to(dt) for x in inputs64]
        name = fused.backend(inputs[0][0])
        local = lambda q, k, v, mask=mask: _Attention.apply(q, k, v, mask, None, 64)[0]  # noqa: E731
        if name is None:
            rows.append({"check": f"kernel/fused-{dt}", "status": "skip", "detail": f"no fused kernel for {dt}"})
            continue
        tiles = _without_fused(local)  # the tile loop: the same kernel without the fused pieces
        row = _kernel_row(f"fused-{name}", local, tiles, inputs64, inputs)
        rows.append(row)
    if device.type == "cuda" and flash.available():
        inputs64, mask, _ = _case(n, 4, 2, 64, device, torch.float64)
        inputs = [x.to(half) for x in inputs64]
        local = lambda q, k, v: _Attention.apply(q, k, v, mask, None, 64)[0]  # noqa: E731
        rows.append(_kernel_row("flash-attn", lambda q, k, v: flash.flash_attention(q, k, v, mask, None)[0], local,
                                inputs64, inputs))  # fmt: skip
    rows.append(_flex_row(device, short))
    rows.append(_fla_row(device))
    return [r for r in rows if r is not None]


def _without_fused(fn):
    from models.ops.attention import fused

    def run(*args):
        saved = fused.backend
        fused.backend = lambda x: None
        try:
            return fn(*args)
        finally:
            fused.backend = saved

    return run


def _flex_row(device, short):
    """FlexAttention (S2 masks): forward on CPU (no CPU backward), fwd+bwd on CUDA in bf16."""
    import warnings

    from models.ops import flex
    from models.ops.attention import MaskSpec, _Attention

    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return {"check": "kernel/flex", "status": "skip", "detail": "torch has no flex_attention"}
    n = 64 if short else 256
    inputs64, mask, cu = _case(n, 4, 4, 16, device, torch.float64)
    pattern = _pattern().bind(cu, 1, n)  # per-document blocks (DKernel's): the batch's documents
    mask = MaskSpec(mask.q_pos, mask.k_pos, mask.q_doc, mask.k_doc, True, None, pattern)
    local = lambda q, k, v: _Attention.apply(q, k, v, mask, None, 64)[0]  # noqa: E731
    fn = lambda q, k, v: flex.flex_attention(q, k, v, mask)[0]  # noqa: E731
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is not compiled
        return _kernel_row("flex", fn, local, inputs64, [x.to(dt) for x in inputs64], device.type != "cuda")


def _fla_row(device):
    from models.ops.linear_attention import chunk_linear_attention, fla_backend

    if device.type != "cuda":
        return {"check": "kernel/fla", "status": "skip", "detail": "fla's Triton kernels need CUDA "
                "(tests/test_triton_interpreter.py runs them on CPU under TRITON_INTERPRET=1)"}  # fmt: skip
    if not fla_backend.available():
        return {"check": "kernel/fla", "status": "skip", "detail": "fla-core is not installed"}
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 256, 4, 32, generator=g, dtype=torch.float64) for _ in range(4))
    gate = -torch.rand(2, 256, 4, generator=g, dtype=torch.float64) * 0.1
    cu = torch.tensor([0, 50, 256, 300, 512])
    inputs64 = [x.to(device) for x in (q, k, v, do)]

    def op(impl):
        return lambda q, k, v: chunk_linear_attention(q, k, v, gate.to(device, q.dtype), scale=0.2, cu_seqlens=cu,
                                                      impl=impl)[0]  # fmt: skip

    return _kernel_row("fla", op("fla"), op("chunk"), inputs64, [x.to(torch.bfloat16) for x in inputs64])


# ----------------------------------------------------------------------------- engines
ENGINE_OVERRIDES = {
    "native": ["engine=native"],
    "deepspeed": ["engine=deepspeed"],
    "accelerate": ["engine=accelerate"],
}


def _engine_rank(rank, world, runs):
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config, train

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    for overrides in runs:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            train(to_config(compose(config_name="train", overrides=overrides)))


def check_engines(world: int, device_kind: str, short: bool, steps: int = 20) -> list[dict]:
    import importlib.util

    from parallel.spawn import run_distributed

    names = [n for n in ENGINE_OVERRIDES if n == "native" or importlib.util.find_spec(n) is not None]
    if short:
        names = ["native"]
    root = tempfile.mkdtemp(prefix="longctx_doctor_")
    seq = 128 if short else 512
    common = [
        "experiment=quickstart",
        f"parallel.cp.size={world}",
        f"data.seq_len={seq}",
        f"trainer.steps={steps}",
        "trainer.log_every=1",
        "trainer.save_every=0",
        "trainer.eval_batches=1",
        "trainer.passkey_lengths=[]",
        "trainer.progress_bar=false",
        f"trainer.device={device_kind}",
        "logger.wandb=false",
    ] + (["trainer.precision=bf16"] if device_kind == "cuda" else [])
    rows = []
    for name in names:
        run_dir = os.path.join(root, name)
        t0 = time.perf_counter()
        row = {"check": f"engine/{name}", "steps": steps}
        try:
            backend = "nccl" if device_kind == "cuda" else "gloo"
            run_distributed(_engine_rank, world, [common + ENGINE_OVERRIDES[name] + [f"trainer.run_dir={run_dir}"]],
                            timeout=1800, backend=backend)  # fmt: skip
            losses = [m["loss"] for m in _metrics(run_dir) if "loss" in m]
            row.update(first_loss=losses[0], last_loss=losses[-1], seconds=round(time.perf_counter() - t0, 1))
            ok = len(losses) == steps and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
            row["status"] = "pass" if ok else "fail"
            if not ok:
                row["detail"] = f"{len(losses)} losses logged, first {losses[0]:.3f}, last {losses[-1]:.3f}"
        except Exception as e:  # noqa: BLE001 -- the check fails with the reason
            row.update(status="fail", detail=str(e).strip().splitlines()[-1][:300])
        rows.append(row)
    return rows


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- GPU performance
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tflops_row(name, fn, n, h, hkv, d, device):
    """TFLOP/s of forward + backward of causal attention at length n (bf16)."""
    inputs64, mask, _ = _case(n, h, hkv, d, device, torch.float64)
    q, k, v, do = (x.to(torch.bfloat16) for x in inputs64)
    del inputs64
    mask = type(mask)(mask.q_pos, mask.k_pos, mask.q_doc * 0, mask.k_doc * 0, True, None)  # one document
    step = lambda: _grads(lambda a, b, c: fn(a, b, c, mask), q, k, v, do)  # noqa: E731
    step()
    _sync(device)
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    _sync(device)
    sec = (time.perf_counter() - t0) / reps
    flops = 3.5 * 4 * n * n / 2 * h * d  # causal fwd (4 n^2 h d / 2) + bwd (2.5x fwd)
    return {"check": f"perf/{name}/{n}", "status": "info", "tflops": float(f"{flops / sec / 1e12:.3g}")}


def check_perf(device: torch.device, short: bool) -> list[dict]:
    from models.ops import flash
    from models.ops.attention import _Attention

    rows = []
    lengths = [8192] if short else [8192, 16384, 32768]
    kernel = lambda q, k, v, mask: _Attention.apply(q, k, v, mask, None, 256)[0]  # noqa: E731
    for n in lengths:
        rows.append(_tflops_row("local-kernel", kernel, n, 16, 8, 128, device))
        if flash.available():
            fa = lambda q, k, v, mask: flash.flash_attention(q, k, v, mask, None)[0]  # noqa: E731
            rows.append(_tflops_row("flash-attn", fa, n, 16, 8, 128, device))
    rows.append(_mfu_row(device, 8192 if short else 32768))
    return rows


def _mfu_row(device, n, cfg=None):
    """One training step of a 1B-class model (conf/model/llama_1b.yaml's shape, a 32K vocabulary)
    at length n, bf16 autocast, activation checkpointing, chunked loss: MFU against the device's
    bf16 peak."""
    from models import ModelConfig, Transformer
    from trainer.metrics import batch_flops, device_peak_flops, matmul_params

    cfg = cfg or ModelConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192)
    row = {"check": f"perf/mfu-1b/{n}", "status": "info"}
    try:
        model = Transformer(cfg).to(device)
        from trainer.parallelize import apply_activation_checkpointing, apply_loss_head

        apply_loss_head(model, 4096)
        apply_activation_checkpointing(model)
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
        pos = torch.arange(n, device=device)[None]

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(ids, pos, None, labels=ids)
            loss.backward()

        step()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        sec = time.perf_counter() - t0
        flops = batch_flops(cfg, matmul_params(model), [n])
        peak = device_peak_flops(device, None, "bf16")
        row.update(seconds=round(sec, 3), tflops=float(f"{flops / sec / 1e12:.3g}"))
        if peak:
            row["mfu"] = float(f"{flops / sec / peak:.3g}")
    except Exception as e:  # noqa: BLE001 -- reported, not judged
        row.update(status="skip", detail=str(e).strip().splitlines()[-1][:300])
    return row


# ----------------------------------------------------------------------------- report
def precision_warning(env) -> str | None:
    if not env["cuda_available"]:
        return None
    from trainer.config import TrainConfig

    if TrainConfig().trainer.precision == "fp32":
        return ("trainer.precision defaults to fp32: GPU runs then never use flash-attn and train at the fp32 peak; "
                "set trainer.precision=bf16 (the doctor's engine runs use bf16 on GPU)")  # fmt: skip
    return None


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# longctx-doctor report", "", f"- python {env['python']}, {env['platform']}"]
    lines += [f"- {k}: {v or 'not installed'}" for k, v in env["packages"].items()]
    lines += [f"- CUDA {env['cuda']}, NCCL {env['nccl']}, devices: {len(env['devices']) or 'CPU only'}"]
    for d in env["devices"]:
        lines.append(f"  - {d['index']}: {d['name']} (sm {d['capability']}, {d['memory_gb']} GB, "
                     f"bf16 peak {d['peak_bf16_tflops']} TFLOP/s)")  # fmt: skip
    for w in report["warnings"]:
        lines.append(f"- **warning**: {w}")
    lines += ["", f"Ranks: {report['ranks']} ({report['backend']})", "", "| check | status | numbers | detail |",
              "|---|---|---|---|"]  # fmt: skip
    for r in report["checks"]:
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("check", "status", "detail"))
        lines.append(f"| {r['check']} | {r['status']} | {nums} | {r.get('detail', '')} |")
    failed = [r["check"] for r in report["checks"] if r["status"] == "fail"]
    lines += ["", f"**{len(failed)} failing check(s)**: {', '.join(failed)}" if failed else "**all checks pass**"]
    return "\n".join(lines) + "\n"


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="a quick subset for CI on CPU")
    p.add_argument("--out", default="doctor_out")
    p.add_argument("--ranks", type=int, default=None, help="ranks to spawn (default: min(devices, 4))")
    p.add_argument("--skip", nargs="*", default=[], choices=["cp", "kernel", "engine", "perf"])
    args = p.parse_args(argv)
    env = environment()
    cuda = env["cuda_available"] and len(env["devices"]) > 0
    device_kind = "cuda" if cuda else "cpu"
    ranks = args.ranks or (min(len(env["devices"]), 4) if cuda else (2 if args.short else 4))
    warnings = [w for w in [precision_warning(env)] if w]
    print(f"[longctx-doctor] torch {torch.__version__}, {device_kind}, {ranks} ranks "
          f"({'nccl' if cuda else 'gloo'})", flush=True)  # fmt: skip
    for w in warnings:
        print(f"[longctx-doctor] warning: {w}", flush=True)
    checks = []
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    stages = [
        ("cp", lambda: check_strategies(ranks, device_kind)),
        ("kernel", lambda: check_kernels(device, args.short)),
        ("engine", lambda: check_engines(ranks, device_kind, args.short, steps=20)),
    ]
    if cuda:
        stages.append(("perf", lambda: check_perf(device, args.short)))
    for name, run in stages:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            rows = run()
        except Exception as e:  # noqa: BLE001 -- a stage that crashes is one failing check
            rows = [{"check": f"{name}/*", "status": "fail", "detail": f"{type(e).__name__}: {e}"[:300]}]
        checks += rows
        for r in rows:
            print(f"[longctx-doctor] {r['status']:>4} {r['check']} {r.get('detail', '')}", flush=True)
        print(f"[longctx-doctor] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    report = {"environment": env, "ranks": ranks, "backend": "nccl" if cuda else "gloo", "warnings": warnings,
              "checks": checks}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(markdown(report))
    failed = [r["check"] for r in checks if r["status"] == "fail"]
    print(f"[longctx-doctor] wrote {args.out}/report.json and {args.out}/report.md")
    if failed:
        print(f"[longctx-doctor] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("[longctx-doctor] all checks pass")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
