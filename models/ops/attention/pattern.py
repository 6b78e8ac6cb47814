"""The pattern path of softmax attention: masks with a per-KV-head block pattern (S2,
models/s2_pattern.py), in plain PyTorch.

Shapes: q [B, Tq, H, D], k, v [B, Tk, Hkv, D], o [B, Tq, H, D], lse [B, H, Tq] fp32/fp64.

``MaskSpec.pattern`` adds, per KV head, ``pattern.active(blk(i), blk(j), hk)`` (``hk`` the *global*
KV head: ``MaskSpec.kv_heads`` maps local KV heads to global ones when a strategy holds a slice
of the heads, e.g. Ulysses). The kernel works per group of KV heads with the same layout, on the
tile plan (plan.py ``tile_plan``): per query tile, the key tiles the pattern and the mask leave
non-empty, split into those wholly allowed and those the token mask cuts (the diagonal, a
window edge). Its work is proportional to the active blocks.

On CPU each query tile gathers its wholly allowed key tiles into one call of PyTorch's fused
flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``: natively GQA, natural-log
lse) and runs its diagonal tile in the same op, causal, when the two are the same positions;
the pieces are merged by log-sum-exp. Backward calls the op's backward with the *merged* output
and lse, which gives each piece's exact share. Anything else (windows, chunks from elsewhere,
CUDA) runs masked matmul tiles. Masks and indices are built on q's device.

Short rows (at most ``DENSE_SCORES`` scores a row, H x Tq x Tk) skip the tile plan on CPU: one call
of the same fused op under an additive 0 / -inf mask built from the pattern and the token mask
(``allowed_heads``), forward and backward. It computes the inactive pairs too, but at a few
thousand tokens the tile plan's Python and its many small calls cost more (bench/s2_short.py:
at 4 x 256 tokens 8.8 ms against the plan's 44 ms, forward + backward).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager

import torch

from models.ops.attention.plan import DEFAULT_BLOCK, MaskSpec, tile_plan
from models.ops.common import acc_dtype

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _hf(x: torch.Tensor) -> torch.Tensor:
    """[t, H, D] -> [1, H, t, D] view, the fused op's layout."""
    return x.transpose(0, 1).unsqueeze(0)


def _part(x: torch.Tensor, dim: int, s: slice) -> torch.Tensor:
    """x narrowed to ``s`` along ``dim``: a view (plain indexing, ``x[s]``, is avoided in this
    file so that the CUDA path also runs on fake CUDA tensors in the tests)."""
    return x.narrow(dim, s.start, s.stop - s.start)


def _merge(o, lse, o_i, lse_i):
    """Log-sum-exp merge of two partial results over disjoint keys: o [t, H, D], lse [H, t]."""
    new = torch.logaddexp(lse, lse_i)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    w, w_i = torch.exp(lse - safe).t().unsqueeze(-1), torch.exp(lse_i - safe).t().unsqueeze(-1)
    return o * w + o_i * w_i, new


