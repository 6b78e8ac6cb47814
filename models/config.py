"""Model configuration (a plain dataclass; Hydra's structured config reuses it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.registry import mixer_class, validate_options
from models.rope import ROPE_TYPES, RopeConfig


@dataclass
class ModelConfig:
    vocab_size: int = 257
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default dim // n_heads
    ffn_dim: int | None = None  # default 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 uses q/k/v biases
    mixer_pattern: list[str] = field(default_factory=lambda: ["softmax"])  # cycled over layers
    sliding_window: int | None = None  # softmax layers; None = full causal
    # softmax layers' mask family instead of causal packed documents (ops/attention/slices.py):
    # a builder name (prefix_lm, shared_question, block_causal, longlora, ...) and its parameters,
    # e.g. model.mask=prefix_lm '+model.mask_args={prefix:128}' (+: new keys of the dict); None: causal
    # packed documents
    mask: str | None = None
    mask_args: dict = field(default_factory=dict)
    rope: RopeConfig = field(default_factory=RopeConfig)
    init_std: float = 0.02
    # Mixer options, one flat key per field of the options dataclass its mixer module registers
    # (models.registry.register_options); None: that dataclass's default, which lives there once.
    # linear-attention mixers: models/linear_attention.py LinearOptions
    linear_feature_map: str | None = None  # identity | relu | elu1 | silu | learnable | hedgehog
    linear_output_norm: bool | None = None
    linear_output_gate: bool | None = None
    linear_rope: bool | None = None
    linear_normalize: bool | None = None  # divide by phi(q) . sum phi(k) (LoLCATs / Hedgehog)
    linear_chunk_size: int | None = None
    linear_impl: str | None = None  # auto | chunk | naive
    linear_gate_normalizer: float | None = None
    linear_gate_low_rank: int | None = None
    # S2 sparse attention (mixer s2): models/s2_attention.py S2Options
    s2_block: int | None = None  # tokens per block (>= 16)
    s2_stride: int | None = None  # each head sees every s2_stride-th key block (1: dense)
    s2_local: int | None = None  # local blocks every head sees (the diagonal block included)
    s2_dense_heads: list[int] | None = None  # KV heads that stay dense
    s2_n_dense_heads: int | None = None  # DKernel's num_dense_heads: the last KV heads stay dense
    s2_offsets: list[int] | None = None  # explicit per-KV-head offsets
    s2_homogeneous: bool | None = None  # every head the same offset
    s2_head_step: str | None = None  # dkernel (step from the query heads) | spread (from the KV heads)
    s2_layer_offset: str | None = None  # an integer for every layer (default 0) | layer (the layer index)
    s2_doc_blocks: str | None = None  # document (blocks restart per document) | row
    # multi-head latent attention (mixer mla, DeepSeek-V2/V3): models/mla_attention.py MLAOptions
    mla_q_lora_rank: int | None = None  # None: full-rank q_proj
    mla_kv_lora_rank: int | None = None  # latent width Dc (None: 4 * head_dim)
    mla_qk_nope_head_dim: int | None = None  # None: head_dim
    mla_qk_rope_head_dim: int | None = None  # shared RoPE key width (None: head_dim)
    mla_v_head_dim: int | None = None  # None: head_dim
    mla_latent_norm: bool | None = None  # RMSNorm on the latents (DeepSeek: true)
    mla_latent_norm_eps: float | None = None
    mla_mscale_all_dim: float | None = None  # DeepSeek YaRN softmax-scale mscale
    # two-kind layers (mixers liger, lolcats, lizard): models/hybrid_attention.py HybridOptions
    hybrid_window: int | None = None  # keys of the softmax window branch, self included (64)
    hybrid_window_factor_init: float | None = None  # lolcats: logit of the window weight
    hybrid_meta_tokens: int | None = None  # lizard: learned meta-memory tokens (4)
    # landmark attention (mixer landmark): models/landmark_attention.py LandmarkOptions
    landmark_every: int | None = None  # regular tokens per block, its landmark after them (50)

    def __post_init__(self):
        self.validate()

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def mixer_of(self, layer: int) -> str:
        return self.mixer_pattern[layer % len(self.mixer_pattern)]

    def kind_of(self, layer: int) -> str:
        """The (primary) mixer kind (``softmax``, ``linear``, ...) of layer ``layer``."""
        return mixer_class(self.mixer_of(layer)).kind

    def kinds_of(self, layer: int) -> tuple[str, ...]:
        """Every mixer kind layer ``layer`` calls (two for a layer such as liger's)."""
        return mixer_class(self.mixer_of(layer)).kinds

    def kinds(self) -> list[str]:
        """The mixer kinds the model's layers call, in layer order, each once."""
        return list(dict.fromkeys(k for i in range(self.n_layers) for k in self.kinds_of(i)))

    def _validate_mask(self) -> None:
        from models.ops.attention.slices import check_recipe

        if self.mask is None:
            if self.mask_args:
                raise ValueError(
                    f"model.mask_args={dict(self.mask_args)} is set but model.mask is null: set model.mask"
                )
            return
        check_recipe(self.mask, dict(self.mask_args))
        if self.sliding_window is not None:
            raise ValueError(
                f"model.sliding_window={self.sliding_window} and model.mask={self.mask} are both set: "
                "use the mask builder sliding_window (or global_sliding_window) instead"
            )
        if self.mask in ("longlora", "sinklora") and self.n_heads % 2:
            raise ValueError(
                f"model.mask={self.mask} shifts half of the heads: model.n_heads={self.n_heads} must be even"
            )
        other = sorted({m for m in self.mixer_pattern if mixer_class(m).kind not in ("softmax", "linear")})
        if other:
            raise ValueError(
                f"model.mask={self.mask} applies to softmax layers; mixers {other} have their own masks: "
                "drop model.mask or those mixers from model.mixer_pattern"
            )

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1: set a positive value")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                f"{self.n_kv_heads}: choose n_kv_heads among the divisors of n_heads"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: "
                "change one, or set model.head_dim explicitly"
            )
        if not self.mixer_pattern:
            raise ValueError("model.mixer_pattern is empty: give at least one mixer, e.g. [softmax]")
        for m in self.mixer_pattern:
            mixer_class(m)  # ValueError naming model.mixer_pattern for an unknown mixer
        if self.rope.type not in ROPE_TYPES:
            raise ValueError(f"model.rope.type={self.rope.type!r} is unknown: choose none, linear, ntk, yarn or llama3")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 1 or null")
        self._validate_mask()
        validate_options(self)  # each mixer module checks its own model.<prefix>_* settings
