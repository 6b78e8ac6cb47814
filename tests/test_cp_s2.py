"""S2 sparse attention under context parallelism: every strategy serving the ``sparse`` kind
(s2, allgather, ring, ulysses, usp), world sizes 1-4, both layouts, both CPU kernel paths (the
tile plan and one masked fused call), exact in fp64 (1e-10) against the single-device reference;
the S2-aware strategy's bytes against its formula."""

import warnings

import pytest
import torch

from models.ops.attention import pattern as pattern_kernel
from models.s2_pattern import s2_pattern
from parallel.strategies import build_strategy, strategy_names
from tests.cp_check import check_strategy, make_case, run_cp

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups


def _pattern(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test patterns leave residues uncovered on purpose
        return s2_pattern(block=16, **kw)


def s2_cases(world):
    n_aligned, n_odd = 2 * world * 16, 2 * world * 13  # zigzag halves of whole blocks / not
    base = dict(b=2, d=8, h=4, causal=True)
    return [
        dict(base, seed=1, n=n_aligned, hkv=4, doc_lens=[n_aligned], window=None,
             pattern=_pattern(stride=4, local=1, n_kv_heads=4, layer_offset=1)),
        dict(base, seed=2, n=n_odd, hkv=2, doc_lens=[5, 30, 1, 9], window=None,
             pattern=_pattern(stride=3, local=2, n_kv_heads=2, dense_heads=(1,))),
        dict(base, seed=3, n=n_odd, hkv=2, doc_lens=[n_odd // 2 + 3], window=21,
             pattern=_pattern(stride=2, local=1, n_kv_heads=2, homogeneous=True, layer_offset=1)),
        dict(base, seed=4, n=n_aligned, hkv=1, doc_lens=[7, n_aligned], window=None,
             pattern=_pattern(stride=2, local=1, n_kv_heads=1)),
    ]  # fmt: skip


def measure_s2_bytes(rank, world, layout):
    """(bytes received by s2 in one forward, rank_forward_bytes, allgather's formula); ring,
    ulysses and allgather (gather=all) on the same S2 layer receive their dense formulas."""
    import torch.distributed as dist

    from parallel import comm
    from parallel.context import CPContext
    from parallel.strategies import LayerShape
    from parallel.strategies.s2 import rank_forward_bytes

    b, n, h, hkv, d = 1, 2 * world * 32, 4, 4, 4
    pattern = _pattern(stride=4, local=2, n_kv_heads=hkv, layer_offset=3)
    q, k, v, _, cu = make_case(0, b, n, h, hkv, d, [n], torch.float32)
    strat = build_strategy("s2")
    ctx = CPContext(strat, dist.group.WORLD, rank, world, layout, n, b, cu, 16)
    idx = ctx.local_index
    comm.COUNTER.reset()
    ctx.run("sparse", q[:, idx], k[:, idx], v[:, idx], causal=True, pattern=pattern)
    got = comm.COUNTER.total_received
    shape = LayerShape(
        batch=b, seq_len=n, cp=world, n_heads=h, n_kv_heads=hkv, head_dim=d, layout=layout, pattern=pattern
    )
    dense = build_strategy("allgather").forward_bytes(shape)
    # the strategies that move dense K/V for S2 layers receive exactly their dense formulas
    dense_kv = [("ring", {}), ("allgather", {"gather": "all"})] + ([("ulysses", {})] if h % world == 0 else [])
    for name, options in dense_kv:
        other = build_strategy(name, **options)
        comm.COUNTER.reset()
        CPContext(other, dist.group.WORLD, rank, world, layout, n, b, cu, 16).run(
            "sparse", q[:, idx], k[:, idx], v[:, idx], causal=True, pattern=pattern
        )
        assert comm.COUNTER.total_received == other.forward_bytes(shape), name
    return got, rank_forward_bytes(shape, rank), dense


def measure_case_bytes(rank, world, layout, c):
    """(bytes s2 receives in one forward for case ``c`` -- documents crossing ranks, windows,
    chunks that are not whole blocks --, its per-document formula, the dense all-gather's)."""
    import torch.distributed as dist

    from parallel import comm
    from parallel.context import CPContext
    from parallel.strategies import LayerShape
    from parallel.strategies.s2 import rank_forward_bytes

    q, k, v, _, cu = make_case(c["seed"], c["b"], c["n"], c["h"], c["hkv"], c["d"], c["doc_lens"], torch.float32)
    ctx = CPContext(build_strategy("s2"), dist.group.WORLD, rank, world, layout, c["n"], c["b"], cu, 16)
    idx = ctx.local_index
    comm.COUNTER.reset()
    ctx.run("sparse", q[:, idx], k[:, idx], v[:, idx], causal=True, window=c["window"], pattern=c["pattern"])
    shape = LayerShape(batch=c["b"], seq_len=c["n"], cp=world, n_heads=c["h"], n_kv_heads=c["hkv"], head_dim=c["d"],
                       layout=layout, pattern=c["pattern"])  # fmt: skip
    formula = rank_forward_bytes(shape, rank, True, cu, c["window"])
    dense = (world - 1) * len(idx) * c["hkv"] * 2 * c["b"] * c["d"] * 4
    return comm.COUNTER.total_received, formula, dense


def check_all(rank, world):
    errs = {}
    names = [s for s in strategy_names("sparse") if s != "local"] if world > 1 else ["s2"]  # world 1: local op
    runs = [(name, {"ulysses_size": {3: 1, 4: 2}[world]} if name == "usp" and world > 2 else {}) for name in names]
    for name, options in runs:  # usp at world 4: 2-way Ulysses x 2-way ring (the ring masks see a head slice)
        try:
            build_strategy(name, **options).check(
                n_heads=4, n_kv_heads=2, cp=world, seq_len=52 * world, layout="zigzag"
            )
        except ValueError:
            continue  # e.g. ulysses with 4 heads on 3 ranks
        for layout in ("contiguous", "zigzag"):
            for path in ("tiles", "masked_call"):  # the kernel's two CPU paths
                with pattern_kernel.cpu_path(path):
                    errs[(name, layout, path)] = max(
                        check_strategy(rank, world, name, layout, s2_cases(world), 16, options)
                    )
    nbytes = [measure_s2_bytes(rank, world, layout) for layout in ("contiguous", "zigzag")] if world > 1 else []
    if world > 1:
        nbytes += [measure_case_bytes(rank, world, lay, c) for lay in ("contiguous", "zigzag") for c in s2_cases(world)]
    return errs, nbytes


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sparse_kind_exact_under_cp(world):
    out = run_cp(check_all, world)
    for errs, nbytes in out:
        assert len(errs) == {1: 4, 2: 20, 3: 16, 4: 20}[world], errs
        assert max(errs.values()) < 1e-10, errs
        for got, formula, dense in nbytes:
            assert got == formula, (got, formula)
            assert got <= dense
    if world == 4:  # rank 3, contiguous: 3 chunks of 8 blocks before it, stride 4, local 2
        got = out[3][1][0][0]
        # 12 key blocks before it: 3 strided per head, plus block 11 (local) for the 3 heads
        # whose stride misses it (offsets 3, 0, 1, 2: head 2 has it strided); 16 tokens of K
        # and V, D = 4, fp32: 15 blocks * 512 bytes, against 48 blocks for the all-gather
        assert got == 15 * 16 * 2 * 4 * 4


def test_sparse_kind_needs_a_pattern():
    from models.context import SingleDeviceContext
    from models.s2_attention import local_sparse_attention

    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="needs a block pattern"):
        local_sparse_attention(q, q, q, SingleDeviceContext(1, 8))
    with pytest.raises(ValueError, match="causal only"):
        build_strategy("s2")(q, q, q, None, pattern=_pattern(stride=2, local=1, n_kv_heads=2), causal=False)
