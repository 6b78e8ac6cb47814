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
    size: int = 1  # ranks per context-parallel group
    # the CP strategy of each mixer kind (parallel/strategies); a kind not named here gets its
    # default. One CP group and one layout serve every kind (LASP-2H for hybrid models).
    strategies: dict[str, str] = field(default_factory=lambda: {"softmax": "allgather", "linear": "lasp2"})
    layout: str = "zigzag"  # contiguous | zigzag
    block: int = 256  # attention kernel block size
    # strategy options per mixer kind, e.g. {softmax: {ulysses_size: 2}, linear: {recompute: false}}
    # (each strategy's Options dataclass, parallel/strategies/*.py, lists its keys and defaults)
    options: dict[str, Any] = field(default_factory=lambda: {"softmax": {}, "linear": {}})


@dataclass
class ParallelConfig:
    cp: CPConfig = field(default_factory=CPConfig)
    dp_mode: str = "ddp"  # ddp | fsdp


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | prepared (python -m trainer.prepare; trainer/data/prepared.py)
    # | sft (prompt/completion jsonl in data.paths, or generated examples: trainer/data/sft.py)
    paths: list[str] = field(default_factory=list)
    tokenizer: str = "byte"  # byte | hf
    tokenizer_path: str | None = None
    seq_len: int = 512
    micro_batch: int = 1
    val_fraction: float = 0.02
    seed: int = 0
    # training mix (trainer/data/mix.py; the validation split stays natural):
    long_min_chars: int = 4096  # documents of at least this many characters count as long
    long_ratio: float | None = None  # share of training characters from long documents after
    # up- (or down-)sampling them, ProLong-style (e.g. 0.6); None: the corpus as it is
    passkey_fraction: float = 0.0  # synthetic passkey documents added, per corpus document
    passkey_doc_chars: list[int] = field(default_factory=lambda: [256, 512])  # their lengths (drawn)
    # share of passkey documents with the needle at an end (first, or right before the question: the
    # evaluation's depths 0 and 1), the rest at a uniform depth, which reaches the ends about once in
    # a few hundred documents
    passkey_edge_fraction: float = 0.0
    mqar_fraction: float = 0.0  # synthetic key-value recall documents added, per corpus document
    mqar_doc_chars: list[int] = field(default_factory=lambda: [256, 512])  # their lengths (drawn)
    mqar_pairs: int = 4  # named keys per recall document, each queried once at its end
    copy_fraction: float = 0.0  # synthetic copy documents (a random string repeated) per corpus document
    copy_doc_chars: list[int] = field(default_factory=lambda: [10, 40])  # [min, max] of the string's length
    copy_repeats: list[int] = field(default_factory=lambda: [2, 4])  # [min, max] times it is written
    # prepared data: a mixture [{name, paths, weight, long_ratio, long_min_tokens}]; empty: data.paths
    sources: list[dict[str, Any]] = field(default_factory=list)
    # stream (documents cut at row ends) | best_fit (whole documents, padded rows) | grouped (best_fit's
    # rows, grouped by attention work into steps so that data-parallel ranks wait less on each other)
    packing: str = "stream"
    num_workers: int = 2  # DataLoader worker processes building prepared batches (0: in the trainer)
    # prompt/completion data (data.source=sft): how softmax layers see the prompt
    # (models/ops/attention/segments.py): causal | prefix_lm (prompt bidirectional) | shared_question
    # (the completions of one prompt packed after it, each seeing the prompt and itself)
    mask: str = "causal"
    sft_examples: int = 3000  # generated examples when data.source=sft has no data.paths


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
    ``trainer.engine.name=NAME``. Every other field belongs to the engines that list it in their
    ``settings``; changing one while another engine runs is an error, not silently ignored."""

    name: str = "native"  # a registered engine (trainer/engines): native (DDP / FSDP2 per
    # parallel.dp_mode) | deepspeed | accelerate
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
    loss_chunk_tokens: int = 0  # > 0: final norm -> lm_head -> cross-entropy this many tokens at a
    # time, never holding the [tokens, vocab] logits (models/ops/cross_entropy.py; exact, recomputes
    # each chunk's logits in backward); 0: full logits. For long rows, e.g. 4096
    peak_tflops: float | None = None  # per-device peak for MFU, TFLOP/s; None: the dense bf16 peak
    # of a known GPU (trainer/metrics.py), or an estimate of 0.1 per CPU thread on CPU
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    run_dir: str | None = None  # None: the Hydra output dir. An existing run dir resumes.
    log_every: int = 10
    save_every: int = 100  # 0: only at the end and on signals
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_samples: int = 4  # per (length, depth) cell
    passkey_depths: list[float] = field(default_factory=list)  # needle depths (0 = start); empty:
    # passkey_samples depths spread evenly, reported as one accuracy per length
    eval_position_buckets: int = 0  # > 0: held-out loss by position in the document, this many
    # equal buckets over [0, data.seq_len) (the long-context perplexity curve)
    mqar_lengths: list[int] = field(default_factory=list)  # multi-query associative recall lengths
    mqar_pairs: int = 8  # key-value pairs per MQAR example
    mqar_samples: int = 4
    mqar_format: str = "tokens"  # tokens: Zoology's synthetic vocabulary (ids, no training data
    # needed in that format) | text: the key-value sentences data.mqar_fraction documents train
    copy_lengths: list[int] = field(default_factory=list)  # held-out copying: string lengths (characters)
    copy_samples: int = 8  # random strings per length
    copy_repeats: int = 2  # times each is written (every writing after the first is scored)
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
class StageConfig:
    """One stage of a recipe (trainer/stages.py). Its settings are the run's settings with
    ``overrides`` merged on top (any TrainConfig keys, nested: ``{data: {seq_len: 2048}}``)."""

    name: str = "stage"
    steps: int = 100  # this stage's optimizer steps (sets trainer.steps: lr warmup restarts)
    overrides: dict[str, Any] = field(default_factory=dict)
    train_params: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names
    # that train (e.g. ["*.q_map.*", "*.k_map.*"]); empty: all
    objective: str = "next_token"  # a registered objective (trainer/objectives): next_token (alias
    # lm) | attention_transfer (each linear layer's output matches the softmax attention of its
    # own projections, MSE, layer-wise; LoLCATs stage 1)
    optimizer: str = "reset"  # reset | keep (carry AdamW moments of same-name, same-shape params)
    expand_kv: bool = True  # new k/v projections wider than the previous stage's (GQA softmax ->
    # linear mixers, which have no GQA) start as each kv head repeated; false: fresh init
    lora_rank: int = 0  # > 0: LoRA factors on lora_targets (models/lora.py), merged at stage end
    lora_alpha: float = 16.0  # LoRA scale alpha / rank
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    start_from: str | None = None  # the name of an earlier stage whose final weights this stage
    # starts from (a branch: several conversions of one teacher in one run); None: the stage before


@dataclass
class RecipeConfig:
    """A run as a list of stages (conf/recipe/*.yaml, ``recipe=NAME``); empty: one stage, the run's
    own settings. The stages share one run dir; checkpoints record the stage and its step."""

    name: str | None = None
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    experiment: str = "default"
    init_from: str | None = None  # start from a local Hugging Face checkpoint directory, or from
    # the newest complete checkpoint of a longctx run dir (weights only, carried as between stages)


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


_KV_PAIR_BYTES = 68  # byte tokenizer: a text MQAR needle, query and answer
_PASSKEY_MIN_BYTES = 105  # byte tokenizer: needle and question (98 tokens) + the answer " NNNNN." (7)
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
    for length in [d.seq_len, *t.passkey_lengths, *t.mqar_lengths]:
        for kind, strategy in strategies.items():
            try:
                strategy.check(
                    n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, cp=p.cp.size, seq_len=length, layout=p.cp.layout
                )
            except ValueError as e:
                msg = f"{e} (parallel.cp.strategies.{kind}={strategy.name!r} serves the {kind} layers)"
                if length != d.seq_len:
                    which = "passkey" if length in t.passkey_lengths else "mqar"
                    msg = msg.replace("data.seq_len", f"each {which} length")
                    msg = f"trainer.{which}_lengths has {length}: " + msg
                raise ValueError(msg) from None
    _choice("data.source", d.source, ("stdlib", "files", "prepared", "sft"))
    _check_data_mask(cfg)
    from trainer.data.prepared import check_config

    check_config(d)
    _choice("data.tokenizer", d.tokenizer, ("byte", "hf"))
    if d.tokenizer == "hf" and (not d.tokenizer_path or not os.path.isdir(d.tokenizer_path)):
        raise ValueError(
            f"data.tokenizer_path={d.tokenizer_path!r} does not exist: point it at a "
            "local directory holding a Hugging Face tokenizer, or set data.tokenizer=byte"
        )
    if d.source in ("files", "sft"):
        if not d.paths and d.source == "files":
            raise ValueError("data.source=files needs data.paths: give a list of .txt/.jsonl files or dirs")
        for path in d.paths:
            if not os.path.exists(path):
                raise ValueError(f"data.paths has {path!r}, which does not exist: fix the path")
    if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
        raise ValueError(
            f"init_from={cfg.init_from!r} is not a directory: give a local Hugging Face "
            "checkpoint directory (config.json + *.safetensors) or a longctx run dir, or set init_from=null"
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
    from trainer.engines import check_engine

    check_engine(cfg)  # the name, then the engine's own checks
    _choice("trainer.precision", t.precision, ("fp32", "bf16"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    for name, val in (
        ("data.seq_len", d.seq_len),
        ("data.micro_batch", d.micro_batch),
        ("trainer.steps", t.steps),
        ("trainer.grad_accum", t.grad_accum),
        ("trainer.log_every", t.log_every),
        ("trainer.max_skips", t.max_skips),
        ("trainer.passkey_samples", t.passkey_samples),
        ("trainer.copy_samples", t.copy_samples),
        *(("trainer.copy_lengths", n) for n in t.copy_lengths),
    ):
        if val < 1:
            raise ValueError(f"{name}={val} must be >= 1")
    if t.loss_chunk_tokens < 0:
        raise ValueError(
            f"trainer.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0: tokens per loss chunk, or 0 for full logits"
        )
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ValueError(
            f"trainer.peak_tflops={t.peak_tflops} must be > 0: the device's peak TFLOP/s, or null to look it up"
        )
    if d.tokenizer == "byte" and t.passkey_lengths and min(t.passkey_lengths) < _PASSKEY_MIN_BYTES:
        raise ValueError(
            f"trainer.passkey_lengths has {min(t.passkey_lengths)}: a passkey prompt needs at least "
            f"{_PASSKEY_MIN_BYTES} tokens (needle, question, answer): use longer lengths"
        )
    for depth in t.passkey_depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"trainer.passkey_depths has {depth}: depths are fractions in [0, 1]")
    if d.long_ratio is not None and not 0.0 < d.long_ratio < 1.0:
        raise ValueError(f"data.long_ratio={d.long_ratio} must be in (0, 1), or null for the natural mix")
    if not 0.0 <= d.passkey_edge_fraction <= 1.0:
        raise ValueError(f"data.passkey_edge_fraction={d.passkey_edge_fraction} must be in [0, 1]")
    if d.passkey_fraction < 0 or (d.passkey_fraction > 0 and not d.passkey_doc_chars):
        raise ValueError("data.passkey_fraction must be >= 0 and needs data.passkey_doc_chars, e.g. [256, 512]")
    if d.mqar_fraction < 0 or (d.mqar_fraction > 0 and not d.mqar_doc_chars):
        raise ValueError("data.mqar_fraction must be >= 0 and needs data.mqar_doc_chars, e.g. [256, 512]")
    if d.copy_fraction < 0:
        raise ValueError(f"data.copy_fraction={d.copy_fraction} must be >= 0")
    for key, lo in (("copy_doc_chars", 1), ("copy_repeats", 2)):
        v = list(getattr(d, key))
        if len(v) != 2 or not lo <= v[0] <= v[1]:
            raise ValueError(f"data.{key}={v} must be [min, max] with {lo} <= min <= max")
    if t.copy_repeats < 2:
        raise ValueError(f"trainer.copy_repeats={t.copy_repeats} must be >= 2: the first writing is the one to copy")
    from trainer.data.synthetic import COPY_SEP

    need = max(t.copy_lengths, default=0) * t.copy_repeats + len(COPY_SEP) * (t.copy_repeats - 1)
    if d.tokenizer == "byte" and t.copy_lengths and need > d.seq_len:
        raise ValueError(
            f"trainer.copy_lengths has {max(t.copy_lengths)}: {t.copy_repeats} writings (trainer.copy_repeats) "
            f"take {need} tokens, more than data.seq_len={d.seq_len}"
        )
    if d.mqar_pairs < 1:
        raise ValueError(f"data.mqar_pairs={d.mqar_pairs} must be >= 1: keys per recall document")
    _choice("trainer.mqar_format", t.mqar_format, ("tokens", "text"))
    need = _KV_PAIR_BYTES * t.mqar_pairs
    if t.mqar_format == "text" and d.tokenizer == "byte" and t.mqar_lengths and min(t.mqar_lengths) < need:
        raise ValueError(
            f"trainer.mqar_lengths has {min(t.mqar_lengths)}: {t.mqar_pairs} text key-value pairs "
            f"(trainer.mqar_pairs) need at least {need} tokens: raise the length or lower the pairs"
        )


def _check_data_mask(cfg: TrainConfig) -> None:
    """data.mask: known, only with prompt/completion data, not beside another softmax mask."""
    from models.ops.attention.segments import DATA_MASKS
    from models.registry import mixer_class

    d, m = cfg.data, cfg.model
    if m.mask is not None:  # the configured mask over one row of data.seq_len: bad parameters stop here
        from models.ops.attention.slices import MaskRecipe

        group = dict(m.mask_args).get("group")
        if m.mask in ("longlora", "sinklora") and group is not None and group >= d.seq_len:
            raise ValueError(
                f"model.mask_args.group={group} covers the whole row (data.seq_len={d.seq_len}): S^2-Attn would be "
                f"plain causal attention; use a group of data.seq_len / 4 (LongLoRA), e.g. {max(2, d.seq_len // 4)}"
            )
        try:
            MaskRecipe.of(m.mask, dict(m.mask_args)).build(1, d.seq_len, None, m.n_heads)
        except ValueError as e:
            raise ValueError(f"model.mask={m.mask} with model.mask_args={dict(m.mask_args)}: {e}") from None
    _choice("data.mask", d.mask, DATA_MASKS)
    if d.source == "sft" and d.sft_examples < 1 and not d.paths:
        raise ValueError(f"data.sft_examples={d.sft_examples} must be >= 1 (or give data.paths)")
    mix = {"long_ratio": d.long_ratio, "passkey_fraction": d.passkey_fraction, "mqar_fraction": d.mqar_fraction}
    mix = {k: v for k, v in {**mix, "copy_fraction": d.copy_fraction}.items() if v}
    if d.source == "sft" and mix:
        raise ValueError(
            f"data.source=sft packs prompt/completion examples whole; the text mix {mix} does not apply: "
            "drop " + ", ".join(f"data.{k}" for k in mix)
        )
    if d.mask == "causal":
        return
    if d.source != "sft":
        raise ValueError(
            f"data.mask={d.mask} needs prompt/completion data, but data.source={d.source} has no prompts: "
            "set data.source=sft (jsonl {prompt, completion} or {messages} in data.paths) or data.mask=causal"
        )
    for name, value in (("model.mask", m.mask), ("model.sliding_window", m.sliding_window)):
        if value is not None:
            raise ValueError(f"data.mask={d.mask} and {name}={value} both mask softmax attention: drop one")
    other = sorted({x for x in m.mixer_pattern if mixer_class(x).kind not in ("softmax", "linear")})
    if other:
        raise ValueError(
            f"data.mask={d.mask} applies to softmax layers; mixers {other} have their own masks: "
            "use data.mask=causal or drop those mixers from model.mixer_pattern"
        )


def reject_unknown_keys(node, schema: type, prefix: str) -> None:
    """A key the dataclass ``schema`` lacks (e.g. added with ``+optim.lrr=1``) is a typo:
    ValueError naming it, instead of being dropped silently."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key == "hydra":
            continue
        if key not in fields:
            raise ValueError(
                f"{prefix}{key} is not a setting: remove it or fix its spelling "
                f"({prefix[:-1] or 'the root'} has: {', '.join(fields)})"
            )
        sub = typing.get_type_hints(schema).get(key)
        if dataclasses.is_dataclass(sub) and OmegaConf.is_dict(node[key]):
            reject_unknown_keys(node[key], sub, f"{prefix}{key}.")


def cp_strategies(cfg: TrainConfig, extra_kinds: tuple[str, ...] = ()) -> dict:
    """{mixer kind: strategy} for the kinds the model uses, from ``parallel.cp.strategies`` and
    ``parallel.cp.options``; ValueError naming the setting for an unknown kind or strategy."""
    from models.registry import mixer_kinds
    from parallel.strategies import build_strategies

    kinds, cp = mixer_kinds(), cfg.parallel.cp
    for setting, keys in (("parallel.cp.strategies", cp.strategies), ("parallel.cp.options", cp.options)):
        for key in keys:
            if key not in kinds:
                hint = (
                    f"; options are per mixer kind now: use parallel.cp.options.softmax.{key}"
                    if setting.endswith("options")
                    else ""
                )
                raise ValueError(f"{setting} has {key!r}, which is not a mixer kind: use one of {kinds}{hint}")
    for kind, opts in cp.options.items():
        if opts is not None and not isinstance(opts, dict):
            raise ValueError(
                f"parallel.cp.options.{kind}={opts!r} must be a mapping of strategy "
                f"options, e.g. parallel.cp.options.{kind}={{}}"
            )
    used = cfg.model.kinds() + [k for k in extra_kinds if k not in cfg.model.kinds()]
    return build_strategies(cp.strategies, cp.options, used)
