"""Structured (typed) configs: Hydra composes conf/, these dataclasses validate it.

``validate(cfg)`` runs on every rank before any collective, so a bad value stops every
rank with the same message instead of hanging a collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from models.config import ModelConfig


@dataclass
class CPConfig:
    size: int = 1                   # ranks per context-parallel group
    strategy: str = "allgather"     # see parallel/strategies
    layout: str = "zigzag"          # contiguous | zigzag
    block: int = 256                # attention kernel block size
    options: dict[str, Any] = field(default_factory=dict)   # strategy options, e.g. ulysses_size
    linear_strategy: str = "lasp2"  # CP strategy of linear-attention layers (lasp2 | lasp1)


@dataclass
class ParallelConfig:
    cp: CPConfig = field(default_factory=CPConfig)
    dp_mode: str = "ddp"            # ddp | fsdp


@dataclass
class DataConfig:
    source: str = "stdlib"          # stdlib | files
    paths: list[str] = field(default_factory=list)
    tokenizer: str = "byte"         # byte | hf
    tokenizer_path: str | None = None
    seq_len: int = 512
    micro_batch: int = 1
    val_fraction: float = 0.02
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"        # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 100
    grad_accum: int = 1
    precision: str = "fp32"         # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    run_dir: str | None = None      # None: the Hydra output dir. An existing run dir resumes.
    log_every: int = 10
    save_every: int = 100           # 0: only at the end and on signals
    keep_checkpoints: int = 2
    eval_every: int = 0             # 0: only at the end
    eval_batches: int = 4
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_samples: int = 4
    stop_after: int | None = None   # stop (with a checkpoint) after this many steps, for tests
    progress_bar: bool = True


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"     # offline | online | disabled
    project: str = "longctx"
    name: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: str = "default"
    init_from: str | None = None    # local Hugging Face checkpoint directory to start from


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is unknown: choose one of {tuple(options)}")


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Check everything that can be checked locally; raise ValueError naming the setting."""
    from parallel.mesh import check_world
    from parallel.strategies import build_strategy
    m, p, d, o, t = cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.trainer
    m.validate()
    check_world(world_size, p.cp.size)
    _choice("parallel.dp_mode", p.dp_mode, ("ddp", "fsdp"))
    build_strategy(p.cp.strategy, **p.cp.options).check(n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, cp=p.cp.size,
                                        seq_len=d.seq_len, layout=p.cp.layout)
    if any(m.mixer_of(i) != "softmax" for i in range(m.n_layers)):
        try:
            build_strategy(p.cp.linear_strategy).check(n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                                       cp=p.cp.size, seq_len=d.seq_len, layout=p.cp.layout)
        except ValueError as e:
            raise ValueError(f"{e} (parallel.cp.linear_strategy={p.cp.linear_strategy!r} serves the "
                             "model's linear-attention layers)") from None
    _choice("data.source", d.source, ("stdlib", "files"))
    _choice("data.tokenizer", d.tokenizer, ("byte", "hf"))
    if d.tokenizer == "hf" and (not d.tokenizer_path or not os.path.isdir(d.tokenizer_path)):
        raise ValueError(f"data.tokenizer_path={d.tokenizer_path!r} does not exist: point it at a "
                         "local directory holding a Hugging Face tokenizer, or set data.tokenizer=byte")
    if d.source == "files":
        if not d.paths:
            raise ValueError("data.source=files needs data.paths: give a list of .txt/.jsonl files or dirs")
        for path in d.paths:
            if not os.path.exists(path):
                raise ValueError(f"data.paths has {path!r}, which does not exist: fix the path")
    if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
        raise ValueError(f"init_from={cfg.init_from!r} is not a directory: give a local Hugging Face "
                         "checkpoint directory (config.json + *.safetensors), or set init_from=null")
    _choice("optim.schedule", o.schedule, ("cosine", "constant"))
    _choice("trainer.precision", t.precision, ("fp32", "bf16"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    for name, val in (("data.seq_len", d.seq_len), ("data.micro_batch", d.micro_batch),
                      ("trainer.steps", t.steps), ("trainer.grad_accum", t.grad_accum)):
        if val < 1:
            raise ValueError(f"{name}={val} must be >= 1")
    for length in t.passkey_lengths:
        try:
            build_strategy(p.cp.strategy, **p.cp.options).check(n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                                cp=p.cp.size, seq_len=length, layout=p.cp.layout)
        except ValueError as e:
            raise ValueError(f"trainer.passkey_lengths has {length}: {e}".replace(
                "data.seq_len", "each passkey length")) from None
