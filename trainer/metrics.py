"""Logging on the first rank: console, ``metrics.jsonl`` in the run dir, and wandb."""

from __future__ import annotations

import json
import os

import torch

# Dense peak FLOP/s by device name fragment, first match wins (for MFU; trainer.peak_tflops
# overrides): (bf16 tensor cores, fp32 without TF32, which is what fp32 matmuls run in by
# default). H100 PCIe and NVL have fewer SMs and lower clocks than the SXM part.
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100 NVL": (835e12, 60e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
}
# CPU: an estimate per thread, ~3 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units); about what one
# thread's fp32 GEMM reaches on a recent x86 core. Set trainer.peak_tflops for a real figure.
CPU_FLOPS_PER_THREAD = 0.1e12


def device_peak_flops(device: torch.device, peak_tflops: float | None = None, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of one device: ``trainer.peak_tflops`` when set; on CUDA the table's entry for
    the device name and the run's precision ("bf16" or "fp32"; fp32 with TF32 matmuls allowed
    counts half the bf16 peak) -- None, so no MFU, for a GPU it does not know; on CPU the
    per-thread estimate times torch's threads."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return CPU_FLOPS_PER_THREAD * torch.get_num_threads()
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision, torch.backends.cuda.matmul.allow_tf32)


def gpu_peak_flops(name: str, precision: str = "bf16", tf32: bool = False) -> float | None:
    """The table's dense peak for a GPU name (see PEAK_FLOPS), None when unknown."""
    bf16, fp32 = next((v for k, v in PEAK_FLOPS.items() if k in name), (None, None))
    if bf16 is None or precision == "bf16":
        return bf16
    return bf16 / 2 if tf32 else fp32


def matmul_params(model) -> int:
    """Parameters that multiply every token (6 FLOPs each per token, fwd+bwd): all but the input
    embedding, a table lookup -- unless it is tied to the output head (torchtitan's count)."""
    n = sum(p.numel() for p in model.parameters())
    return n if model.cfg.tie_embeddings else n - model.embed.weight.numel()


def batch_flops(model_cfg, n_matmul: int, doc_lens) -> float:
    """Training FLOPs (fwd+bwd) of a batch of packed documents of lengths ``doc_lens``
    (models.ops.documents.doc_lengths): 6 * ``n_matmul`` per token, plus each layer's
    token-mixing core as its mixer counts it from the mask (``core_flops(cfg, layer,
    doc_lens)``: attention pairs per document, causal, windowed, sparse pattern), not from
    seq_len^2."""
    from models.mixers import mixer_class

    core = sum(mixer_class(model_cfg.mixer_of(i)).core_flops(model_cfg, i, doc_lens) for i in range(model_cfg.n_layers))
    return 6 * n_matmul * sum(doc_lens) + core


def rank_batch_flops(model_cfg, n_matmul: int, batch: dict, cp: int) -> float:
    """This rank's share of the FLOPs of its micro-batch (``batch`` as trainer.batching.prepare_batch
    returns it: CP-local tokens, the rows' global ``cu_seqlens`` and ``seq_len``): the CP ranks of a
    data-parallel group hold the same rows, so each counts 1 / cp of them; summed over the world
    this is the FLOPs of every row trained on."""
    from models.ops.documents import doc_lengths

    lens = doc_lengths(batch["cu_seqlens"], batch["input_ids"].shape[0], batch["seq_len"])
    return batch_flops(model_cfg, n_matmul, lens) / cp


def _start_wandb(run_dir: str, cfg_dict: dict, wandb_cfg):
    """A wandb run, or None (with one line saying why): wandb is an optional extra and must
    never stop training."""
    try:
        import wandb
    except ImportError:
        print(
            "[longctx] wandb is not installed (pip install 'longctx[wandb]'): logging to "
            "metrics.jsonl only; set logger.wandb=false to silence this"
        )
        return None
    try:
        return wandb.init(
            project=wandb_cfg.project,
            name=wandb_cfg.name,
            dir=run_dir,
            mode=wandb_cfg.wandb_mode,
            config=cfg_dict,
            resume="allow",
            settings=wandb.Settings(silent=True),
        )
    except Exception as e:
        print(f"[longctx] wandb disabled: {e}")
        return None


class MetricsLogger:
    """One JSON row per log call in ``metrics.jsonl``. On resume from step S (``resumed_from``)
    the rows after S (and a stage's start evaluation at S), written by the run that crashed, move
    to ``metrics.superseded.jsonl`` and a
    ``{"step": S, "resumed_from": S}`` row marks the restart, so the file holds one curve. A run
    that starts from scratch (``resumed_from=None``) over the rows of one that died before its
    first checkpoint supersedes them all (marked ``resumed_from: 0``)."""

    def __init__(self, run_dir: str, cfg_dict: dict, is_main: bool, wandb_cfg, resumed_from: int | None = None):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if is_main and (resumed_from is not None or os.path.exists(self.path)):
            self._supersede(resumed_from)
        self.wandb = None
        if is_main and wandb_cfg.wandb and wandb_cfg.wandb_mode != "disabled":
            self.wandb = _start_wandb(run_dir, cfg_dict, wandb_cfg)

    def log(self, step: int, metrics: dict, console=print) -> None:
        if not self.is_main:
            return
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        text = " ".join(f"{k}={_fmt(v)}" for k, v in row.items())
        console(text)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _supersede(self, resumed: int | None) -> None:
        rows = open(self.path).read().splitlines() if os.path.exists(self.path) else []
        if resumed is None and not any(line.strip() for line in rows):
            return  # an empty file: nothing to supersede, nothing to mark
        step = 0 if resumed is None else resumed
        keep, old = [], []
        for line in rows:
            try:
                row = json.loads(line)
                # a stage's start evaluation at the resumed step came after that step's checkpoint;
                # from scratch, every row is the dead run's (its step-0 evaluation is redone too)
                later = (
                    resumed is None
                    or row.get("step", 0) > step
                    or (row.get("step") == step and row.get("at") == "start")
                )
                (old if later else keep).append(line)
            except ValueError:  # a row cut short by the crash
                old.append(line)
        keep.append(json.dumps({"step": step, "resumed_from": step, "superseded_rows": len(old)}))
        if old:
            with open(os.path.join(os.path.dirname(self.path), "metrics.superseded.jsonl"), "a") as f:
                f.write("\n".join(old) + "\n")
        with open(self.path + ".part", "w") as f:
            f.write("\n".join(keep) + "\n")
        os.replace(self.path + ".part", self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
