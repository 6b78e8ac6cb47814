"""Logging on the first rank: console, ``metrics.jsonl`` in the run dir, and wandb."""

from __future__ import annotations

import json
import os

import torch

# Dense bf16 peak FLOP/s by device name fragment (for MFU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model_cfg, n_params: int, seq_len: int) -> float:
    """6 * params (matmuls, fwd+bwd) + each layer's token-mixing core (fwd+bwd), as its mixer
    counts it (``core_flops_per_token``)."""
    from models.mixers import mixer_class

    core = sum(
        mixer_class(model_cfg.mixer_of(i)).core_flops_per_token(model_cfg, seq_len) for i in range(model_cfg.n_layers)
    )
    return 6 * n_params + core


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
    ``{"step": S, "resumed_from": S}`` row marks the restart, so the file holds one curve."""

    def __init__(self, run_dir: str, cfg_dict: dict, is_main: bool, wandb_cfg, resumed_from: int | None = None):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if is_main and resumed_from is not None:
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

    def _supersede(self, step: int) -> None:
        rows = open(self.path).read().splitlines() if os.path.exists(self.path) else []
        keep, old = [], []
        for line in rows:
            try:
                row = json.loads(line)
                # a stage's start evaluation at the resumed step came after that step's checkpoint
                later = row.get("step", 0) > step or (row.get("step") == step and row.get("at") == "start")
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
