"""Core attention disaggregation (CAD): core attention runs where the planner puts it.

Shapes (P ranks, C = N / P local tokens, per nano-batch on rank d):
    q, o         [B, C, H, D]     local shards (layout order)
    k, v         [B, C, Hkv, D]
    Q_d          [1, Tq, H, D]    the queries rank d computes: whole shards of documents,
                                  from any rank, flattened over the batch in flat order
    K_d, V_d     [1, Tk, Hkv, D]  every key its shards need (each key once per nano-batch)
    lse_d        [1, H, Tq]

The plan (parallel/cad_plan.py, identical on every rank, cached per batch) and its routes
(parallel/cad_routing.py) say which query rows and which key rows each rank computes with.
Forward: one uneven all-to-all sends Q, K and V rows to the ranks that compute with them, the
kernel runs there on (Q_d, K_d, V_d) under the
global mask (explicit positions and document ids), one all-to-all returns O to the owners.
Every query sees all of its keys on one rank, so no LSE merge across ranks is needed (on the
rank, the kernel runs per run of one document's queries against at most 4 x block keys at a
time, merged by log-sum-exp as ring attention does, to keep its temporaries small). Backward: one
all-to-all sends dO, the kernel's backward runs with the saved (o, lse), one all-to-all returns
dQ and dK/dV; a key row used on several ranks gets the sum of their dK/dV at its owner.

Ping-pong (``ping_pong=True``): the plan splits each rank's shards into two nano-batches; both
dispatches are posted at once, so the second's all-to-all runs while the first computes, and
the first's return runs while the second computes (same in backward).

Bytes: plan-dependent; :meth:`CAD.plan_bytes` gives the exact count of a batch, which
``parallel.comm`` measures. ``CAD.plan(ctx).summary(H, Hkv, D, e)`` reports a plan's balance
before / after, bytes per rank and memory balance before it runs (logged at INFO on rank 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from models.ops.attention import attention_backward, attention_forward
from models.ops.attention.fused import piece_dtype
from models.ops.common import acc_dtype, merge_lse
from parallel import comm
from parallel.cad_plan import CADPlan, plan_cad
from parallel.cad_routing import Route, build_routes
from parallel.strategies.base import LayerShape, SoftmaxStrategy, register

log = logging.getLogger(__name__)


def _clock(x: torch.Tensor, timing: dict) -> float:
    """The wall clock for ``timing``; with ``timing["cuda_sync"]`` (bench/cad_overlap.py) the
    device is synchronised first: on NCCL ``wait()`` and kernels return once launched."""
    if timing.get("cuda_sync") and x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


class _Pending:
    """An uneven all-to-all in flight: ``wait()`` -> its 1-D receive buffer cut per source."""

    def __init__(self, send: list[torch.Tensor], recv_sizes: list[int], like: torch.Tensor, group, timing):
        self.recv = like.new_empty(sum(recv_sizes))
        self.sizes, self.timing = recv_sizes, timing
        buf = torch.cat([t.reshape(-1) for t in send]) if send else like.new_empty(0)
        self.work = comm.all_to_all_uneven(self.recv, buf, recv_sizes, [t.numel() for t in send], group)

    def wait(self) -> list[torch.Tensor]:
        t0 = _clock(self.recv, self.timing)
        self.work.wait()
        self.timing["wait_s"] += _clock(self.recv, self.timing) - t0
        return list(self.recv.split(self.sizes))


def _unpack(parts, splits, feats):
    """Cut each source's 1-D part into len(feats) row blocks [rows, f]."""
    out = []
    for part, rows in zip(parts, splits):
        blocks = part.split([r * f for r, f in zip(rows, feats)])
        out.append([b.view(r, f) for b, r, f in zip(blocks, rows, feats)])
    return out


def _fill(buf, slots, rows):
    """buf[slots[s]] = rows[s] for every source s."""
    for sl, r in zip(slots, rows):
        if sl.numel():
            buf.index_copy_(0, sl, r.to(buf.dtype))


def _group_forward(qg, kvd, hk, chunks, scale, block):
    """Queries qg [1, t, H, D] against their key chunks of kvd [1, Tk, 2 Hkv, D], merged by
    log-sum-exp in fp32 / fp64. -> (o [1, t, H, D] in qg.dtype, lse [1, H, t])."""
    if not chunks:  # queries that see no key (a mask may leave rows empty): 0, lse -inf
        return torch.zeros_like(qg), qg.new_full((1, qg.shape[2], qg.shape[1]), float("-inf"), dtype=acc_dtype(qg))
    if len(chunks) == 1:
        ka, kb, mask = chunks[0]
        return attention_forward(qg, kvd[:, ka:kb, :hk], kvd[:, ka:kb, hk:], mask, scale, block)
    qa = qg.to(piece_dtype(qg))
    o = lse = None
    for ka, kb, mask in chunks:
        o_i, lse_i = attention_forward(qa, kvd[:, ka:kb, :hk], kvd[:, ka:kb, hk:], mask, scale, block)
        o, lse = (o_i, lse_i) if o is None else merge_lse(o, lse, o_i, lse_i)
    return o.to(qg.dtype), lse


