"""A cost model of one training step under context parallelism, per layer and per rank, for
every registered CP strategy. Arithmetic, plus one small CPU forward per mixer for the
activation bytes: it imports nothing from ``torch.distributed`` and runs no collective, so a
cluster not yet booked can be planned on a laptop.

What it counts, and where each number comes from (one source of truth each):
    core FLOPs    the mixer's own ``core_flops(cfg, layer, doc_lens)`` (the MFU count: pairs
                  the mask allows per document, causal, windowed, sparse pattern), times the
                  compute balance of the strategy: max / mean over ranks of the pairs each rank
                  computes (``parallel.cad_plan``: the layout's placement, or CAD's plan)
    GEMM FLOPs    6 x the block's parameters x the rank's tokens (fwd + bwd; 8 x with
                  activation checkpointing, which recomputes the forward)
    bytes         the strategy's own ``forward_bytes(LayerShape)`` (CAD: ``forward_bytes_of``
                  the batch's documents), the formulas the gloo tests check against
                  ``parallel.comm``'s counts; backward bytes from ``backward_bytes`` where the
                  strategy states it, else the ratio in ``BACKWARD`` (why beside each). A layer
                  that calls several kinds (liger, lolcats, lizard: the mixer's ``calls``) costs
                  every call under its kind's strategy; a call with a reach (window, delay)
                  served point to point counts, per rank, the chunks that reach needs
                  (``reach_bytes``), and the layer's bytes are the busiest rank's sum
    memory        parameters, gradients and Adam states, the activations a block keeps for
                  backward (traced from the mixer's code at small widths and extrapolated:
                  parallel/activation_trace.py), the strategy's extra (all-gather without
                  regather keeps the gathered K/V), autocast's bf16 weight copies, the logits
    time          FLOPs / (peak x achieved fraction) of the cluster profile; bytes / link
                  bandwidth + steps x latency; combined by the overlap rule of each strategy
                  (``OVERLAP``): communication that runs under the core op costs
                  max(core, comm), otherwise core + comm. GEMMs never hide communication.

Shapes: N = seq_len tokens per row, B rows per micro-batch (one CP group holds them), P = cp
ranks per CP group, C = N / P tokens per rank.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import lru_cache

import torch

from models.config import ModelConfig
from models.mixers import mixer_class
from parallel.cad_plan import plan_cad
from parallel.strategies import STRATEGIES, LayerShape, build_strategy

# Communication under the core op? "overlap": the strategy issues its collective and computes
# meanwhile (ring: next K/V block in flight during this block; LASP-2: the state all-gather
# during the intra-chunk work, lasp2.py; CAD with ping_pong: one nano-batch's all-to-all under
# the other's attention). "serial": the core op needs the data first (all-gather KV, Ulysses'
# all-to-alls, S2's tile exchange, CAD without ping-pong) or the chain is sequential (LASP-1:
# rank r waits for r-1's state).
OVERLAP = {
    "allgather": "serial",
    "ring": "overlap",
    "ulysses": "serial",
    "usp": "mixed",  # Ulysses all-to-alls serial, its ring part overlapped
    "cad": "serial",  # "overlap" with ping_pong (see layer_cost)
    "lasp2": "overlap",
    "lasp1": "serial",
    "s2": "serial",
    "local": "serial",
}

# Backward bytes / forward bytes, where the strategy does not state backward_bytes:
BACKWARD = {
    "ring": 2.0,  # (unused: _bytes counts K/V again plus the dK/dV accumulators in fp32, ring.py)
    "ulysses": 1.0,  # the same all-to-alls reversed: dO in, dq/dk/dv back
    "cad": 1.0,  # dO out to the computing ranks, dQ and dK/dV back: the forward's rows
    "lasp1": 1.0,  # dL/dS travels the chain back: one state per hop
    "s2": 1.0,  # dK/dV of every received tile back to its owner
    "local": 0.0,
}
# lasp2 (fused path): all-gathers dL/dS_in only, the states without the decay vector:
# Dv / (Dv + 1) of the forward (lasp2.py). usp: Ulysses part 1x, ring part 2x.

# Ring-style softmax strategies (ring, USP's ring part) merge each step's partial result on the
# compute stream, in the accumulation dtype a = max(4, element bytes) (parallel/strategies/ring.py):
# forward merge_lse (o * w, o_i * w_i, their sum: 7 accesses per output element), backward dq += and
# the travelling dK/dV accumulator += (3 accesses per element each); K/V cast up to a each step when
# stored narrower. Memory-bound: bytes / memory_gbps, serial (never under the exchange).
MERGE_FWD_ACCESSES, MERGE_BWD_ACCESSES = 7, 3

# Ring-style strategies: every step waits for the slowest link of the ring, which crosses
# nodes once the group does; collectives take each peer's bytes over its own link.
RING_LIKE = {"ring", "lasp1"}


@dataclass(frozen=True)
class Cluster:
    """A hardware profile (conf/cluster/*.yaml; each value's source is written beside it)."""

    name: str
    peak_tflops: dict  # dtype -> dense peak TFLOP/s per device (bf16, fp32)
    gemm_fraction: float  # achieved / peak for large GEMMs
    attention_fraction: float  # achieved / peak for the fused attention kernels (fwd + bwd)
    hbm_gib: float  # device memory
    intra_node_gbps: float  # GB/s one device receives over the node's links (per direction)
    inter_node_gbps: float  # GB/s one device receives from other nodes (its NIC share)
    intra_node_latency_us: float  # per message inside a node
    inter_node_latency_us: float  # per message across nodes
    gpus_per_node: int
    memory_gbps: float  # device memory bandwidth of elementwise passes (the unfused linear op's)
    linear_fused: bool  # the linear op runs as fused kernels (fla on CUDA): no elementwise passes to memory
    op_overhead_us: float  # one small op / kernel launch
    linear_call_us: float  # fixed cost of one fwd + bwd call of the chunked linear op
    usable_memory_fraction: float = 0.9  # what the allocator leaves usable (fragmentation, workspace)
    source: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> Cluster:
        """Build from a yaml mapping; unknown or missing keys raise one line naming them."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"cluster profile {d.get('name')!r} has unknown keys {sorted(unknown)}: remove them")
        missing = {f.name for f in fields(cls) if f.default is MISSING} - set(d)
        if missing:
            raise ValueError(f"cluster profile {d.get('name')!r} lacks {sorted(missing)}: add them")
        c = cls(**d)
        c.check()
        return c

    def check(self) -> None:
        for key in ("gemm_fraction", "attention_fraction", "usable_memory_fraction"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise ValueError(f"cluster {self.name}: {key}={v} must be in (0, 1]")
        for key in ("hbm_gib", "intra_node_gbps", "inter_node_gbps", "gpus_per_node", "memory_gbps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"cluster {self.name}: {key}={getattr(self, key)} must be > 0")
        if not self.peak_tflops or min(self.peak_tflops.values()) <= 0:
            raise ValueError(f"cluster {self.name}: peak_tflops needs positive entries, e.g. {{bf16: 989}}")

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ValueError(f"cluster {self.name} has no peak for dtype {dtype!r}: give peak_tflops.{dtype}")
        return self.peak_tflops[dtype] * 1e12

    def link(self, group: int, ring_like: bool) -> tuple[float, float]:
        """(seconds per byte, seconds per message) of a collective over ``group`` consecutive
        ranks (a CP group fills nodes first). A collective receives (group - g) / (group - 1) of
        its bytes from other nodes (g = ranks per node in the group) and the rest over NVLink,
        both at once; a ring step waits for its slowest hop."""
        g = min(group, self.gpus_per_node)
        if group <= g:
            return 1 / (self.intra_node_gbps * 1e9), self.intra_node_latency_us * 1e-6
        if ring_like:
            return 1 / (self.inter_node_gbps * 1e9), self.inter_node_latency_us * 1e-6
        cross = (group - g) / (group - 1)
        per_byte = max(cross / self.inter_node_gbps, (1 - cross) / self.intra_node_gbps) / 1e9
        return per_byte, self.inter_node_latency_us * 1e-6


@dataclass
class RunSpec:
    """What one step trains and how it is parallelised.

    ``doc_lens``: document lengths of one row (sum = seq_len); None: one document per row.
    ``strategies`` / ``options``: per mixer kind, as ``parallel.cp.strategies`` / ``options``.
    ``dp``: data-parallel replicas (each a CP group of ``cp`` ranks); ``fsdp``: parameters,
    gradients and optimizer states sharded over all ``dp * cp`` ranks."""

    model: ModelConfig
    seq_len: int
    cp: int = 1
    strategies: dict = field(default_factory=lambda: {"softmax": "allgather", "linear": "lasp2", "sparse": "s2"})
    options: dict = field(default_factory=dict)
    layout: str = "zigzag"
    batch: int = 1
    doc_lens: tuple | None = None
    dp: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False
    loss_chunk: int = 0
    dtype: str = "bf16"

    @property
    def elem_bytes(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[self.dtype]

    @property
    def docs(self) -> tuple:
        return tuple(self.doc_lens) if self.doc_lens else (self.seq_len,)

    def strategy_name(self, kind: str) -> str:
        from parallel.strategies import DEFAULTS

        return self.strategies.get(kind) or DEFAULTS[kind]

    def strategy(self, kind: str):
        return build_strategy(self.strategy_name(kind), kind, **dict(self.options.get(kind) or {}))


@dataclass
class LayerCost:
    """One layer on the busiest rank (all times in seconds, fwd + bwd unless named)."""

    layer: int
    kind: str
    strategy: str
    gemm_flops: float
    core_flops: float  # this rank's, balance included
    balance: float
    fwd_bytes: int
    bwd_bytes: int
    gemm_s: float
    core_s: float
    comm_s: float
    time_s: float
    overlap: str


@dataclass
class StepCost:
    layers: list
    head_s: float
    dp_exposed_s: float
    step_s: float
    tokens_per_s: float  # whole cluster
    model_flops: float  # per step, all ranks (MFU numerator: 6 N_matmul T + core, trainer/metrics)
    mfu: float
    memory_bytes: int  # per device
    memory_parts: dict
    fits: bool
    world: int

    def summary(self) -> dict:
        comm = sum(c.comm_s for c in self.layers)
        core = sum(c.core_s for c in self.layers)
        gemm = sum(c.gemm_s for c in self.layers) + self.head_s
        return dict(
            step_s=self.step_s,
            tokens_per_s=self.tokens_per_s,
            mfu=self.mfu,
            memory_gib=self.memory_bytes / 2**30,
            fits=self.fits,
            gemm_s=gemm,
            core_s=core,
            comm_s=comm,
        )


# ----------------------------------------------------------------------------- shapes
def layer_params(cfg: ModelConfig, layer: int) -> int:
    """Parameters of block ``layer`` (its mixer, MLP and norms), counted on the meta device."""
    from models.llama import Block

    with torch.device("meta"):
        block = Block(cfg, layer)
    return sum(p.numel() for p in block.parameters())


def layer_shape(spec: RunSpec, layer: int) -> LayerShape:
    """The ``LayerShape`` the strategy's byte formula takes for this layer."""
    cfg, kind = spec.model, spec.model.kind_of(layer)
    pattern = None
    if kind == "sparse":
        from models.s2_attention import layer_pattern

        pattern = layer_pattern(cfg, layer, check_coverage=False)
    linear, latent, head_dim, n_kv = kind == "linear", None, cfg.hd, cfg.n_kv_heads
    if kind == "mla":  # mla_latent gathers Dc + Dr numbers per token; mla_kv all heads' K/V padded
        from models.registry import options_of

        dc, dn, dr, dv = options_of(cfg, "mla").dims(cfg)
        latent, head_dim, n_kv = dc + dr, max(dn + dr, dv), cfg.n_heads
    return LayerShape(
        batch=spec.batch,
        seq_len=spec.seq_len,
        cp=spec.cp,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads if linear else n_kv,
        head_dim=head_dim,
        elem_bytes=spec.elem_bytes,
        layout=spec.layout,
        pattern=pattern,
        latent_dim=latent,
    )


@dataclass(frozen=True)
class Call:
    """One context call of a layer: its kind, the shape its strategy's byte formula takes, and
    its reach (``window`` keys of a window branch, ``delay`` positions of the delay kind)."""

    kind: str
    shape: LayerShape
    window: int | None = None
    delay: int | None = None


def layer_calls(spec: RunSpec, layer: int) -> list[Call]:
    """Every context call of ``layer``: the mixer's own ``calls(cfg)`` (two-kind layers), else
    one call of its kind with ``layer_shape``."""
    cfg = spec.model
    calls = getattr(mixer_class(cfg.mixer_of(layer)), "calls", None)
    if calls is None:
        return [Call(cfg.kind_of(layer), layer_shape(spec, layer))]
    base = LayerShape(spec.batch, spec.seq_len, spec.cp, cfg.n_heads, cfg.n_kv_heads, cfg.hd, spec.elem_bytes)
    out = []
    for c in calls(cfg):
        c = dict(c)
        kind, window, delay = c.pop("kind"), c.pop("window", None), c.pop("delay", None)
        out.append(Call(kind, replace(base, layout=spec.layout, **c), window, delay))
    return out


def cu_seqlens(spec: RunSpec) -> torch.Tensor:
    """Document starts of the [B, N] batch (every row the same documents), [n + 1]."""
    starts, off = [0], 0
    for _ in range(spec.batch):
        for n in spec.docs:
            off += int(n)
            starts.append(off)
    return torch.tensor(starts, dtype=torch.int64)


# ----------------------------------------------------------------------------- the linear op
# The chunked linear-attention op (models/ops/linear_attention/chunk.py; fla's chunk kernels on
# CUDA compute the same tiles), per token and head, fwd + bwd, with C the chunk and D the head dim:
#   matmuls   forward 4 (scores q k^T and A v: C x D each; readout q S_in and state k^T v: D x D
#             each, 2 FLOPs a multiply-add), backward 10 (scores and states recomputed, dA, dq,
#             dk, dv, dS): 14 C D + 14 D^2 FLOPs, the C x C tile computed whole (masked after)
#   passes    the unfused torch op's elementwise traffic in fp32 elements: over the [C, C] tile
#             23 (decay built twice: difference, clamp, exp, tril; the score and dA products),
#             over the [C, D] rows 42 (chunked copies, decayed q and k, the db chain, unchunking)
#   scan      12 small ops per chunk (3 scans: forward, recomputed, reverse; per chunk 3 views
#             and one multiply-add), sequential
#   call      a fixed cost per fwd + bwd call (autograd, the op's setup)
LINEAR_MATMUL = 14
LINEAR_TILE_PASSES, LINEAR_ROW_PASSES, LINEAR_SCAN_OPS = 23, 42, 12


def linear_core_seconds(cluster: Cluster, cfg: ModelConfig, rows: int, tokens: int, dtype: str) -> float:
    """fwd + bwd seconds of the chunked linear op on ``rows`` rows of ``tokens`` tokens each (one
    rank's share): executed matmul FLOPs at the attention rate, plus (unfused op) its elementwise
    passes at ``memory_gbps`` and its chunk scan at ``op_overhead_us`` per op, plus one call."""
    c, d, h = cfg.linear_chunk_size or 64, cfg.hd, cfg.n_heads
    chunks = rows * math.ceil(tokens / c)
    th = chunks * c * h  # token-heads, padded to whole chunks
    t = th * LINEAR_MATMUL * (c * d + d * d) / (cluster.peak(dtype) * cluster.attention_fraction)
    if not cluster.linear_fused:
        t += th * (LINEAR_TILE_PASSES * c + LINEAR_ROW_PASSES * d) * 4 / (cluster.memory_gbps * 1e9)
        t += chunks * LINEAR_SCAN_OPS * cluster.op_overhead_us * 1e-6
    return t + cluster.linear_call_us * 1e-6


# ----------------------------------------------------------------------------- per layer
def compute_balance(spec: RunSpec, layer: int, strat) -> float:
    """max / mean over CP ranks of the (query, key) pairs each computes (1.0 for linear
    mixers: their work is per token). Sequence-sharded strategies compute in the layout's
    placement; Ulysses spreads heads (balanced); USP sums its Ulysses groups; CAD plans."""
    kind = spec.model.kind_of(layer)
    if spec.cp == 1 or kind == "linear" or strat.name == "ulysses":
        return 1.0
    window = spec.model.sliding_window if kind != "linear" else None
    if strat.name == "cad":
        return _cad(spec, strat)[0]
    loads = _home_loads(spec.docs, spec.batch, spec.seq_len, spec.cp, spec.layout, window)
    if strat.name == "usp":
        u = strat.degree(spec.cp, spec.model.n_heads)
        loads = [sum(loads[g : g + u]) for g in range(0, spec.cp, u)]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


@lru_cache(maxsize=256)
def _home_loads(docs: tuple, batch: int, seq_len: int, cp: int, layout: str, window) -> list[int]:
    """Pairs each rank computes in the layout's own placement (ring, all-gather, USP)."""
    cu = cu_seqlens(RunSpec(ModelConfig(), seq_len, batch=batch, doc_lens=docs))
    return plan_cad(cu, batch, seq_len, cp, layout, window=window, tolerance=math.inf).home_load


def allgather_sources(spec: RunSpec, strat) -> int:
    """The most other ranks' K/V chunks a rank receives under all-gather's gather="needed":
    the strategy's own need matrix (causal prefix, window, shared documents) for this batch."""
    from parallel.context import CPContext
    from parallel.strategies.allgather import need_matrix

    window = spec.model.sliding_window
    key = (spec.docs, spec.batch, spec.seq_len, spec.cp, spec.layout, window)
    if key not in _NEED:
        ctx = CPContext(strat, None, 0, spec.cp, spec.layout, spec.seq_len, spec.batch, cu_seqlens(spec))
        need = need_matrix(ctx, True, window)
        _NEED[key] = max(sum(row) - 1 for row in need)
    return _NEED[key]


_NEED: dict = {}
_CAD: dict = {}


def _cad(spec: RunSpec, strat) -> tuple[float, int, int]:
    """(compute balance of CAD's plan, bytes its busiest rank receives: ``forward_bytes_of``,
    most bytes a rank holds for attention: ``CADPlan.memory``)."""
    cfg, window = spec.model, spec.model.sliding_window
    shape = LayerShape(
        spec.batch, spec.seq_len, spec.cp, cfg.n_heads, cfg.n_kv_heads, cfg.hd, spec.elem_bytes, spec.layout
    )
    key = (shape, spec.docs, window, strat.min_shard, strat.tolerance, strat.ping_pong)
    if key not in _CAD:
        cu = cu_seqlens(spec)
        plan = strat._plan_of(
            cu, spec.batch, spec.seq_len, spec.cp, spec.layout, True, window, cfg.n_heads, 2 * cfg.n_kv_heads
        )
        held = max(plan.memory(r, cfg.n_heads, cfg.n_kv_heads, cfg.hd, spec.elem_bytes) for r in range(spec.cp))
        _CAD[key] = (plan.balance(), strat.forward_bytes_of(shape, cu, window=window), held)
    return _CAD[key]


def _bytes(spec: RunSpec, layer: int, strat) -> tuple[int, int, int]:
    """(forward, backward, of which overlapped-able ring part) bytes one rank receives for the
    layer's primary kind (``layer_bytes``: every call of a two-kind layer)."""
    return _call_bytes(spec, spec.model.kind_of(layer), layer_shape(spec, layer), strat)


def _call_bytes(spec: RunSpec, kind: str, shape: LayerShape, strat) -> tuple[int, int, int]:
    """``_bytes`` of one call of kind ``kind`` and shape ``shape``."""
    if spec.cp == 1:
        return 0, 0, 0
    if strat.name == "cad":
        fwd = _cad(spec, strat)[1]
    else:
        fwd = strat.forward_bytes(shape)
    if strat.name == "allgather" and strat.gather == "needed":
        fwd = fwd * allgather_sources(spec, strat) // max(1, spec.cp - 1)
    if hasattr(strat, "backward_bytes"):
        if strat.name == "allgather":
            return fwd, (2 if strat.regather else 1) * fwd, 0
        return fwd, strat.backward_bytes(shape), 0
    if strat.name == "lasp2":
        return fwd, int(fwd * shape.head_dim / (shape.head_dim + 1)), fwd
    acc = max(4, spec.elem_bytes)
    if strat.name == "ring":  # K/V again (P - 1 hops), then the fp32 dK/dV accumulators (P hops)
        return fwd, int(fwd + fwd * spec.cp * acc // ((spec.cp - 1) * spec.elem_bytes)), 0
    if strat.name == "usp":
        u = strat.degree(spec.cp, shape.n_heads)
        uly = strat.forward_bytes(replace(shape, cp=u, seq_len=shape.seq_len * u // spec.cp))
        ring, r = fwd - uly, spec.cp // u
        ring_bwd = ring + (ring * r * acc // ((r - 1) * spec.elem_bytes) if r > 1 else 0)
        return fwd, uly + ring_bwd, ring
    if kind == "linear" and strat.name not in BACKWARD:
        raise ValueError(f"the cost model has no backward rule for strategy {strat.name!r}: add it to BACKWARD")
    return fwd, int(fwd * BACKWARD.get(strat.name, 1.0)), 0


def reach_bytes(spec: RunSpec, call: Call, strat) -> tuple[list[int], list[int]] | None:
    """Per rank (forward, backward) bytes of a call with a reach served point to point, from
    the strategy's own need matrix (the layout, the documents, the reach): all-gather
    ``gather="needed"`` and gather_window receive the K/V chunks their window reaches and
    return dK / dV to the chunks' owners (all-gather with ``regather`` gathers again first);
    halo receives the whole shards holding the positions ``delay`` back and returns their
    gradients. None for any other call (its formula is the same on every rank)."""
    from parallel.context import CPContext

    s, p = call.shape, spec.cp
    ctx = CPContext(strat, None, 0, p, spec.layout, spec.seq_len, spec.batch, cu_seqlens(spec))
    if strat.name == "halo" and call.delay is not None:
        from parallel.strategies.halo import delay_sources

        sources = delay_sources(ctx, call.delay)
        need = [[j in sources[r] for j in range(p)] for r in range(p)]
        shard, again = s.batch * (s.seq_len // p) * s.n_heads * s.head_dim * s.elem_bytes, False
    elif call.window is not None and (
        strat.name == "gather_window" or (strat.name == "allgather" and strat.gather == "needed")
    ):
        from parallel.strategies.allgather import need_matrix

        need = need_matrix(ctx, True, call.window)
        shard, again = strat.forward_bytes(s) // (p - 1), strat.name == "allgather" and strat.regather
    else:
        return None
    got = [sum(need[r]) - 1 for r in range(p)]  # chunks rank r receives
    given = [sum(need[t][r] for t in range(p)) - 1 for r in range(p)]  # ranks that read r's chunk
    return [g * shard for g in got], [(g * again + t) * shard for g, t in zip(got, given)]


def call_bytes(spec: RunSpec, call: Call, strat) -> tuple[list[int], list[int], int]:
    """(forward bytes per rank, backward bytes per rank, ring part) of one call."""
    if spec.cp > 1:
        per_rank = reach_bytes(spec, call, strat)
        if per_rank is not None:
            return *per_rank, 0
    fwd, bwd, ring = _call_bytes(spec, call.kind, call.shape, strat)
    return [fwd] * spec.cp, [bwd] * spec.cp, ring


def _each_call(spec: RunSpec, calls: list[Call]) -> list[tuple]:
    """(strategy, forward bytes per rank, backward bytes per rank, ring part) of every call."""
    return [(s, *call_bytes(spec, call, s)) for call in calls for s in [spec.strategy(call.kind)]]


def _busiest(each: list[tuple]) -> tuple[int, int]:
    """(forward, backward) bytes of the busiest rank, ``_each_call``'s calls summed per rank."""
    return max(map(sum, zip(*(f for _, f, _, _ in each)))), max(map(sum, zip(*(b for _, _, b, _ in each))))


def layer_bytes(spec: RunSpec, layer: int) -> tuple[int, int]:
    """(forward, backward) bytes the busiest rank receives in ``layer``, every call summed
    (the layer's primary-kind ``_bytes`` when it makes one call)."""
    calls = layer_calls(spec, layer)
    if len(calls) == 1 or spec.cp == 1:
        strat = spec.strategy(calls[0].kind) if spec.cp > 1 else build_strategy("local")
        return _bytes(spec, layer, strat)[:2]
    return _busiest(_each_call(spec, calls))


def merge_seconds(cluster: Cluster, spec: RunSpec, layer: int, strat) -> tuple[float, float]:
    """(forward, backward) seconds a ring-style softmax strategy spends merging partial results
    and accumulating gradients, per layer on one rank (see MERGE_FWD_ACCESSES); 0 for the others."""
    if spec.cp == 1 or strat.name not in ("ring", "usp") or spec.model.kind_of(layer) == "linear":
        return 0.0, 0.0
    cfg, e = spec.model, spec.elem_bytes
    a = max(4, e)
    steps = spec.cp if strat.name == "ring" else spec.cp // strat.degree(spec.cp, cfg.n_heads)
    if steps <= 1:
        return 0.0, 0.0
    tokens = spec.batch * spec.seq_len // spec.cp  # as many elements on a USP rank (u x tokens, H / u heads)
    out, kv = tokens * cfg.n_heads * cfg.hd, 2 * tokens * cfg.n_kv_heads * cfg.hd
    cast = kv * (e + a) if e < a else 0
    fwd = steps * (out * MERGE_FWD_ACCESSES * a + cast)
    bwd = steps * ((out + kv) * MERGE_BWD_ACCESSES * a + cast)
    bw = cluster.memory_gbps * 1e9
    return fwd / bw, bwd / bw


def _comm_seconds(cluster: Cluster, spec: RunSpec, strat, nbytes: int, ring_part: int = 0) -> tuple[float, float]:
    """(serial seconds, overlappable seconds) of ``nbytes`` for one direction of one layer."""
    if nbytes == 0:
        return 0.0, 0.0
    p = spec.cp
    name = strat.name
    if name == "usp":
        u = strat.degree(p, spec.model.n_heads)
        per_byte_u, lat_u = cluster.link(u, False)
        # the ring groups take every u-th rank: they span nodes once the CP group does
        per_byte_r, lat_r = cluster.link(p, True) if p > cluster.gpus_per_node else cluster.link(p // u, True)
        uly = (nbytes - ring_part) * per_byte_u + (u - 1) * lat_u * 2
        ring = ring_part * per_byte_r + (p // u - 1) * lat_r
        return uly, ring
    per_byte, lat = cluster.link(p, name in RING_LIKE)
    steps = (p - 1) * (2 if name == "ulysses" else 1)  # Ulysses: two all-to-alls per direction
    t = nbytes * per_byte + steps * lat
    if name == "lasp1":  # the chain: P-1 sequential hops of one state each
        t = nbytes * per_byte * (p - 1) + steps * lat
    overlapped = OVERLAP.get(name) == "overlap" or (name == "cad" and getattr(strat, "ping_pong", False))
    return (0.0, t) if overlapped else (t, 0.0)


def layer_cost(cluster: Cluster, spec: RunSpec, layer: int, params: int | None = None) -> LayerCost:
    """Costs of ``layer`` on the busiest rank of a CP group, fwd + bwd."""
    cfg = spec.model
    kind = cfg.kind_of(layer)
    strat = spec.strategy(kind) if spec.cp > 1 else build_strategy("local")
    params = layer_params(cfg, layer) if params is None else params
    tokens = spec.batch * spec.seq_len / spec.cp
    recompute = spec.activation_checkpointing
    gemm_flops = (8 if recompute else 6) * params * tokens
    core_total = mixer_class(cfg.mixer_of(layer)).core_flops(cfg, layer, list(spec.docs)) * spec.batch
    balance = compute_balance(spec, layer, strat)
    core_flops = core_total * balance / spec.cp * (4 / 3 if recompute else 1)
    peak = cluster.peak(spec.dtype)
    gemm_s = gemm_flops / (peak * cluster.gemm_fraction)
    core_s = core_flops / (peak * cluster.attention_fraction)
    calls = layer_calls(spec, layer)
    if len(calls) == 1 or spec.cp == 1:
        fwd_b, bwd_b, ring_b = _bytes(spec, layer, strat)
        bwd_ring = 2 * ring_b if strat.name == "usp" else ring_b
        f_serial, f_over = _comm_seconds(cluster, spec, strat, fwd_b, ring_b)
        b_serial, b_over = _comm_seconds(cluster, spec, strat, bwd_b, bwd_ring)
    else:  # every call, each under its kind's strategy and overlap rule
        each = _each_call(spec, calls)
        fwd_b, bwd_b = _busiest(each)
        f_serial = f_over = b_serial = b_over = 0.0
        for s, f, b, ring in each:
            serial, over = _comm_seconds(cluster, spec, s, max(f), ring)
            f_serial, f_over = f_serial + serial, f_over + over
            serial, over = _comm_seconds(cluster, spec, s, max(b), 2 * ring if s.name == "usp" else ring)
            b_serial, b_over = b_serial + serial, b_over + over
    passes = [(1 / 3, f_serial, f_over), (2 / 3, b_serial, b_over)]
    if recompute:  # the recomputed forward exchanges again
        passes.append((1 / 3, f_serial, f_over))
    core_one = core_total * balance / spec.cp * 1.0 / (peak * cluster.attention_fraction)
    if kind == "linear":  # the op's executed work, not the MFU count (see linear_core_seconds)
        core_one = linear_core_seconds(cluster, cfg, spec.batch, spec.seq_len // spec.cp, spec.dtype)
        if len(calls) > 1:  # a two-kind layer's other branch (window pairs): FLOPs beyond the linear count
            linear_flops = mixer_class("linear").core_flops(cfg, layer, list(spec.docs)) * spec.batch
            core_one += max(0.0, core_total - linear_flops) / spec.cp / (peak * cluster.attention_fraction)
        core_s = core_one * (4 / 3 if recompute else 1)
    merge_f, merge_b = merge_seconds(cluster, spec, layer, strat)
    time_core = sum(max(share * core_one, over) + serial for share, serial, over in passes)
    time_core += merge_f * (2 if recompute else 1) + merge_b
    core_s += merge_f * (2 if recompute else 1) + merge_b
    comm_s = sum(serial + over for _, serial, over in passes)
    overlap = OVERLAP.get(strat.name, "serial")
    if strat.name == "cad" and getattr(strat, "ping_pong", False):
        overlap = "overlap"
    return LayerCost(
        layer=layer,
        kind=kind,
        strategy="+".join(dict.fromkeys(spec.strategy_name(c.kind) for c in calls)) if spec.cp > 1 else strat.name,
        gemm_flops=gemm_flops,
        core_flops=core_flops,
        balance=balance,
        fwd_bytes=fwd_b,
        bwd_bytes=bwd_b,
        gemm_s=gemm_s,
        core_s=core_s,
        comm_s=comm_s,
        time_s=gemm_s + time_core,
        overlap=overlap,
    )


# ----------------------------------------------------------------------------- memory
def _core_held_bytes(spec: RunSpec, hkv: int) -> int:
    """q and o [C, H, D], k and v [C, hkv, D] in the compute dtype and the fp32 log-sum-exp
    [H, C] of one rank: what the core op saves before any strategy's extra."""
    cfg = spec.model
    tokens = spec.batch * spec.seq_len // spec.cp
    lse = cfg.n_heads * tokens * max(4, spec.elem_bytes)
    return (2 * cfg.n_heads + 2 * hkv) * cfg.hd * tokens * spec.elem_bytes + lse


def attention_saved_bytes(spec: RunSpec, layer: int) -> int:
    """Bytes the core op of a softmax / sparse layer keeps for backward on the busiest rank: q
    and o [C, H, D], k and v [C, Hkv', D] in the compute dtype and the fp32 log-sum-exp [H, C]
    (the kernel's saved tensors; bench.cp's ``peak_mem_mb`` on CPU). Hkv' = Hkv, or the
    replicated count when Ulysses / USP must split fewer KV heads than ranks (the head-sharded
    [N, H/P] tensors hold as much as the sequence-sharded ones); all-gather without regather
    also keeps the gathered K/V; CAD: its plan's Q, O and attended K/V (``CADPlan.memory``)."""
    from parallel.strategies.ulysses import kv_heads_for

    cfg = spec.model
    hkv = cfg.n_kv_heads
    strat = spec.strategy(cfg.kind_of(layer)) if spec.cp > 1 else None
    if strat is not None and strat.name == "cad":
        lse = cfg.n_heads * (spec.batch * spec.seq_len // spec.cp) * max(4, spec.elem_bytes)
        return _cad(spec, strat)[2] + lse
    if strat is not None and strat.name in ("ulysses", "usp"):
        u = spec.cp if strat.name == "ulysses" else strat.degree(spec.cp, cfg.n_heads)
        hkv = kv_heads_for(cfg.n_heads, cfg.n_kv_heads, u)
    held = _core_held_bytes(spec, hkv)
    if strat is not None and strat.name == "allgather" and not strat.regather:
        held += 2 * spec.batch * spec.seq_len * hkv * cfg.hd * spec.elem_bytes  # gather="all" bound
    return held


def core_extra_bytes(spec: RunSpec, layer: int) -> int:
    """What the layer's CP strategy keeps beyond the one-device core op's q, k, v, o and lse
    (``attention_saved_bytes`` minus them: Ulysses' replicated KV heads, all-gather's gathered K/V,
    CAD's plan), for softmax and sparse layers; 0 for the others and without CP."""
    if spec.cp == 1 or spec.model.kind_of(layer) not in ("softmax", "sparse"):
        return 0
    return attention_saved_bytes(spec, layer) - _core_held_bytes(spec, spec.model.n_kv_heads)


def activation_bytes(spec: RunSpec, layer: int) -> int:
    """Bytes block ``layer`` keeps for backward on one rank (no checkpointing): what one block
    saves over the rank's C = N / P tokens of each of the B rows, traced from the mixer's own code
    (parallel/activation_trace.py: norms, projections, rotary, the mixer's branches and features,
    the core op, the MLP; exact at one device on CPU), plus the strategy's extra
    (``core_extra_bytes``)."""
    from parallel.activation_trace import block_activation_bytes

    per_row = block_activation_bytes(spec.model, layer, spec.seq_len // spec.cp, spec.dtype)
    return spec.batch * per_row + core_extra_bytes(spec, layer)


def memory(cluster: Cluster, spec: RunSpec, n_params: int) -> tuple[int, dict]:
    """(bytes per device, parts). States: fp32 parameters, gradients and two Adam moments,
    16 bytes per parameter (longctx keeps fp32 masters under bf16 autocast), sharded over
    dp * cp with FSDP. Activations: every block's (``activation_bytes``), or with activation
    checkpointing each block's input plus one block's full set during its recompute. Weight
    copies (bf16 autocast): the bf16 weights each block's linears save from forward to backward,
    whole even under FSDP (one block's with checkpointing). Logits: fp32 [tokens, vocab] and its
    gradient, or ``loss_chunk`` tokens at a time."""
    from parallel.activation_trace import block_weight_copy_bytes

    cfg = spec.model
    states = 16 * n_params / (spec.dp * spec.cp if spec.fsdp else 1)
    per_layer = [activation_bytes(spec, i) for i in range(cfg.n_layers)]
    copies = [block_weight_copy_bytes(cfg, i, spec.dtype) for i in range(cfg.n_layers)]
    tokens = spec.batch * spec.seq_len // spec.cp
    if spec.activation_checkpointing:
        acts = cfg.n_layers * tokens * cfg.dim * spec.elem_bytes + max(per_layer)
        copies = max(copies)
    else:
        acts, copies = sum(per_layer), sum(copies)
    logit_tokens = min(spec.loss_chunk, tokens) if spec.loss_chunk else tokens
    logits = 2 * logit_tokens * cfg.vocab_size * 4
    parts = dict(states=int(states), activations=int(acts), weight_copies=int(copies), logits=int(logits))
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------- the step
def _block_params(cfg: ModelConfig) -> list[int]:
    """Parameters per block, built once per distinct mixer (blocks of one mixer are equal)."""
    seen: dict[str, int] = {}
    out = []
    for i in range(cfg.n_layers):
        name = cfg.mixer_of(i)
        if name not in seen:
            seen[name] = layer_params(cfg, i)
        out.append(seen[name])
    return out


def step_cost(cluster: Cluster, spec: RunSpec) -> StepCost:
    """Predicted step (one micro-batch per CP group, fwd + bwd + the DP gradient reduction)."""
    cfg = spec.model
    for kind in cfg.kinds():
        if spec.cp > 1:
            spec.strategy(kind).check(
                n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads if kind == "linear" else cfg.n_kv_heads,
                cp=spec.cp,
                seq_len=spec.seq_len,
                layout=spec.layout,
            )
    blocks = _block_params(cfg)
    cache: dict = {}
    layers = []
    for i in range(cfg.n_layers):
        key = (cfg.mixer_of(i), cfg.kind_of(i) == "sparse" and i)  # sparse layers differ in offset
        if key not in cache:
            cache[key] = layer_cost(cluster, spec, i, blocks[i])
        layers.append(replace(cache[key], layer=i))
    tokens = spec.batch * spec.seq_len / spec.cp
    peak = cluster.peak(spec.dtype)
    head_params = cfg.vocab_size * cfg.dim
    head_s = 6 * head_params * tokens / (peak * cluster.gemm_fraction)
    total = sum(blocks) + head_params * (1 if cfg.tie_embeddings else 2) + cfg.dim
    matmul = total - (0 if cfg.tie_embeddings else head_params)
    world = spec.dp * spec.cp
    # DP: a ring all-reduce of the bf16 gradients (2 (dp-1)/dp of them), overlapped with the
    # backward (DDP buckets); only what outlasts the backward shows
    dp_exposed = 0.0
    if spec.dp > 1:
        per_byte, lat = cluster.link(world, True)
        ar = 2 * (spec.dp - 1) / spec.dp * 2 * total * per_byte + 2 * (spec.dp - 1) * lat
        bwd = sum(c.time_s for c in layers) * 2 / 3
        dp_exposed = max(0.0, ar - bwd)
    step = sum(c.time_s for c in layers) + head_s + dp_exposed
    core = sum(mixer_class(cfg.mixer_of(i)).core_flops(cfg, i, list(spec.docs)) for i in range(cfg.n_layers))
    flops = (6 * matmul * spec.seq_len + core) * spec.batch * spec.dp
    mem, parts = memory(cluster, spec, total)
    return StepCost(
        layers=layers,
        head_s=head_s,
        dp_exposed_s=dp_exposed,
        step_s=step,
        tokens_per_s=spec.batch * spec.seq_len * spec.dp / step,
        model_flops=flops,
        mfu=flops / (step * world * peak),
        memory_bytes=mem,
        memory_parts=parts,
        fits=mem <= cluster.hbm_gib * 2**30 * cluster.usable_memory_fraction,
        world=world,
    )


def registered_strategies(kind: str) -> list[str]:
    """Strategies the model can cost for mixer kind ``kind`` (all registered but ``local``)."""
    return sorted(n for n, cls in STRATEGIES.items() if kind in cls.kinds)


def load_cluster(path: str) -> Cluster:
    """The profile in the yaml file ``path`` (conf/cluster/<name>.yaml)."""
    import yaml

    with open(path) as f:
        return Cluster.from_dict(yaml.safe_load(f))
