"""Core attention disaggregation (CAD): the routes of a plan. Pure and deterministic, no
communication: from a ``CADPlan`` (parallel/cad_plan.py, identical on every rank), which local
rows each rank sends to which rank, where received rows land, and the kernel calls each rank
runs (parallel/strategies/cad.py moves the rows and runs the calls).

Shapes (P ranks, C local tokens per row, B rows; flat rows index [B * C] local tokens):
    Q_d      [Tq] flat row indices (b * N + p) of the queries rank d computes
    K_d      [Tk] flat row indices of every key its shards need (each key once per nano-batch)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.ops.attention import MaskSpec
from models.ops.attention.slices import SliceMask
from models.ops.common import run_starts
from parallel.cad_plan import CADPlan


@dataclass
class Route:
    """One nano-batch on one rank. ``q_send[d]`` / ``kv_send[d]``: local flat rows (into
    [B * C]) sent to rank d (empty for self); ``q_slots[s]`` / ``kv_slots[s]``: where rows
    from rank s land in Q_d / K_d (self included, read locally from ``q_send_self`` /
    ``kv_send_self``); ``groups``: the kernel calls, (qa, qb, [(ka, kb, mask), ...]) for
    query rows [qa, qb) of Q_d against key rows [ka, kb) of K_d, chunk by chunk, merged by
    log-sum-exp (see :func:`kernel_groups`)."""

    q_send: list[torch.Tensor]
    kv_send: list[torch.Tensor]
    q_slots: list[torch.Tensor]
    kv_slots: list[torch.Tensor]
    q_self: torch.Tensor
    kv_self: torch.Tensor
    tq: int
    tk: int
    groups: list[tuple[int, int, list[tuple[int, int, MaskSpec]]]]

    def to(self, device) -> Route:
        """The same route with its index tensors on ``device`` (the mask stays where it is)."""
        mv = [[t.to(device) for t in ts] for ts in (self.q_send, self.kv_send, self.q_slots, self.kv_slots)]
        return Route(*mv, self.q_self.to(device), self.kv_self.to(device), self.tq, self.tk, self.groups)


def build_routes(plan: CADPlan, rank: int, nanos: int, kv_chunk: int = 2048) -> list[Route]:
    own, loc = plan.owner()
    n, c, p = plan.seq_len, plan.seq_len // plan.world, plan.world

    def local_rows(flat):  # flat indices -> (owner [T], local flat rows [T])
        return own[flat % n], (flat // n) * c + loc[flat % n]

    routes = []
    for nano in range(nanos):
        q_send, kv_send = [], []
        for d in range(p):
            rows = []
            for flat in plan.rows(d, nano):
                src, lrow = local_rows(flat)
                rows.append(lrow[src == rank] if d != rank else lrow[:0])
            q_send.append(rows[0])
            kv_send.append(rows[1])
        q, kv = plan.rows(rank, nano)
        (q_src, q_rows), (kv_src, kv_rows) = local_rows(q), local_rows(kv)
        q_slots = [(q_src == s).nonzero().flatten() for s in range(p)]
        kv_slots = [(kv_src == s).nonzero().flatten() for s in range(p)]
        if plan.mask is None:
            groups = kernel_groups(q, kv, plan.doc_of(q), plan.doc_of(kv), n, plan.causal, plan.window, kv_chunk)
        else:
            groups = mask_kernel_groups(q, kv, plan.doc_of(q), n, plan.mask, kv_chunk)
        q_self, kv_self = q_rows[q_src == rank], kv_rows[kv_src == rank]
        routes.append(Route(q_send, kv_send, q_slots, kv_slots, q_self, kv_self, len(q), len(kv), groups))
    return routes


def kernel_groups(q, kv, q_doc, k_doc, n, causal, window, kv_chunk=2048, min_rows=16):
    """Cut the kernel's work on (Q_d [Tq], K_d [Tk]) flat indices into calls, one per run of
    consecutive query positions of one document (runs under ``min_rows`` rows join the next),
    each against only the key rows its documents and causal / window bounds allow, in chunks
    of at most ``kv_chunk`` keys (as ring attention sees them: the kernel's temporaries stay
    small). Without this, one kernel block mixing shards of different documents computes the
    keys of all of them. -> [(qa, qb, [(ka, kb, MaskSpec), ...])]."""
    cut = run_starts(q, q_doc)[1:]  # the runs after the first
    starts = [0]
    for c in cut.tolist():
        if c - starts[-1] >= min_rows:
            starts.append(c)
    groups = []
    for qa, qb in zip(starts, starts[1:] + [len(q)]):
        if qb <= qa:
            continue
        ka = int(torch.searchsorted(k_doc, q_doc[qa]))
        kb = int(torch.searchsorted(k_doc, q_doc[qb - 1], right=True))
        if causal:
            kb = min(kb, int(torch.searchsorted(kv, q[qb - 1], right=True)))
        if window is not None:
            ka = max(ka, int(torch.searchsorted(kv, q[qa] - window + 1)))
        chunks = []
        for a in range(ka, kb, kv_chunk):
            b = min(kb, a + kv_chunk)
            chunks.append(
                (a, b, MaskSpec(q[qa:qb] % n, kv[a:b] % n, q_doc[None, qa:qb], k_doc[None, a:b], causal, window))
            )
        groups.append((qa, qb, chunks))
    return groups


def mask_kernel_groups(q, kv, q_seg, n, mask, kv_chunk=2048, min_rows=16):
    """``kernel_groups`` under a SliceMask: one call per run of consecutive query positions of
    one segment (short runs join the next one of the same row), against the key rows of its row
    inside the smallest range holding every key its slices allow, in chunks of ``kv_chunk``.
    The kernel applies the slices (explicit positions: keys of K_d the slices skip cost nothing)."""
    cut = run_starts(q, q_seg)[1:]
    row = q // n
    starts = [0]
    for c in cut.tolist():
        if c - starts[-1] >= min_rows or int(row[c]) != int(row[starts[-1]]):
            starts.append(c)
    groups = []
    for qa, qb in zip(starts, starts[1:] + [len(q)]):
        b = int(row[qa])
        lo, hi = int(q[qa]) % n, int(q[qb - 1]) % n + 1
        spans = [(t.k0, t.k1) for s in mask.row(b) if (t := s.clip(lo, hi, 0, n)) is not None]
        chunks = []
        if spans:
            ka = int(torch.searchsorted(kv, b * n + min(a for a, _ in spans)))
            kb = int(torch.searchsorted(kv, b * n + max(e for _, e in spans)))
            row_mask = SliceMask((mask.row(b),), n, mask.name)
            for a in range(ka, kb, kv_chunk):
                e = min(kb, a + kv_chunk)
                chunks.append((a, e, MaskSpec(q[qa:qb] % n, kv[a:e] % n, slices=row_mask)))
        groups.append((qa, qb, chunks))
    return groups