def cad_forward(q, k, v, routes: list[Route], group, rank, scale, block, timing):
    """-> (o [B, C, H, D], saved per nano: (Q_d [1, Tq, H, D], KV_d [1, Tk, 2 Hkv, D], o_d, lse_d))."""
    bsz, c, h, d = q.shape
    hk = k.shape[2]
    qf, kvf = q.reshape(bsz * c, h * d), torch.cat([k, v], dim=2).reshape(bsz * c, 2 * hk * d)
    pend = []
    for r in routes:  # post every dispatch first: nano 1's overlaps nano 0's compute
        send = [torch.cat([qf[a].reshape(-1), kvf[b].reshape(-1)]) for a, b in zip(r.q_send, r.kv_send)]
        sizes = [len(a) * h * d + len(b) * 2 * hk * d for a, b in zip(r.q_slots, r.kv_slots)]
        sizes[rank] = 0
        pend.append(_Pending(send, sizes, qf, group, timing))
    o = torch.zeros_like(qf)
    saved, back = [], []
    for r, pd in zip(routes, pend):
        counts = [(len(a), len(b)) if s != rank else (0, 0) for s, (a, b) in enumerate(zip(r.q_slots, r.kv_slots))]
        parts = _unpack(pd.wait(), counts, (h * d, 2 * hk * d))
        parts[rank] = [qf[r.q_self], kvf[r.kv_self]]
        qd, kvd = qf.new_empty(r.tq, h * d), kvf.new_empty(r.tk, 2 * hk * d)
        _fill(qd, r.q_slots, [x[0] for x in parts])
        _fill(kvd, r.kv_slots, [x[1] for x in parts])
        qd, kvd = qd.view(1, r.tq, h, d), kvd.view(1, r.tk, 2 * hk, d)
        t0 = _clock(qf, timing)
        od, lse = qd.clone(), qd.new_zeros(1, h, 0)
        if r.groups:
            outs = [_group_forward(qd[:, qa:qb], kvd, hk, chunks, scale, block) for qa, qb, chunks in r.groups]
            od, lse = torch.cat([x[0] for x in outs], dim=1), torch.cat([x[1] for x in outs], dim=2)
        timing["compute_s"] += _clock(qf, timing) - t0
        saved.append((qd, kvd, od, lse))
        of = od.view(r.tq, h * d)
        send = [of[sl] if s != rank else of[:0] for s, sl in enumerate(r.q_slots)]
        back.append(_Pending(send, [len(x) * h * d for x in r.q_send], qf, group, timing))
        if r.q_self.numel():
            o.index_copy_(0, r.q_self, of[r.q_slots[rank]])
    for r, pd in zip(routes, back):
        for rows, part in zip(r.q_send, pd.wait()):
            if rows.numel():
                o.index_copy_(0, rows, part.view(len(rows), h * d))
    return o.view(bsz, c, h, d), saved


