"""S2 block-sparse attention patterns (heterogeneous context sharding among heads).

Every position is a *row position* (its place in the unsharded packed row), so a pattern
means the same thing on one device and under any context-parallel layout. With block size
``b``, query block ``i = q_pos // b`` and key block ``j = k_pos // b``, KV head ``hk``:

    active(i, j, hk) = j <= i and (dense(hk) or i - j < local or (j + offset(hk)) % stride == 0)
    offset(hk)       = offsets[hk] if given, else off if homogeneous, else hk * step + off
    step             = max(1, stride // n_kv_heads),   off = the layer offset

Inside a diagonal block the usual token-level causal mask applies; the kernel intersects
the pattern with the document mask of packed rows and a sliding window (MaskSpec).
Query heads that share a KV head (GQA) share its pattern.

A pattern object is what the kernel (models/ops/attention/) needs of any per-head block
layout: ``block``, ``active(i, j, hk)`` (broadcasting int64 tensors -> bool) and
``group_key(hk)`` (KV heads with equal keys have equal layouts and are computed together).
``BlockLayout`` is the generic one (an explicit [Hkv, nb, nb] table, e.g. random), used by the
kernel tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


def check_sparse_options(pattern, causal: bool) -> None:
    """The sparse kind's options, checked before any kernel or collective runs."""
    if pattern is None:
        raise ValueError("mixer kind 'sparse' needs a block pattern: call ctx.run('sparse', ..., pattern=...)")
    if not causal:
        raise ValueError("mixer kind 'sparse' (S2) is causal only: call it with causal=True")


def s2_active(i, j, hk, *, stride: int, local: int, offsets, dense) -> torch.Tensor:
    """The S2 block pattern, the one definition everything else calls.

    i [*] query block indices, j [*] key block indices, hk [*] global KV head indices
    (int64 tensors that broadcast together); offsets [Hkv] int64 per-head offsets (layer
    offset included), dense [Hkv] bool (dense heads). Returns bool [*broadcast shape]."""
    i, j, hk = (torch.as_tensor(x) for x in (i, j, hk))
    off = offsets[hk]
    return (j <= i) & (dense[hk] | (i - j < local) | ((j + off) % stride == 0))


@dataclass(frozen=True)
class S2Pattern:
    """One layer's S2 pattern. ``offsets``: per KV head, already including the layer offset
    (build one with :func:`s2_pattern`); ``dense``: per KV head, dense (causal) or not."""

    block: int
    stride: int
    local: int
    offsets: tuple[int, ...]
    dense: tuple[bool, ...]

    @property
    def n_kv_heads(self) -> int:
        return len(self.offsets)

    def __post_init__(self):  # the per-head tables as tensors, once
        object.__setattr__(self, "_offsets", torch.tensor(self.offsets, dtype=torch.int64))
        object.__setattr__(self, "_dense", torch.tensor(self.dense, dtype=torch.bool))

    def active(self, i, j, hk) -> torch.Tensor:
        """bool, broadcast of block indices i, j and global KV heads hk."""
        return s2_active(i, j, hk, stride=self.stride, local=self.local, offsets=self._offsets, dense=self._dense)

    @property
    def all_dense(self) -> bool:
        """Every head dense (stride 1, or all heads dense): plain causal attention, which the
        kernel then runs on its dense path (bit for bit the dense model)."""
        return self.stride == 1 or all(self.dense)

    def group_key(self, hk: int):
        """Heads with the same key have the same layout (computed together)."""
        return "dense" if self.dense[hk] or self.stride == 1 else self.offsets[hk] % self.stride

    def uncovered(self) -> list[int]:
        """Key-block residues mod ``stride`` that no head's strided blocks cover (a block pair
        further apart than ``local`` blocks with such a key block is seen by no head)."""
        if self.stride == 1 or any(self.dense):
            return []
        seen = {(-o) % self.stride for o in self.offsets}
        return [r for r in range(self.stride) if r not in seen]

    def density(self, seq_len: int) -> float:
        """Active (head, query block, key block) triples over causal ones, for a row of
        ``seq_len`` tokens (block level; the FLOPs the kernel does, up to the diagonal)."""
        nb = -(-seq_len // self.block)
        i = torch.arange(nb)[:, None]
        j = torch.arange(nb)[None, :]
        act = sum(int(self.active(i, j, torch.tensor(h)).sum()) for h in range(self.n_kv_heads))
        return act / (self.n_kv_heads * nb * (nb + 1) / 2)


def s2_pattern(
    *,
    block: int,
    stride: int,
    local: int,
    n_kv_heads: int,
    layer_offset: int = 0,
    offsets=None,
    dense_heads=(),
    homogeneous: bool = False,
    check_coverage: bool = True,
) -> S2Pattern:
    """The S2 pattern of one layer from its settings (model.s2_* in ModelConfig). Warns when
    the union over heads leaves key blocks uncovered (see ``S2Pattern.uncovered``)."""
    if block < 16:
        raise ValueError(f"model.s2_block={block} must be >= 16")
    if stride < 1 or local < 0:
        raise ValueError(f"model.s2_stride={stride} must be >= 1 and model.s2_local={local} >= 0")
    if offsets is not None:
        if len(offsets) != n_kv_heads:
            raise ValueError(f"model.s2_offsets has {len(offsets)} entries: give one offset per KV head ({n_kv_heads})")
        base = [int(o) for o in offsets]
    elif homogeneous:
        base = [0] * n_kv_heads
    else:
        step = max(1, stride // n_kv_heads)
        base = [h * step for h in range(n_kv_heads)]
    bad = [h for h in dense_heads if not 0 <= h < n_kv_heads]
    if bad:
        raise ValueError(f"model.s2_dense_heads has {bad}: KV head indices must lie in [0, {n_kv_heads})")
    pattern = S2Pattern(
        block,
        stride,
        local,
        tuple((o + layer_offset) % stride for o in base),
        tuple(h in set(dense_heads) for h in range(n_kv_heads)),
    )
    missing = pattern.uncovered()
    if check_coverage and missing:
        warnings.warn(
            f"S2 pattern (stride {stride}, {n_kv_heads} KV heads, offsets {list(pattern.offsets)}) leaves "
            f"key blocks j with (j % {stride}) in {missing} beyond the {local} local blocks unseen by every "
            "head: use n_kv_heads >= s2_stride, s2_offsets covering every residue, or a dense head",
            stacklevel=2,
        )
    return pattern


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """An explicit per-head block layout: ``table`` [Hkv, nb, nb] bool (query block, key
    block); blocks beyond the table are inactive. Causality is the mask's, not the table's."""

    block: int
    table: torch.Tensor

    def active(self, i, j, hk) -> torch.Tensor:
        i, j, hk = (torch.as_tensor(x) for x in (i, j, hk))
        nb = self.table.shape[1]
        inside = (i >= 0) & (i < nb) & (j >= 0) & (j < nb)
        return inside & self.table[hk, i.clamp(0, nb - 1), j.clamp(0, nb - 1)]

    def group_key(self, hk: int):
        return hk
