"""S2 block-sparse attention patterns (heterogeneous context sharding among heads).

Every position is a *row position* (its place in the unsharded packed row), so a pattern
means the same thing on one device and under any context-parallel layout. With block size
``b``, KV head ``hk`` and a token's *pattern block* ``blk(t)``:

    active(i, j, hk) = j <= i and (dense(hk) or i - j < local or (j + offset(hk)) % stride == 0)
    blk(t)           = (t - start of t's document in its row) // b   (doc_blocks="document", default)
                     = t // b                                        (doc_blocks="row")
    offset(hk)       = offsets[hk] if given, else off if homogeneous, else hk * step + off
    step             = max(1, stride // n_heads)      (head_step="dkernel", default: the *query* heads)
                     = max(1, stride // n_kv_heads)   (head_step="spread": every residue covered
                                                        when n_kv_heads >= stride)
    off              = the layer offset: 0 by default, any constant, or the layer index

The defaults reproduce DKernel's ``get_sparse_attn_mask`` (its ``head_sliding_step``
``max(1, vert_stride // num_heads)`` applied per KV head, one ``head_sliding_offset`` for
every layer, dense heads the *last* ``num_dense_heads`` KV heads, block indices restarting at
every sequence of a variable-length batch): a document's pattern does not depend on where it
lands in a pack, so packed training and one-document inference see the same blocks.
Phi-3-small (and vLLM's blocksparse attention) use ``(j + h * step + 1) % stride``: the same
rule with a constant offset 1.

Inside a diagonal block the usual token-level causal mask applies; the kernel intersects
the pattern with the document mask of packed rows and a sliding window (MaskSpec).
Query heads that share a KV head (GQA) share its pattern.

A pattern object is what the kernel (models/ops/attention/) needs of any per-head block
layout: ``block``, ``blocks(pos, doc)`` (the pattern block of each token), ``active(i, j,
hk)`` (broadcasting int64 tensors -> bool) and ``group_key(hk)`` (KV heads with equal keys
have equal layouts and are computed together). A per-document pattern evaluates blocks from
the document starts of the batch: the attention contexts bind them once per batch
(``S2Pattern.bind``). ``BlockLayout`` is the generic one (an explicit [Hkv, nb, nb] table,
e.g. random, row blocks), used by the kernel tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

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


HEAD_STEPS = ("dkernel", "spread")  # model.s2_head_step
DOC_BLOCKS = ("document", "row")  # model.s2_doc_blocks


def head_step_of(mode: str, stride: int, n_heads: int, n_kv_heads: int) -> int:
    """The offset step between consecutive KV heads: ``max(1, stride // n_heads)`` ("dkernel",
    the query heads, as DKernel and Phi-3-small) or ``max(1, stride // n_kv_heads)`` ("spread")."""
    if mode not in HEAD_STEPS:
        raise ValueError(f"model.s2_head_step={mode!r} is not one of {HEAD_STEPS}")
    return max(1, stride // (n_heads if mode == "dkernel" else n_kv_heads))


def document_starts(cu_seqlens: torch.Tensor | None, batch: int, row_len: int) -> tuple[int, ...]:
    """The flattened start of each document id (``cu_seqlens[:-1]``; one document per row when
    None), the table a per-document pattern reads its block indices from."""
    if cu_seqlens is None:
        return tuple(range(0, batch * row_len, row_len))
    return tuple(int(x) for x in cu_seqlens[:-1].tolist())


@dataclass(frozen=True)
class S2Pattern:
    """One layer's S2 pattern. ``offsets``: per KV head, already including the layer offset
    (build one with :func:`s2_pattern`); ``dense``: per KV head, dense (causal) or not;
    ``per_document``: block indices restart at every document (else row blocks);
    ``doc_starts`` / ``row_len``: the batch's document table once bound (``bind``)."""

    block: int
    stride: int
    local: int
    offsets: tuple[int, ...]
    dense: tuple[bool, ...]
    per_document: bool = True
    doc_starts: tuple[int, ...] | None = None
    row_len: int = 0

    @property
    def n_kv_heads(self) -> int:
        return len(self.offsets)

    def __post_init__(self):  # the per-head tables as tensors, once
        object.__setattr__(self, "_offsets", torch.tensor(self.offsets, dtype=torch.int64))
        object.__setattr__(self, "_dense", torch.tensor(self.dense, dtype=torch.bool))
        starts = None if self.doc_starts is None else torch.tensor(self.doc_starts, dtype=torch.int64)
        object.__setattr__(self, "_starts", starts)

    def bind(self, cu_seqlens: torch.Tensor | None, batch: int, row_len: int) -> S2Pattern:
        """This pattern for one batch: a per-document pattern learns the document starts
        (``cu_seqlens`` over the flattened [batch * row_len] tokens, None: one document per
        row); a row pattern needs nothing and is returned as it is."""
        if not self.per_document:
            return self
        return replace(self, doc_starts=document_starts(cu_seqlens, batch, row_len), row_len=row_len)

    def blocks(self, pos: torch.Tensor, doc: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pattern block of each token: pos [T] row positions, doc [R, T] their document ids in
        batch rows ``rows`` [R] (default 0..R-1). Returns [R, T] int64 (row blocks: [1, T])."""
        if not self.per_document:
            return (pos // self.block)[None]
        if self._starts is None:
            raise ValueError(
                "a per-document S2 pattern needs the batch's document starts: bind it with "
                "pattern.bind(cu_seqlens, batch, seq_len) (the attention contexts do), or use doc_blocks='row'"
            )
        if rows is None:
            rows = torch.arange(doc.shape[0])
        starts = self._starts.to(doc.device)[doc] - rows.to(doc.device)[:, None] * self.row_len
        return (pos.to(doc.device)[None, :] - starts.clamp(min=0)) // self.block  # a row start starts a document

    def active(self, i, j, hk) -> torch.Tensor:
        """bool, broadcast of block indices i, j and global KV heads hk."""
        i = torch.as_tensor(i)
        offsets, dense = self._offsets.to(i.device), self._dense.to(i.device)
        return s2_active(i, j, torch.as_tensor(hk, device=i.device), stride=self.stride, local=self.local,
                         offsets=offsets, dense=dense)  # fmt: skip

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
        """Active (head, query block, key block) triples over causal ones, for a document (or
        row) of ``seq_len`` tokens starting at block 0 (block level; the FLOPs the kernel does,
        up to the diagonal)."""
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
    n_heads: int | None = None,
    head_step: str = "dkernel",
    layer_offset: int = 0,
    offsets=None,
    dense_heads=(),
    n_dense_heads: int = 0,
    homogeneous: bool = False,
    doc_blocks: str = "document",
    check_coverage: bool = True,
) -> S2Pattern:
    """The S2 pattern of one layer from its settings (model.s2_* in ModelConfig; ``n_heads``
    the query heads, default ``n_kv_heads``). ``dense_heads``: explicit KV head indices,
    ``n_dense_heads``: DKernel's ``num_dense_heads``, the last KV heads. Warns when the union
    over heads leaves key blocks uncovered (see ``S2Pattern.uncovered``)."""
    if block < 16:
        raise ValueError(f"model.s2_block={block} must be >= 16")
    if stride < 1 or local < 0:
        raise ValueError(f"model.s2_stride={stride} must be >= 1 and model.s2_local={local} >= 0")
    if doc_blocks not in DOC_BLOCKS:
        raise ValueError(f"model.s2_doc_blocks={doc_blocks!r} is not one of {DOC_BLOCKS}")
    n_heads = n_kv_heads if n_heads is None else n_heads
    step = head_step_of(head_step, stride, n_heads, n_kv_heads)
    if offsets is not None:
        if len(offsets) != n_kv_heads:
            raise ValueError(f"model.s2_offsets has {len(offsets)} entries: give one offset per KV head ({n_kv_heads})")
        base = [int(o) for o in offsets]
    elif homogeneous:
        base = [0] * n_kv_heads
    else:
        base = [h * step for h in range(n_kv_heads)]
    if not 0 <= n_dense_heads <= n_kv_heads:
        raise ValueError(f"model.s2_n_dense_heads={n_dense_heads} must lie in [0, {n_kv_heads}] (the KV heads)")
    bad = [h for h in dense_heads if not 0 <= h < n_kv_heads]
    if bad:
        raise ValueError(f"model.s2_dense_heads has {bad}: KV head indices must lie in [0, {n_kv_heads})")
    dense = set(dense_heads) | set(range(n_kv_heads - n_dense_heads, n_kv_heads))
    pattern = S2Pattern(
        block,
        stride,
        local,
        tuple((o + layer_offset) % stride for o in base),
        tuple(h in dense for h in range(n_kv_heads)),
        doc_blocks == "document",
    )
    missing = pattern.uncovered()
    if check_coverage and missing:
        warnings.warn(
            f"S2 pattern (stride {stride}, {n_kv_heads} KV heads, offsets {list(pattern.offsets)}) leaves "
            f"key blocks j with (j % {stride}) in {missing} beyond the {local} local blocks unseen by every "
            "head: use model.s2_head_step=spread with n_kv_heads >= s2_stride, s2_offsets covering every "
            "residue, or a dense head",
            stacklevel=2,
        )
    return pattern


def bind_pattern(options: dict, docs, cu_seqlens, batch: int, row_len: int) -> dict:
    """``options`` of a ``ctx.run`` call with its ``pattern`` (if any) bound to the batch's
    documents, once per batch and pattern (cached on ``docs``, the context's Documents)."""
    pattern = options.get("pattern")
    if not isinstance(pattern, S2Pattern) or not pattern.per_document or pattern.doc_starts is not None:
        return options
    cache = docs.__dict__.setdefault("_bound_patterns", {})
    if pattern not in cache:
        cache[pattern] = pattern.bind(cu_seqlens, batch, row_len)
    return {**options, "pattern": cache[pattern]}


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

    def blocks(self, pos: torch.Tensor, doc: torch.Tensor, rows=None) -> torch.Tensor:
        """Row blocks [1, T] of row positions ``pos`` [T]."""
        return (pos // self.block)[None]

    def group_key(self, hk: int):
        return hk