def cad_backward(do, shape_kv, routes, saved, group, rank, scale, block, timing):
    """-> (dq [B, C, H, D], dk, dv [B, C, Hkv, D])."""
    bsz, c, h, d = do.shape
    hk = shape_kv[2]
    dof = do.reshape(bsz * c, h * d)
    acc = acc_dtype(do)
    dq = torch.zeros(bsz * c, h * d, dtype=acc, device=do.device)
    dkv = torch.zeros(bsz * c, 2 * hk * d, dtype=acc, device=do.device)
    pend = []
    for r in routes:
        send = [dof[a] for a in r.q_send]
        sizes = [len(a) * h * d if s != rank else 0 for s, a in enumerate(r.q_slots)]
        pend.append(_Pending(send, sizes, dof, group, timing))
    back = []
    for r, pd, (qd, kvd, od, lse) in zip(routes, pend, saved):
        parts = pd.wait()
        parts[rank] = dof[r.q_self]
        dod = dof.new_empty(r.tq, h * d)
        _fill(dod, r.q_slots, [x.reshape(-1, h * d) for x in parts])
        t0 = _clock(dof, timing)
        dod = dod.view(1, r.tq, h, d)
        dqd = torch.zeros(qd.shape, dtype=acc, device=qd.device)
        dkvd = torch.zeros(kvd.shape, dtype=acc, device=qd.device)
        for qa, qb, chunks in r.groups:  # key ranges of one document's runs overlap: add
            run = piece_dtype(qd)  # half stays half on CUDA (fused kernel), else fp32 / fp64
            qg, dog, og, lg = qd[:, qa:qb].to(run), dod[:, qa:qb].to(run), od[:, qa:qb].to(run), lse[:, :, qa:qb]
            for ka, kb, mask in chunks:  # with the merged (o, lse), each chunk's exact share
                kc, vc = kvd[:, ka:kb, :hk].to(run), kvd[:, ka:kb, hk:].to(run)
                dq_g, dk_g, dv_g = attention_backward(dog, qg, kc, vc, og, lg, mask, scale, block)
                dqd[:, qa:qb] += dq_g
                dkvd[:, ka:kb, :hk] += dk_g
                dkvd[:, ka:kb, hk:] += dv_g
        timing["compute_s"] += _clock(dof, timing) - t0
        dqf, dkvf = dqd.reshape(r.tq, h * d).to(do.dtype), dkvd.reshape(r.tk, 2 * hk * d).to(do.dtype)
        send = [
            torch.cat([dqf[a].reshape(-1), dkvf[b].reshape(-1)]) if s != rank else dqf[:0].reshape(-1)
            for s, (a, b) in enumerate(zip(r.q_slots, r.kv_slots))
        ]
        sizes = [len(a) * h * d + len(b) * 2 * hk * d for a, b in zip(r.q_send, r.kv_send)]
        back.append(_Pending(send, sizes, dof, group, timing))
        dq.index_add_(0, r.q_self, dqf[r.q_slots[rank]].to(acc))
        dkv.index_add_(0, r.kv_self, dkvf[r.kv_slots[rank]].to(acc))
    for r, pd in zip(routes, back):
        parts = _unpack(pd.wait(), [(len(a), len(b)) for a, b in zip(r.q_send, r.kv_send)], (h * d, 2 * hk * d))
        for a, b, (gq, gkv) in zip(r.q_send, r.kv_send, parts):
            dq.index_add_(0, a, gq.to(acc))
            dkv.index_add_(0, b, gkv.to(acc))  # a key used on several ranks: summed here
    dkv = dkv.view(bsz, c, 2 * hk, d)
    return dq.view(bsz, c, h, d).to(do.dtype), dkv[:, :, :hk].to(do.dtype), dkv[:, :, hk:].to(do.dtype)


class CADAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, routes, group, rank, scale, block, timing):
        o, saved = cad_forward(q, k, v, routes, group, rank, scale, block, timing)
        fctx.save_for_backward(*[t for nano in saved for t in nano])  # received Q, K/V; o, lse
        fctx.args = (k.shape, routes, group, rank, scale, block, timing)
        return o

    @staticmethod
    def backward(fctx, do):
        kv_shape, routes, group, rank, scale, block, timing = fctx.args
        flat = fctx.saved_tensors
        saved = [flat[i : i + 4] for i in range(0, len(flat), 4)]
        dq, dk, dv = cad_backward(do.contiguous(), kv_shape, routes, saved, group, rank, scale, block, timing)
        return dq, dk, dv, None, None, None, None, None, None


@dataclass
class CADOptions:
    min_shard: int = 128  # tokens, the smallest piece the planner cuts
    tolerance: float = 1.1  # target max / mean attention load
    ping_pong: bool = False  # two nano-batches, communication overlapped

    def validate(self, where: str) -> None:
        if self.min_shard < 1:
            raise ValueError(f"{where}.min_shard={self.min_shard!r} must be an int >= 1, e.g. 128")
        if not self.tolerance >= 1.0:
            raise ValueError(f"{where}.tolerance={self.tolerance!r} must be >= 1.0, e.g. 1.1")


