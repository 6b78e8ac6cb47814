"""Model configuration (a plain dataclass; Hydra's structured config reuses it)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    rope: RopeConfig = field(default_factory=RopeConfig)
    init_std: float = 0.02
    # linear-attention mixers (models/linear_attention.py); None = the mixer's own default
    linear_feature_map: str | None = None  # identity | relu | elu1 | silu | learnable | hedgehog
    linear_output_norm: bool | None = None
    linear_output_gate: bool | None = None
    linear_rope: bool | None = None
    linear_normalize: bool | None = None  # divide by phi(q) . sum phi(k) (linear attention's
    # softmax denominator, as LoLCATs / Hedgehog use); needs positive feature maps
    linear_chunk_size: int = 64
    linear_impl: str = "auto"  # auto | chunk | naive
    linear_gate_normalizer: float = 16.0
    linear_gate_low_rank: int = 16
    # S2 sparse attention (mixer s2, models/s2_pattern.py): per KV head a strided subset of
    # key blocks plus `s2_local` local blocks; the layer offset is the layer index by default
    s2_block: int = 64  # tokens per block (>= 16)
    s2_stride: int = 8  # each head sees every s2_stride-th key block (1: dense)
    s2_local: int = 1  # local blocks every head sees (the diagonal block included)
    s2_dense_heads: list[int] = field(default_factory=list)  # KV heads that stay dense
    s2_offsets: list[int] | None = None  # explicit per-KV-head offsets (default h * max(1, stride // Hkv))
    s2_homogeneous: bool = False  # every head the same offset
    s2_layer_offset: int | None = None  # None: the layer index

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
        """The mixer kind (``softmax``, ``linear``, ...) of layer ``layer``."""
        from models.mixers import mixer_class

        return mixer_class(self.mixer_of(layer)).kind

    def kinds(self) -> list[str]:
        """The mixer kinds the model's layers use, in layer order, each once."""
        return list(dict.fromkeys(self.kind_of(i) for i in range(self.n_layers)))

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
        from models.mixers import MIXERS

        for m in self.mixer_pattern:
            if m not in MIXERS:
                raise ValueError(f"model.mixer_pattern has unknown mixer {m!r}: choose from {sorted(MIXERS)}")
        if self.rope.type not in ROPE_TYPES:
            raise ValueError(f"model.rope.type={self.rope.type!r} is unknown: choose none, linear, ntk, yarn or llama3")
        if self.linear_impl not in ("auto", "chunk", "naive"):
            raise ValueError(f"model.linear_impl={self.linear_impl!r} is unknown: choose auto, chunk or naive")
        maps = ("identity", "relu", "elu1", "silu", "learnable", "hedgehog")
        if self.linear_feature_map is not None and self.linear_feature_map not in maps:
            raise ValueError(f"model.linear_feature_map={self.linear_feature_map!r} is unknown: choose one of {maps}")
        if self.linear_chunk_size < 1:
            raise ValueError(f"model.linear_chunk_size={self.linear_chunk_size} must be >= 1")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 1 or null")
        if self.s2_local < 1:
            raise ValueError(f"model.s2_local={self.s2_local} must be >= 1 (every token sees its own block)")
        if "s2" in self.mixer_pattern:  # builds (and checks) the pattern; warns if heads leave blocks unseen
            from models.s2_attention import layer_pattern

            layer_pattern(self, 0)
