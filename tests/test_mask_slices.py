"""Masks as slices (models/ops/attention/slices.py): the area formula and clipping against the
token-level mask, every builder and random slice sets through the kernel (fp64, forward and
backward, GQA, head subsets, positions cut into runs) against the dense reference, and the
kernel's work against the masks' area."""

import random

import pytest
import torch

from models.ops.attention import MaskSpec, attention, attention_ref, planned_pairs
from models.ops.attention import slices as S
from models.ops.attention.slices import Slice, SliceMask, make_slice

N = 45  # not a multiple of the kernel block (16) nor of any builder's block
LENS = [10, 20, 15]


def builders(n=N, heads=4):
    """(name, SliceMask) for every builder at row length n."""
    third = [n // 4, n // 2, n - n // 4 - n // 2]
    return [
        ("full", S.full(n)),
        ("causal", S.causal(n)),
        ("varlen_full", S.varlen_full(third)),
        ("varlen_causal", S.varlen_causal(third)),
        ("sliding_window", S.sliding_window(n, 7)),
        ("varlen_sliding_window", S.varlen_sliding_window(third, 6)),
        ("prefix_lm", S.prefix_lm(n, n // 3)),
        ("varlen_prefix_lm", S.varlen_prefix_lm(third, [3, 0, third[2]])),
        ("shared_question", S.shared_question(n // 5, [n // 4, n // 5, n - n // 5 - n // 4 - n // 5])),
        ("causal_blockwise", S.causal_blockwise(n, 10)),
        ("block_causal", S.block_causal(n, 10)),
        ("varlen_block_causal", S.varlen_block_causal(third, 7)),
        ("global_sliding_window", S.global_sliding_window(n, 3, 8)),
        ("longlora", S.longlora(n, 12, heads)),
        ("sinklora", S.sinklora(n, 12, heads, 3)),
        ("documents", S.documents(torch.tensor([0, 10, 30, n]), 1, n, True, 5)),
        ("documents_bidirectional_window", S.documents(torch.tensor([0, 10, 30, n]), 1, n, False, 5)),
    ]


def random_slices(seed, n, heads=4, count=12) -> SliceMask:
    """A random set of disjoint slices of every type, some restricted to random heads."""
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        if len(out) == count:
            break
        q0, k0 = rng.randrange(n), rng.randrange(n)
        q1, k1 = rng.randint(q0 + 1, min(n, q0 + n // 2)), rng.randint(k0 + 1, min(n, k0 + n // 2))
        hs = None if rng.random() < 0.5 else rng.sample(range(heads), rng.randint(1, heads - 1))
        s = make_slice(q0, q1, k0, k1, rng.choice(S.KINDS), hs)
        try:
            S.check_disjoint(out + [s])
        except ValueError:
            continue
        out.append(s)
    return SliceMask((tuple(out),), n, f"random{seed}")


def run_both(mask: MaskSpec, n_q, n_k, h=4, hkv=2, d=8, b=1, block=16, seed=0):
    """Max |kernel - reference| over o, lse (finite rows), dq, dk, dv, fp64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_q, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, n_k, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, n_k, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(b, n_q, h, d, generator=g, dtype=torch.float64)
    o, lse = attention(q, k, v, mask, None, block)
    (o * do).sum().backward()
    got = [o.detach()] + [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    o_r, lse_r = attention_ref(q, k, v, mask)
    (o_r * do).sum().backward()
    ref = [o_r.detach()] + [x.grad for x in (q, k, v)]
    fin = torch.isfinite(lse_r)
    assert torch.equal(fin, torch.isfinite(lse)), "rows that see no key differ"
    errs = [(a - r).abs().max().item() for a, r in zip(got, ref)]
    return max(errs + [(lse[fin] - lse_r[fin]).abs().max().item() if fin.any() else 0.0])


def test_area_and_clip_match_the_token_mask():
    rng = random.Random(0)
    pos = torch.arange(32)
    for _ in range(2000):
        q0, k0 = rng.randint(0, 10), rng.randint(0, 10)
        s = Slice(
            q0,
            q0 + rng.randint(0, 12),
            k0,
            k0 + rng.randint(0, 12),
            rng.choice([None, rng.randint(-12, 12)]),
            rng.choice([None, rng.randint(-12, 12)]),
        )
        m = s.allowed(pos, pos)
        assert s.area() == int(m.sum()), s
        a, b = sorted(rng.sample(range(28), 2))
        c, d = sorted(rng.sample(range(28), 2))
        t = s.clip(a, b, c, d)
        box = torch.zeros_like(m)
        box[a:b, c:d] = True
        if t is None:
            assert not (m & box).any()
            continue
        mt = t.allowed(pos, pos)
        assert torch.equal(mt, m & box), (s, t)
        assert mt[t.q0].any() and mt[t.q1 - 1].any() and mt[:, t.k0].any() and mt[:, t.k1 - 1].any(), t  # tight


@pytest.mark.parametrize(
    "kind,lq,lk,rows",
    [
        ("causal", 3, 5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        ("inv_causal", 3, 5, [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
        ("bi_causal", 3, 5, [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]),
        ("causal", 4, 2, [[0, 0], [0, 0], [1, 0], [1, 1]]),
    ],
)
def test_types_are_magiattentions(kind, lq, lk, rows):
    """causal: bottom-right aligned; inv_causal: top-left aligned; bi_causal: both."""
    s = make_slice(4, 4 + lq, 10, 10 + lk, kind)
    got = s.allowed(torch.arange(4, 4 + lq), torch.arange(10, 10 + lk)).int().tolist()
    assert got == rows and s.kind == kind


@pytest.mark.parametrize("name,mask", builders(), ids=[b[0] for b in builders()])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_every_builder_exact_in_the_kernel(name, mask, hkv):
    mask.check(1, 4)
    pos = torch.arange(N)
    assert run_both(MaskSpec(pos, pos, slices=mask), N, N, hkv=hkv) < 1e-12


def test_builders_are_what_they_say():
    """Spot checks of the token-level masks (the reference every other test trusts)."""

    def dense(mask, n, h=0):
        return S.dense(mask.row(0), torch.arange(n), torch.arange(n), h + 1)[h]

    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    assert torch.equal(dense(S.causal(20), 20), j <= i)
    assert torch.equal(dense(S.sliding_window(20, 4), 20), (j <= i) & (i - j < 4))
    assert torch.equal(dense(S.prefix_lm(20, 6), 20), (j <= i) | ((i < 6) & (j < 6)))
    assert torch.equal(dense(S.block_causal(20, 6), 20), j // 6 <= i // 6)
    assert torch.equal(dense(S.causal_blockwise(20, 6), 20), (j <= i) & ((j // 6 == i // 6) | (j < 6)))
    assert torch.equal(dense(S.global_sliding_window(20, 2, 4), 20), (j <= i) & ((i - j < 4) | (j < 2)))
    sq = dense(S.shared_question(4, [5, 6, 5]), 20)
    group = torch.tensor([0] * 4 + [1] * 5 + [2] * 6 + [3] * 5)
    assert torch.equal(sq, (j <= i) & ((group[i] == group[j]) | (group[j] == 0)))
    ll = S.longlora(20, 8, 4)
    assert torch.equal(dense(ll, 20, 0), (j <= i) & (i // 8 == j // 8))
    assert torch.equal(dense(ll, 20, 3), (j <= i) & ((i + 4) // 8 == (j + 4) // 8))
    sl = S.sinklora(20, 8, 4, 2)
    assert torch.equal(dense(sl, 20, 3), (j <= i) & (((i + 4) // 8 == (j + 4) // 8) | (j < 2)))


@pytest.mark.parametrize("seed", range(8))
def test_random_slices_exact_on_chunks(seed):
    """Random slice sets (every type, head subsets) on queries and keys cut into runs as the CP
    strategies see them (zigzag halves, a shifted window of keys), lengths not multiples of any
    block."""
    n = 37 + seed
    mask = random_slices(seed, n)
    mask.check(1, 4)
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.cat([torch.arange(0, n // 3), torch.arange(n - n // 4, n)])
    k_pos = torch.randperm(n, generator=g)[: n // 2 + 3].sort().values
    for qp, kp in ((torch.arange(n), torch.arange(n)), (q_pos, k_pos), (k_pos, q_pos)):
        spec = MaskSpec(qp, kp, slices=mask)
        assert run_both(spec, len(qp), len(kp), hkv=2, block=8, seed=seed) < 1e-12


def test_batch_rows_and_ulysses_head_views():
    """A mask with different slices per batch row, and a head-sharded view (``q_heads``)."""
    n = 30
    rows = (S.prefix_lm(n, 7).rows[0], S.longlora(n, 10, 4).rows[0])
    mask = SliceMask(rows, n)
    pos = torch.arange(n)
    assert run_both(MaskSpec(pos, pos, slices=mask), n, n, b=2) < 1e-12
    half = MaskSpec(pos, pos, slices=S.longlora(n, 10, 4), q_heads=(2, 3))  # the shifted heads only
    assert run_both(half, n, n, h=2, hkv=1) < 1e-12


@pytest.mark.parametrize("name,mask", builders(4099, 8), ids=[b[0] for b in builders(4099, 8)])
def test_work_is_the_area(name, mask):
    """The kernel computes the slices, not the square: full / causal pieces their exact area,
    band tiles at most one block-wide strip more per diagonal."""
    n, block, h = 4099, 64, 8
    pos = torch.arange(n)
    area = mask.area(0, h)
    work = planned_pairs(MaskSpec(pos, pos, slices=mask), block, h, h)
    diagonals = sum(2 if s.lo is not None and s.hi is not None else 1 for s in mask.row(0))
    assert area <= work <= area + diagonals * h * block * n // 2 + h * block * block * len(mask.row(0)), (work, area)
    if area < 0.25 * n * n * h:
        assert work < 0.5 * n * n * h


def test_bad_masks_are_clear_errors():
    with pytest.raises(ValueError, match="overlap"):
        SliceMask(((make_slice(0, 4, 0, 4, "causal"), make_slice(2, 6, 0, 3)),), 8).check()
    with pytest.raises(ValueError, match="outside the row"):
        SliceMask(((make_slice(0, 9, 0, 4),),), 8).check()
    with pytest.raises(ValueError, match="head outside"):
        S.longlora(16, 4, 8).check(1, 4)
    with pytest.raises(ValueError, match="slice type 'tri'"):
        make_slice(0, 1, 0, 1, "tri")
    with pytest.raises(ValueError, match="must be even"):
        S.longlora(16, 4, 3)
    with pytest.raises(ValueError, match="sinks=5 must lie in 0..group/2=4"):
        S.sinklora(16, 8, 4, 5)
    with pytest.raises(ValueError, match="one prefix length per document"):
        S.varlen_prefix_lm([4, 4], [1])


WIDE = 700  # a row long enough for split bands (query tiles of 128 / 256), not a multiple of either


@pytest.mark.parametrize(
    "mask",
    [
        S.sliding_window(WIDE, 300),  # band width 299: tiles of 128
        S.varlen_sliding_window([333, 367], 280),  # clipped by each document
        S.global_sliding_window(WIDE, 5, 290),
        S.sliding_window(WIDE, 600),  # tiles of 256
        SliceMask(((make_slice(0, WIDE, 40, WIDE, "inv_causal"),),), WIDE, "inv_causal"),  # no upper edge
        SliceMask(((make_slice(10, 400, 0, 690, "bi_causal"),),), WIDE, "bi_causal"),
    ],
    ids=["window", "varlen_window", "global_window", "window_600", "inv_causal", "bi_causal"],
)
def test_wide_bands_split_into_fused_pieces_exactly(mask):
    """Bands at least 256 wide run as full + causal pieces per query tile and one masked
    triangle (plan.split_band): exact against the dense reference, on the whole row, on a
    zigzag chunk's queries (two runs) against every key and every query against its keys, with GQA."""
    from models.ops.attention.plan import span_plan

    pos = torch.arange(WIDE)
    spec = MaskSpec(pos, pos, slices=mask)
    forms = {p.form for p in span_plan(spec, 0, 4)}
    assert {"full", "band"} <= forms, forms  # the split happened
    assert run_both(spec, WIDE, WIDE, block=64) < 1e-12
    chunk = torch.cat([torch.arange(0, 150), torch.arange(550, WIDE)])
    assert run_both(MaskSpec(chunk, pos, slices=mask), len(chunk), WIDE, block=64) < 1e-12
    # keys of a chunk: bands cut by the ends of its runs (the clipped tiles stay band pieces)
    assert run_both(MaskSpec(pos, chunk, slices=mask), WIDE, len(chunk), block=64) < 1e-12