@register("cad")
class CAD(SoftmaxStrategy):
    """Core attention disaggregation; options: ``CADOptions`` (``min_shard``: tokens, smallest
    piece the planner cuts; ``tolerance``: target max / mean attention load; ``ping_pong``: two
    nano-batches, communication overlapped).

    Between calls the strategy keeps only a cache of plans keyed by everything a plan depends
    on (so :meth:`plan` of the same batch and layer shape is the plan a call ran), and
    ``timing``: seconds spent waiting on its all-to-alls and in the kernel, added up over calls
    until the caller resets it (bench/cad_overlap.py); nothing it computes reads either."""

    Options = CADOptions

    def __init__(self, **options):
        super().__init__(**options)  # min_shard, tolerance, ping_pong
        self._cache: dict = {}  # (plan_cad arguments) -> (plan, routes); the newest few
        self._moved: dict = {}  # (id(routes), device) -> (routes, their copies on the device)
        self.timing = {"wait_s": 0.0, "compute_s": 0.0}  # accumulated, for the overlap measure

    def plan(self, ctx, causal=True, window=None, qrow_bytes=2, kvrow_bytes=1, mask=None) -> CADPlan:
        """The plan of ``ctx``'s batch (cached; the same on every rank). A layer with H query
        and Hkv key/value heads plans with ``qrow_bytes=H, kvrow_bytes=2 * Hkv``; ``mask``: a
        SliceMask (costed over H = ``qrow_bytes`` heads)."""
        return self._planned(ctx, causal, window, qrow_bytes, kvrow_bytes, mask)[0]

    def _plan_of(self, cu_seqlens, batch, seq_len, world, layout, causal, window, qrow_bytes, kvrow_bytes, mask=None):
        """``plan_cad`` of one batch with this strategy's options (shard size, tolerance, nano-batches)."""
        return plan_cad(
            cu_seqlens,
            batch,
            seq_len,
            world,
            layout,
            causal=causal,
            window=window,
            min_shard=self.min_shard,
            tolerance=self.tolerance,
            nanos=2 if self.ping_pong else 1,
            qrow_bytes=qrow_bytes,
            kvrow_bytes=kvrow_bytes,
            mask=mask,
            n_heads=qrow_bytes,
        )

    def _planned(self, ctx, causal, window, qrow_bytes, kvrow_bytes, mask=None) -> tuple[CADPlan, list[Route]]:
        cu = tuple(ctx.cu_seqlens.tolist()) if mask is None else ()
        key = (cu, ctx.batch_size, ctx.seq_len, ctx.world_size, ctx.layout, causal, window, qrow_bytes, kvrow_bytes)
        key += (mask,)
        if key not in self._cache:
            plan = self._plan_of(*key)
            if ctx.rank == 0 and log.isEnabledFor(logging.INFO):  # the plan, before it runs
                report = plan.summary(qrow_bytes, kvrow_bytes // 2, 1, 1)  # bytes in units of D * e
                log.info("cad plan (bytes x head_dim x elem_bytes): %s", report)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (plan, build_routes(plan, ctx.rank, 2 if self.ping_pong else 1, 4 * ctx.block))
        return self._cache[key]

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, mask=None):
        plan, routes = self._planned(ctx, causal, window, q.shape[2], 2 * k.shape[2], mask)
        if q.device.type != "cpu":
            routes = self._routes_on(routes, q.device)
        return CADAttention.apply(q, k, v, routes, ctx.group, ctx.rank, scale, ctx.block, self.timing)

    def _routes_on(self, routes: list[Route], device) -> list[Route]:
        """The routes' index tensors on ``device``, copied once per plan (not per layer call)."""
        key = (id(routes), str(device))
        hit = self._moved.get(key)
        if hit is None or hit[0] is not routes:  # ids of evicted plans can be reused
            if len(self._moved) >= 8:
                self._moved.clear()
            hit = self._moved[key] = (routes, [r.to(device) for r in routes])
        return hit[1]

    def work_queries(self, ctx, n_heads: int, n_kv_heads: int, *, causal=True, window=None):
        """Flat positions (b * N + p) of the queries this rank computes under the plan of a
        layer with these heads and mask (the plan its call ran; for B = 1, row positions); all
        heads."""
        return self.plan(ctx, causal, window, n_heads, 2 * n_kv_heads).rows(ctx.rank)[0], 1.0

    def plan_bytes(self, ctx, n_heads, n_kv_heads, head_dim, elem_bytes, causal=True, window=None, mask=None) -> int:
        """Exact bytes this rank receives in one layer's forward for ``ctx``'s batch."""
        plan = self.plan(ctx, causal, window, n_heads, 2 * n_kv_heads, mask)
        return plan.bytes_received(ctx.rank, n_heads, n_kv_heads, head_dim, elem_bytes)

    def forward_bytes(self, shape: LayerShape) -> int:
        """Plan-dependent: what :meth:`forward_bytes_of` gives for one causal document per row
        (``LayerShape`` carries no ``cu_seqlens``)."""
        return self.forward_bytes_of(shape, torch.arange(0, shape.batch * shape.seq_len + 1, shape.seq_len))

    def forward_bytes_of(self, shape: LayerShape, cu_seqlens, causal=True, window=None) -> int:
        """The most bytes any rank receives in one layer's forward under the plan of the batch
        with document starts ``cu_seqlens`` (exact: what ``parallel.comm`` counts)."""
        s = shape
        plan = self._plan_of(
            cu_seqlens, s.batch, s.seq_len, s.cp, s.layout, causal, window, s.n_heads, 2 * s.n_kv_heads
        )
        return max(plan.bytes_received(r, s.n_heads, s.n_kv_heads, s.head_dim, s.elem_bytes) for r in range(s.cp))
