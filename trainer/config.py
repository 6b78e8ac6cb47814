"""Structured (typed) configs: Hydra composes conf/, these dataclasses validate it.

``validate(cfg)`` runs on every rank before any collective, so a bad value stops every
rank with the same message instead of hanging a collective.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from models.config import ModelConfig


@dataclass
class CPConfig:
    size: int = 1  # ranks per context-parallel group
    # the CP strategy of each mixer kind (parallel/strategies); a kind not named here gets its
    # default. One CP group and one layout serve every kind (LASP-2H for hybrid models).
    strategies: dict[str, str] = field(default_factory=lambda: {"softmax": "allgather", "linear": "lasp2"})
    layout: str = "zigzag"  # contiguous | zigzag
    block: int = 256  # attention kernel block size
    # strategy options per mixer kind, e.g. {softmax: {ulysses_size: 2}, linear: {recompute: false}}
    options: dict[str, Any] = field(default_factory=lambda: {"softmax": {}, "linear": {}})
    strategy: str | None = None  # deprecated alias of strategies.softmax
    linear_strategy: str | None = None  # deprecated alias of strategies.linear

    def __post_init__(self):
        for old, kind in (("strategy", "softmax"), ("linear_strategy", "linear")):
            value = getattr(self, old)
            if value is not None:
                warnings.warn(
                    f"parallel.cp.{old} is deprecated: use parallel.cp.strategies.{kind}={value}",
                    FutureWarning,
                    stacklevel=2,
                )
                self.strategies = {**self.strategies, kind: value}
                setattr(self, old, None)


@dataclass
class ParallelConfig:
    cp: CPConfig = field(default_factory=CPConfig)
    dp_mode: str = "ddp"  # ddp | fsdp


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files
    paths: list[str] = field(default_factory=list)
    tokenizer: str = "byte"  # byte | hf
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
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0: no clipping (negative: rejected)


def _deepspeed_defaults() -> dict[str, Any]:
    # "auto": filled from this config (trainer.engines.deepspeed.ds_config); an explicit value
    # that disagrees with it is an error, never a silent second truth
    return {
        "train_micro_batch_size_per_gpu": "auto",  # data.micro_batch
        "gradient_accumulation_steps": "auto",  # trainer.grad_accum
        "gradient_clipping": "auto",  # optim.grad_clip
        "bf16": {"enabled": "auto"},  # trainer.precision=bf16
        "zero_optimization": {"stage": 1},
        "steps_per_print": 1000000000,  # longctx logs
        "wall_clock_breakdown": False,
    }


@dataclass
class EngineConfig:
    """The training engine (trainer/engines), chosen with the group ``engine=NAME`` or
    ``trainer.engine.name=NAME``."""

    name: str = "native"  # native (DDP / FSDP2 per parallel.dp_mode) | deepspeed | accelerate
    # DeepSpeed's JSON config as a Hydra node, every key an override, e.g.
    # trainer.engine.deepspeed.zero_optimization.stage=3. No "optimizer" section: the torch
    # AdamW of optim.* (or give one with "torch_adam": true); no "scheduler": optim.* schedules.
    deepspeed: dict[str, Any] = field(default_factory=_deepspeed_defaults)
    # let DeepSpeed JIT-compile C++ ops (its shared-memory comm op on CPU, C++ Adam, optimizer
    # offload): minutes each on first use. Off: those ops are skipped or refused with a message
    build_ops: bool = False


@dataclass
class TrainerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    steps: int = 100
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    run_dir: str | None = None  # None: the Hydra output dir. An existing run dir resumes.
    log_every: int = 10
    save_every: int = 100  # 0: only at the end and on signals
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_samples: int = 4
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps, for tests
    progress_bar: bool = True  # drawn only on a terminal; plain log lines otherwise
    nonfinite: str = "stop"  # non-finite loss or grad norm: stop (keep the last good
    # checkpoint) | skip (drop the update, count it)
    max_skips: int = 10  # with nonfinite=skip: the most steps skipped; one more stops


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
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
    init_from: str | None = None  # local Hugging Face checkpoint directory to start from


SCHEMA_NAME = "train_schema"


def register_schema() -> None:
    """Make TrainConfig the base of ``conf/train.yaml`` (its first default): every yaml group
    then holds only overrides of these dataclass defaults, and Hydra checks keys and types of
    every override while composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def conf_dir() -> str:
    """The directory of the Hydra config groups: ``conf/`` beside the packages in a source
    checkout, ``trainer/conf`` in an installed wheel (pyproject maps one onto the other)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "conf"), os.path.join(os.path.dirname(here), "conf")):
        if os.path.isfile(os.path.join(candidate, "train.yaml")):
            return candidate
    raise FileNotFoundError(f"no Hydra config directory (train.yaml) next to {here}: reinstall longctx")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is unknown: choose one of {tuple(options)}")


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Check everything that can be checked locally; raise ValueError naming the setting."""
    from parallel.mesh import check_world

    m, p, d, o, t = cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.trainer
    m.validate()
    check_world(world_size, p.cp.size)
    _choice("parallel.dp_mode", p.dp_mode, ("ddp", "fsdp"))
    strategies = cp_strategies(cfg)
    for length in [d.seq_len, *t.passkey_lengths]:
        for kind, strategy in strategies.items():
            try:
                strategy.check(
                    n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, cp=p.cp.size, seq_len=length, layout=p.cp.layout
                )
            except ValueError as e:
                msg = f"{e} (parallel.cp.strategies.{kind}={strategy.name!r} serves the {kind} layers)"
                if length != d.seq_len:
                    msg = f"trainer.passkey_lengths has {length}: " + msg.replace("data.seq_len", "each passkey length")
                raise ValueError(msg) from None
    _choice("data.source", d.source, ("stdlib", "files"))
    _choice("data.tokenizer", d.tokenizer, ("byte", "hf"))
    if d.tokenizer == "hf" and (not d.tokenizer_path or not os.path.isdir(d.tokenizer_path)):
        raise ValueError(
            f"data.tokenizer_path={d.tokenizer_path!r} does not exist: point it at a "
            "local directory holding a Hugging Face tokenizer, or set data.tokenizer=byte"
        )
    if d.source == "files":
        if not d.paths:
            raise ValueError("data.source=files needs data.paths: give a list of .txt/.jsonl files or dirs")
        for path in d.paths:
            if not os.path.exists(path):
                raise ValueError(f"data.paths has {path!r}, which does not exist: fix the path")
    if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
        raise ValueError(
            f"init_from={cfg.init_from!r} is not a directory: give a local Hugging Face "
            "checkpoint directory (config.json + *.safetensors), or set init_from=null"
        )
    elif d.tokenizer == "hf" and not any(os.path.exists(os.path.join(d.tokenizer_path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"data.tokenizer_path={d.tokenizer_path!r} holds no tokenizer (none of "
            f"{', '.join(_TOKENIZER_FILES)}): point it at a Hugging Face tokenizer "
            "directory, or set data.tokenizer=byte"
        )
    _choice("optim.schedule", o.schedule, ("cosine", "constant"))
    if not o.lr > 0:
        raise ValueError(f"optim.lr={o.lr} must be > 0: set a positive learning rate, e.g. optim.lr=3e-4")
    if not o.grad_clip >= 0:
        raise ValueError(
            f"optim.grad_clip={o.grad_clip} must be >= 0: give the max gradient norm, or 0 to turn clipping off"
        )
    _choice("trainer.nonfinite", t.nonfinite, ("stop", "skip"))
    _choice("trainer.engine.name", t.engine.name, ("native", "deepspeed", "accelerate"))
    if t.engine.name != "native":
        from trainer.engines import check_engine

        check_engine(cfg)
    _choice("trainer.precision", t.precision, ("fp32", "bf16"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    for name, val in (
        ("data.seq_len", d.seq_len),
        ("data.micro_batch", d.micro_batch),
        ("trainer.steps", t.steps),
        ("trainer.grad_accum", t.grad_accum),
        ("trainer.log_every", t.log_every),
        ("trainer.max_skips", t.max_skips),
    ):
        if val < 1:
            raise ValueError(f"{name}={val} must be >= 1")


def cp_strategies(cfg: TrainConfig) -> dict:
    """{mixer kind: strategy} for the kinds the model uses, from ``parallel.cp.strategies`` and
    ``parallel.cp.options``; ValueError naming the setting for an unknown kind or strategy."""
    from models.mixers import KINDS
    from parallel.strategies import build_strategies

    cp = cfg.parallel.cp
    for setting, keys in (("parallel.cp.strategies", cp.strategies), ("parallel.cp.options", cp.options)):
        for key in keys:
            if key not in KINDS:
                hint = (
                    f"; options are per mixer kind now: use parallel.cp.options.softmax.{key}"
                    if setting.endswith("options")
                    else ""
                )
                raise ValueError(f"{setting} has {key!r}, which is not a mixer kind: use one of {sorted(KINDS)}{hint}")
    for kind, opts in cp.options.items():
        if opts is not None and not isinstance(opts, dict):
            raise ValueError(
                f"parallel.cp.options.{kind}={opts!r} must be a mapping of strategy "
                f"options, e.g. parallel.cp.options.{kind}={{}}"
            )
    return build_strategies(cp.strategies, cp.options, cfg.model.kinds())