def _masked_forward(qt, kt, vt, allowed, scale):
    """Softmax over one masked tile. qt [tq, H, D], kt, vt [tk, Hkv, D], allowed [tq, tk] bool.
    Returns (o [tq, H, D], lse [H, tq]); rows seeing nothing: 0, -inf. GQA: the query heads of
    one KV head stacked along rows."""
    tq, h, d = qt.shape
    hkv = kt.shape[1]
    qh = qt.transpose(0, 1).reshape(hkv, h // hkv * tq, d)
    s = torch.matmul(qh, kt.permute(1, 2, 0)).mul_(scale)  # [Hkv, g*tq, tk]
    s.view(hkv, h // hkv, tq, -1).masked_fill_(torch.logical_not(allowed), -math.inf)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = s.sub_(lse.masked_fill(torch.isinf(lse), 0.0)).exp_()
    o = torch.matmul(p, vt.transpose(0, 1))
    return o.reshape(h, tq, d).transpose(0, 1), lse.reshape(h, tq)


def _masked_backward(qt, kt, vt, dot, lse_t, delta_t, allowed, scale):
    """Gradients of one masked tile from the merged lse_t [H, tq] and delta_t [H, tq].
    Returns dq [tq, H, D], dk, dv [tk, Hkv, D]."""
    tq, h, d = qt.shape
    hkv = kt.shape[1]
    rows = h // hkv * tq
    qh = qt.transpose(0, 1).reshape(hkv, rows, d)
    kh, vh = kt.transpose(0, 1), vt.transpose(0, 1)
    doh = dot.transpose(0, 1).reshape(hkv, rows, d)
    m = lse_t.reshape(hkv, rows, 1)
    p = torch.matmul(qh, kh.transpose(1, 2)).mul_(scale).sub_(m.masked_fill(torch.isinf(m), 0.0)).exp_()
    p.view(hkv, h // hkv, tq, -1).masked_fill_(torch.logical_not(allowed), 0.0)
    dv = torch.matmul(p.transpose(1, 2), doh)
    ds = torch.matmul(doh, vh.transpose(1, 2)).sub_(delta_t.reshape(hkv, rows, 1)).mul_(p)
    dq = torch.matmul(ds, kh).mul_(scale).reshape(h, tq, d).transpose(0, 1)
    dk = torch.matmul(ds.transpose(1, 2), qh).mul_(scale)
    return dq, dk.transpose(0, 1), dv.transpose(0, 1)


class _Plan:
    """The tile plan as the kernel walks it: per row b and head group, per query tile, its query
    slice, the wholly allowed key indices, and the cut keys (a fused causal square when they
    are the query tile's own positions, else indices with their token mask). Built on CPU;
    ``to(device)`` gives the copy whose indices and masks live on q's device."""

    def __init__(self, mask: MaskSpec, n_kv: int, fused: bool):
        self.groups, qt, kt, plan = tile_plan(mask, n_kv)
        q_start, q_stop, q_lo = qt.start.tolist(), qt.stop.tolist(), qt.lo.tolist()
        k_start, k_stop, k_lo = kt.start.tolist(), kt.stop.tolist(), kt.lo.tolist()
        square_ok = mask.causal and mask.window is None and fused
        self.device, self._qidx, self.rows, self.key_sets = torch.device("cpu"), {}, [], []
        # the key indices of every item's wholly allowed tiles, in one gather
        fulls = [full for per_group in plan for tiles in per_group for _, full, _ in tiles]
        if fulls:
            every = torch.cat(fulls)
            owner = torch.repeat_interleave(torch.arange(len(fulls)), torch.tensor([len(f) for f in fulls]))
            sizes = torch.zeros(len(fulls), dtype=torch.int64).index_add_(0, owner, (kt.stop - kt.start)[every])
            keys = iter(kt.index(every).split(sizes.tolist()))
        for b, per_group in enumerate(plan):
            row = []
            for tiles in per_group:
                items = []
                for iq, full, part in tiles:
                    qs = slice(q_start[iq], q_stop[iq])
                    kfull = next(keys)
                    kfull = kfull if full.numel() else None
                    square, kcut, allowed = None, None, None
                    if part.numel() == 1 and square_ok:
                        ik = int(part[0])
                        if k_lo[ik] == q_lo[iq] and k_stop[ik] - k_start[ik] == qs.stop - qs.start:
                            square = slice(k_start[ik], k_stop[ik])
                    if part.numel() and square is None:
                        # tiles lie in one pattern block and one document per row: the pattern
                        # holds for the whole pair; only causality / the window cut tokens
                        kcut = kt.index(part)
                        allowed = mask.allowed(qs, kcut, b)
                    items.append((qs, kfull, square, kcut, allowed))
                    self.key_sets.append(tuple(full.tolist()))  # which key tiles: shared sets batch together
                row.append(items)
            self.rows.append(row)

    def query_index(self, qs: slice) -> torch.Tensor:
        """The query entries ``qs`` as an index on the plan's device."""
        key = (qs.start, qs.stop)
        if key not in self._qidx:
            self._qidx[key] = torch.arange(qs.start, qs.stop, device=self.device)
        return self._qidx[key]

    def to(self, device) -> _Plan:
        """A copy with every index and mask on ``device``."""
        out = object.__new__(_Plan)
        out.groups, out.device, out._qidx = self.groups, device, {}
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        out.rows = [
            [[(qs, move(kf), sq, move(kc), move(al)) for qs, kf, sq, kc, al in items] for items in row]
            for row in self.rows
        ]
        return out


_PLANS: OrderedDict = OrderedDict()  # (what, pattern, metadata, n_kv) -> (metadata tensors, built, per device)
_PLAN_CACHE = 8

# The fused CPU path runs a mask with at most DENSE_SCORES scores a row (H x Tq x Tk) as ONE call of
# the fused op under an additive mask built from the pattern, instead of the tile plan: below that
# the plan's Python and its many small calls cost more than the inactive pairs the masked call
# computes (bench/s2_short.py: 4 rows of 1024 tokens, 4 heads: 140 ms vs the plan's 263; one row of
# 2048: 147 vs 51). DENSE_BIAS_SCORES bounds the whole mask (B x H x Tq x Tk fp32 entries, 256 MiB).
# DENSE_SCORES = 0: always the tile plan (the tests run both paths).
DENSE_SCORES = 1 << 22
DENSE_BIAS_SCORES = 1 << 26
_PATH_LIMITS = {"tiles": (0, 0), "masked_call": (1 << 62, 1 << 62)}  # (DENSE_SCORES, DENSE_BIAS_SCORES)


@contextmanager
def cpu_path(path: str):
    """Within the block the fused CPU path takes ``path`` at every size: "tiles" (the tile plan)
    or "masked_call" (one masked call); the limits are restored on exit (tests, benchmarks)."""
    global DENSE_SCORES, DENSE_BIAS_SCORES
    saved = DENSE_SCORES, DENSE_BIAS_SCORES
    DENSE_SCORES, DENSE_BIAS_SCORES = _PATH_LIMITS[path]
    try:
        yield
    finally:
        DENSE_SCORES, DENSE_BIAS_SCORES = saved


def _cached(what, mask: MaskSpec, n_kv: int, build):
    """``build()`` once per ``what``, pattern, metadata and head count (the layers of one batch
    share their positions / documents tensors and pattern, forward and backward their mask).
    Returns the cache entry (metadata tensors, built, {device: copy})."""
    tensors = (mask.q_pos, mask.k_pos, mask.q_doc, mask.k_doc)
    key = (what, mask.pattern, mask.causal, mask.window, mask.kv_heads, mask.slices, *map(id, tensors), n_kv)
    hit = _PLANS.get(key)
    if hit is None or not all(x is y for x, y in zip(hit[0], tensors)):  # ids of live tensors only
        hit = (tensors, build(), {})
        _PLANS[key] = hit
        while len(_PLANS) > _PLAN_CACHE:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return hit


def plan_of(mask: MaskSpec, n_kv: int, device, fused: bool) -> _Plan:
    """The kernel's plan of ``mask`` on ``device``: built on CPU from the mask's metadata, once
    (``_cached``), then moved to the device once."""
    hit = _cached(("plan", fused), mask, n_kv, lambda: _Plan(mask, n_kv, fused))
    device = torch.device(device)
    if device.type == "cpu":
        return hit[1]
    if str(device) not in hit[2]:
        hit[2][str(device)] = hit[1].to(device)
    return hit[2][str(device)]


def _pieces_forward(qb, kb, vb, item, scale, fused):
    """(o [tq, H, D], lse [H, tq]) of one query tile over its keys: the wholly allowed keys and
    a causal square in the fused op (CPU), cut keys as a masked tile; merged by log-sum-exp."""
    qs, kfull, square, kcut, allowed = item
    qt = _part(qb, 0, qs)
    out = None
    if kfull is not None:
        kf, vf = kb.index_select(0, kfull), vb.index_select(0, kfull)
        if fused:
            o, lse = _FLASH_CPU(_hf(qt), _hf(kf), _hf(vf), 0.0, False, scale=scale)
            out = (o.squeeze(0).transpose(0, 1), lse.squeeze(0))
        else:
            ones = torch.ones(qt.shape[0], kfull.shape[0], dtype=torch.bool, device=qt.device)
            out = _masked_forward(qt, kf, vf, ones, scale)
    if square is not None:
        o, lse = _FLASH_CPU(_hf(qt), _hf(_part(kb, 0, square)), _hf(_part(vb, 0, square)), 0.0, True, scale=scale)
        piece = (o.squeeze(0).transpose(0, 1), lse.squeeze(0))
        out = piece if out is None else _merge(*out, *piece)
    if kcut is not None:
        piece = _masked_forward(qt, kb.index_select(0, kcut), vb.index_select(0, kcut), allowed, scale)
        out = piece if out is None else _merge(*out, *piece)
    return out


class _Batches:
    """The fused (CPU) form of a plan: every (query tile, head group) job of the wholly allowed
    keys, and every causal square, batched by shape into few calls of the fused op. A batch
    holds index tensors: query tokens [n, tq], query heads [n, Hq], key tokens [n, tk], KV heads
    [n, Hkv]; the op sees q [n, Hq, tq, D] against k, v [n, Hkv, tk, D]."""

    def __init__(self, plan: _Plan, groups_per_kv: int):
        self.rows = []
        key_sets = iter(plan.key_sets)
        for row in plan.rows:
            jobs: dict[tuple, list] = {}
            for (hs, _), items in zip(plan.groups, row):
                qh = torch.arange(hs.start * groups_per_kv, hs.stop * groups_per_kv)
                kh = torch.arange(hs.start, hs.stop)
                shared: dict[tuple, list] = {}  # query tiles with the same allowed key tiles: one job
                for (qs, kfull, square, _, _), key_set in zip(items, key_sets):
                    qtok = torch.arange(qs.start, qs.stop)
                    if kfull is not None:
                        shared.setdefault(key_set, [kfull, []])[1].append(qtok)
                    if square is not None:
                        ktok = torch.arange(square.start, square.stop)
                        jobs.setdefault((len(qtok), len(ktok), len(qh), True), []).append((qtok, qh, ktok, kh))
                for kfull, qtoks in shared.values():
                    qtok = torch.cat(qtoks)
                    jobs.setdefault((len(qtok), len(kfull), len(qh), False), []).append((qtok, qh, kfull, kh))
            self.rows.append([(key[-1], *(torch.stack(x) for x in zip(*batch))) for key, batch in sorted(jobs.items())])


def _gather(x: torch.Tensor, tok: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """x [T, H, ...] -> [n, len(heads), t, ...] at tokens tok [n, t] and heads heads [n, h]."""
    return x[tok[:, :, None], heads[:, None, :]].transpose(1, 2)


def _fused_forward(qa, ka, va, plan: _Plan, batches: _Batches, scale, o, lse):
    """The fused CPU forward into o [B, Tq, H, D], lse [B, H, Tq] (0 / -inf where unwritten):
    batched fused calls, then the cut tiles, all merged by log-sum-exp."""
    groups = qa.shape[2] // ka.shape[2]
    for b, (batch_row, row) in enumerate(zip(batches.rows, plan.rows)):
        ob, lb = o[b], lse[b].t()  # [Tq, H, D], [Tq, H] views
        for causal, qtok, qh, ktok, kh in batch_row:
            o_t, lse_t = _FLASH_CPU(
                _gather(qa[b], qtok, qh), _gather(ka[b], ktok, kh), _gather(va[b], ktok, kh), 0.0, causal, scale=scale
            )  # [n, Hq, tq, D], [n, Hq, tq]
            at = (qtok[:, :, None], qh[:, None, :])
            merged = _merge_rows(ob[at], lb[at], o_t.transpose(1, 2), lse_t.transpose(1, 2))
            ob[at], lb[at] = merged
        for (hs, _), items in zip(plan.groups, row):
            qh = slice(hs.start * groups, hs.stop * groups)
            for qs, _, _, kcut, allowed in items:
                if kcut is None:
                    continue
                kb, vb = ka[b, :, hs].index_select(0, kcut), va[b, :, hs].index_select(0, kcut)
                o_t, lse_t = _masked_forward(qa[b, qs, qh], kb, vb, allowed, scale)
                ob[qs, qh], lb[qs, qh] = _merge_rows(ob[qs, qh], lb[qs, qh], o_t, lse_t.t())


def _merge_rows(o, lse, o_i, lse_i):
    """Log-sum-exp merge with lse laid out like o without its last dim: o [..., D], lse [...]."""
    new = torch.logaddexp(lse, lse_i)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    return o * torch.exp(lse - safe).unsqueeze(-1) + o_i * torch.exp(lse_i - safe).unsqueeze(-1), new


def _fused_backward(qa, ka, va, doa, oa, lse, delta, plan: _Plan, batches: _Batches, scale, dq, dk, dv):
    """The fused CPU backward, accumulating into dq, dk, dv (index_put_ with accumulate)."""
    groups = qa.shape[2] // ka.shape[2]
    for b, (batch_row, row) in enumerate(zip(batches.rows, plan.rows)):
        lb = lse[b].t()  # [Tq, H]
        for causal, qtok, qh, ktok, kh in batch_row:
            at_q, at_k = (qtok[:, :, None], qh[:, None, :]), (ktok[:, :, None], kh[:, None, :])
            gq, gk, gv = _FLASH_CPU_BWD(
                _gather(doa[b], qtok, qh), _gather(qa[b], qtok, qh), _gather(ka[b], ktok, kh),
                _gather(va[b], ktok, kh), _gather(oa[b], qtok, qh), lb[at_q].transpose(1, 2), 0.0, causal,
                scale=scale,
            )  # fmt: skip
            dq[b].index_put_(at_q, gq.transpose(1, 2), accumulate=True)
            dk[b].index_put_(at_k, gk.transpose(1, 2), accumulate=True)
            dv[b].index_put_(at_k, gv.transpose(1, 2), accumulate=True)
        for (hs, _), items in zip(plan.groups, row):
            qh = slice(hs.start * groups, hs.stop * groups)
            for qs, _, _, kcut, allowed in items:
                if kcut is None:
                    continue
                kb, vb = ka[b, :, hs].index_select(0, kcut), va[b, :, hs].index_select(0, kcut)
                gq, gk, gv = _masked_backward(
                    qa[b, qs, qh], kb, vb, doa[b, qs, qh], lse[b, qh, qs], delta[b, qh, qs], allowed, scale
                )
                dq[b, qs, qh] += gq
                dk[b, :, hs].index_add_(0, kcut, gk)
                dv[b, :, hs].index_add_(0, kcut, gv)


def _batches_of(plan: _Plan, groups_per_kv: int) -> _Batches:
    """The fused batches of a (CPU) plan, once per plan (forward and backward share them)."""
    if getattr(plan, "_batches", None) is None:
        plan._batches = _Batches(plan, groups_per_kv)
    return plan._batches


def _use_fused(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and _FLASH_CPU is not None


def _use_masked_call(q: torch.Tensor, k: torch.Tensor) -> bool:
    """One masked fused call instead of the tile plan (CPU, at most DENSE_SCORES scores a row)."""
    row = q.shape[2] * q.shape[1] * k.shape[1]
    return _use_fused(q) and row <= DENSE_SCORES and q.shape[0] * row <= DENSE_BIAS_SCORES


def allowed_heads(mask: MaskSpec, n_kv: int) -> torch.Tensor:
    """bool [B, Hkv, Tq, Tk]: the token mask and each local KV head's block pattern, all rows
    at once (the pattern's blocks of every row, then one broadcast ``active``)."""
    bsz = mask.q_doc.shape[0] if mask.q_doc is not None else len(mask.slices.rows)
    kidx = torch.arange(mask.k_pos.shape[0])
    n_heads = n_kv if mask.head_slices() else None  # head slices of a patterned mask: per KV head
    tokens = torch.stack([mask.allowed(slice(None), kidx, b, n_heads) for b in range(bsz)])
    tokens = tokens if tokens.dim() == 4 else tokens[:, None]
    rows = torch.arange(bsz)
    qb = mask.pattern.blocks(mask.q_pos, mask.q_doc, rows)  # [B or 1, Tq]
    kb = mask.pattern.blocks(mask.k_pos, mask.k_doc, rows)
    hk = torch.tensor([mask.global_head(h) for h in range(n_kv)])
    return tokens & mask.pattern.active(qb[:, None, :, None], kb[:, None, None, :], hk[None, :, None, None])


def _masked_call_bias(mask: MaskSpec, n_kv: int, groups: int, dtype, device):
    """(bias [B, H, Tq, Tk] of 0 / -inf in ``dtype`` on ``device``, empty [B, H, Tq] rows that see
    no key), once per mask, head count and dtype."""

    def build():
        allowed = allowed_heads(mask, n_kv).repeat_interleave(groups, dim=1)
        return allowed, ~allowed.any(-1)

    hit = _cached("masked_call", mask, n_kv, build)
    at = (str(device), dtype)
    if at not in hit[2]:
        allowed, empty = (x.to(device) for x in hit[1])
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
        hit[2][at] = bias, empty
    return hit[2][at]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, T, D] view, the fused op's layout."""
    return x.transpose(1, 2)


def _masked_call_forward(qa, ka, va, mask: MaskSpec, scale):
    """(o [B, Tq, H, D], lse [B, H, Tq]) in one masked fused call; rows seeing nothing: 0, -inf."""
    bias, empty = _masked_call_bias(mask, ka.shape[2], qa.shape[2] // ka.shape[2], qa.dtype, qa.device)
    o, lse = _FLASH_CPU(*map(_heads_first, (qa, ka, va)), 0.0, False, attn_mask=bias, scale=scale)
    return o.transpose(1, 2), lse.masked_fill_(empty, -math.inf)


def _masked_call_backward(qa, ka, va, doa, oa, lse, mask: MaskSpec, scale):
    """(dq, dk, dv) in one masked fused call, from the given (possibly merged) lse; a row whose
    lse is -inf (it sees no key anywhere) gets no gradient."""
    bias, _ = _masked_call_bias(mask, ka.shape[2], qa.shape[2] // ka.shape[2], qa.dtype, qa.device)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)  # its scores are all -inf: probabilities 0
    grads = _FLASH_CPU_BWD(*map(_heads_first, (doa, qa, ka, va, oa)), safe, 0.0, False, attn_mask=bias, scale=scale)
    return (g.transpose(1, 2) for g in grads)


def pattern_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_forward`` for a mask with a per-head block pattern: per group of KV heads with
    one layout, each query tile against only its active key tiles."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    fused = _use_fused(q)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    if _use_masked_call(q, k):
        o, lse = _masked_call_forward(qa, ka, va, mask, scale)
        return o.to(q.dtype), lse
    o = torch.zeros(bsz, tq, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, tq), -math.inf, dtype=acc, device=q.device)
    plan = plan_of(mask, k.shape[2], q.device, fused)
    if fused:
        _fused_forward(qa, ka, va, plan, _batches_of(plan, groups), scale, o, lse)
        return o.to(q.dtype), lse
    for b, row in enumerate(plan.rows):
        for (hs, _), items in zip(plan.groups, row):
            qh = slice(hs.start * groups, hs.stop * groups)  # the query heads of these kv heads
            qb, kb, vb = (_part(x.select(0, b), 1, s) for x, s in ((qa, qh), (ka, hs), (va, hs)))
            ob, lseb = _part(o.select(0, b), 1, qh), _part(lse.select(0, b), 0, qh)
            for item in items:
                o_t, lse_t = _pieces_forward(qb, kb, vb, item, scale, fused)
                qidx = plan.query_index(item[0])  # index_copy_, not copy_: it also runs on fake CUDA
                ob.index_copy_(0, qidx, o_t)
                lseb.index_copy_(1, qidx, lse_t)
    return o.to(q.dtype), lse


def pattern_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share.
    """
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    fused = _use_fused(q)
    qa, ka, va, doa, oa = (x.to(acc) for x in (q, k, v, do, o))
    lse = lse.to(acc)
    if _use_masked_call(q, k):
        dq, dk, dv = _masked_call_backward(qa, ka, va, doa, oa, lse, mask, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = (doa * oa).sum(-1).transpose(1, 2)  # [B, H, Tq]
    plan = plan_of(mask, k.shape[2], q.device, fused)
    if fused:
        _fused_backward(qa, ka, va, doa, oa, lse, delta, plan, _batches_of(plan, groups), scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    for b, row in enumerate(plan.rows):
        for (hs, _), items in zip(plan.groups, row):
            qh = slice(hs.start * groups, hs.stop * groups)
            qb, dob, ob, dqb = (_part(x.select(0, b), 1, qh) for x in (qa, doa, oa, dq))
            kb, vb, dkb, dvb = (_part(x.select(0, b), 1, hs) for x in (ka, va, dk, dv))  # views: in place
            lseb, deltab = _part(lse.select(0, b), 0, qh), _part(delta.select(0, b), 0, qh)
            for qs, kfull, square, kcut, allowed in items:
                qt, dot, ot, dqt = (_part(x, 0, qs) for x in (qb, dob, ob, dqb))
                lse_t, delta_t = _part(lseb, 1, qs), _part(deltab, 1, qs)
                if kfull is not None:
                    kf, vf = kb.index_select(0, kfull), vb.index_select(0, kfull)
                    if fused:
                        gq, gk, gv = _FLASH_CPU_BWD(
                            _hf(dot), _hf(qt), _hf(kf), _hf(vf), _hf(ot), lse_t.unsqueeze(0), 0.0, False, scale=scale
                        )
                        gq, gk, gv = (x.squeeze(0).transpose(0, 1) for x in (gq, gk, gv))
                    else:
                        ones = torch.ones(qt.shape[0], kfull.shape[0], dtype=torch.bool, device=q.device)
                        gq, gk, gv = _masked_backward(qt, kf, vf, dot, lse_t, delta_t, ones, scale)
                    dqt.add_(gq)
                    dkb.index_add_(0, kfull, gk)
                    dvb.index_add_(0, kfull, gv)
                if square is not None:
                    ks, vs = _part(kb, 0, square), _part(vb, 0, square)
                    gq, gk, gv = _FLASH_CPU_BWD(
                        _hf(dot), _hf(qt), _hf(ks), _hf(vs), _hf(ot), lse_t.unsqueeze(0), 0.0, True, scale=scale
                    )
                    dqt.add_(gq.squeeze(0).transpose(0, 1))
                    _part(dkb, 0, square).add_(gk.squeeze(0).transpose(0, 1))
                    _part(dvb, 0, square).add_(gv.squeeze(0).transpose(0, 1))
                if kcut is not None:
                    kc, vc = kb.index_select(0, kcut), vb.index_select(0, kcut)
                    gq, gk, gv = _masked_backward(qt, kc, vc, dot, lse_t, delta_t, allowed, scale)
                    dqt.add_(gq)
                    dkb.index_add_(0, kcut, gk)
                    dvb.index_add_(0, kcut, gv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
