"""The one thin layer every collective of a CP strategy goes through: it counts bytes per
rank and op (blocking and asynchronous collectives alike).

Counts are what this rank *sends* and *receives* (payload only, no protocol overhead):
all_gather of a local tensor of s bytes receives (P-1)*s and sends (P-1)*s (ring
algorithm view), reduce_scatter of a full tensor of P*s bytes receives (P-1)*s, etc.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class ByteCounter:
    def __init__(self):
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent[op] += sent
        self.received[op] += received

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


COUNTER = ByteCounter()  # per process; read by tests and the benchmark


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gather_into(x: torch.Tensor, group, async_op: bool):
    """One ``all_gather_into_tensor`` (a single buffer: NCCL's native form, no per-rank list)
    -> (out [P, *x.shape], work). The buffer is [P * d0, ...], the layout gloo requires."""
    p = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty(p * x.shape[0], *x.shape[1:]) if x.dim() else x.new_empty(p)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name since 2.12
    work = gather(out, x if x.dim() else x[None], group=group, async_op=async_op)
    return out.view(p, *x.shape), work


def all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Gather ``x`` (same shape on every rank) from all ranks of ``group``: views of one buffer."""
    p = dist.get_world_size(group)
    out, _ = _gather_into(x, group, async_op=False)
    COUNTER.add("all_gather", (p - 1) * _nbytes(x), (p - 1) * _nbytes(x))
    return list(out.unbind(0))


def reduce_scatter(chunks: list[torch.Tensor], group) -> torch.Tensor:
    """Sum ``chunks[j]`` over ranks and return the sum of chunk ``rank`` on each rank."""
    p = dist.get_world_size(group)
    out = torch.empty_like(chunks[0])
    chunks = [c.contiguous() for c in chunks]
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all_reduce the stack and keep our slice. Count the
        # bytes a reduce_scatter would move, which is what the GPU backends do.
        full = torch.stack(chunks)
        dist.all_reduce(full, group=group)
        out.copy_(full[dist.get_rank(group)])
    else:
        dist.reduce_scatter(out, chunks, group=group)
    COUNTER.add("reduce_scatter", (p - 1) * _nbytes(out), (p - 1) * _nbytes(out))
    return out


class PendingGather:
    """An all-gather in flight (``all_gather_async``); ``wait()`` -> [P, *x.shape]."""

    def __init__(self, out: torch.Tensor, work):
        self.out, self.work = out, work

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out


def all_gather_async(x: torch.Tensor, group) -> PendingGather:
    """Start gathering ``x`` (same shape on every rank) from all ranks of ``group``; the
    caller overlaps work and then calls ``wait()``. Counted when issued."""
    p = dist.get_world_size(group)
    out, work = _gather_into(x, group, async_op=True)
    COUNTER.add("all_gather", (p - 1) * _nbytes(x), (p - 1) * _nbytes(x))
    return PendingGather(out, work)


def all_to_all(outputs: list[torch.Tensor], inputs: list[torch.Tensor], group) -> None:
    rank = dist.get_rank(group)
    dist.all_to_all(outputs, [t.contiguous() for t in inputs], group=group)
    COUNTER.add(
        "all_to_all",
        sum(_nbytes(t) for i, t in enumerate(inputs) if i != rank),
        sum(_nbytes(t) for i, t in enumerate(outputs) if i != rank),
    )


def send_recv(send: torch.Tensor, recv: torch.Tensor, dst: int, src: int, group) -> list:
    """Post an async send to group rank ``dst`` and receive from ``src``; returns the works."""
    ops = [
        dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, dst), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group),
    ]
    COUNTER.add("send_recv", _nbytes(send), _nbytes(recv))
    return dist.batch_isend_irecv(ops)


def exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group, op: str = "exchange") -> None:
    """Point-to-point exchange within ``group``: send ``sends[dst]`` to each dst and fill
    ``recvs[src]`` from each src (group ranks), all posted at once, then wait."""
    ops = [
        dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, dst), group)
        for dst, t in sorted(sends.items())
    ]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, src), group) for src, t in sorted(recvs.items())]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    COUNTER.add(op, sum(_nbytes(t) for t in sends.values()), sum(_nbytes(t) for t in recvs.values()))


def p2p(
    group,
    send: torch.Tensor | None = None,
    dst: int | None = None,
    recv: torch.Tensor | None = None,
    src: int | None = None,
) -> None:
    """Blocking point-to-point: send ``send`` to group rank ``dst`` and/or fill ``recv`` from
    group rank ``src`` (a chain hop, e.g. LASP-1's state pass)."""
    exchange({} if send is None else {dst: send}, {} if recv is None else {src: recv}, group, op="send_recv")


def all_to_all_uneven(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Start an all-to-all of uneven sizes: 1-D ``inp`` cut in ``in_splits`` (elements per
    destination group rank) goes out, ``out`` is filled in ``out_splits`` (per source).
    Returns the work (``wait()`` before reading ``out``). Counted when issued, self excluded."""
    rank = dist.get_rank(group)
    work = dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group, async_op=True)
    e = inp.element_size()
    COUNTER.add("all_to_all", (sum(in_splits) - in_splits[rank]) * e, (sum(out_splits) - out_splits[rank]) * e)
    return work
