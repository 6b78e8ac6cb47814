"""S2 patterns and the block-sparse kernel with per-head layouts, against brute force (fp64).

The pattern is checked token by token against its definition written out in plain Python
(documents, windows, dense heads, homogeneous heads, explicit offsets); the kernel's output,
LSE and gradients against dense masked attention under that brute-force mask, to 1e-10.
"""

import math
import warnings

import pytest
import torch

from models.ops.attention import MaskSpec, attention, attention_ref, planned_pairs
from models.ops.attention import pattern as pattern_kernel
from models.ops.documents import doc_ids
from models.s2_pattern import BlockLayout, s2_pattern


def brute_mask(n, b, cu, heads, n_kv, *, block, stride, local, offsets, dense, window, per_document=True):
    """[B, H, n, n] bool from the definition, one token pair at a time (block indices from the
    start of each token's document in its row, or from the row start)."""
    doc = doc_ids(cu, torch.arange(b * n)).view(b, n).tolist()
    first = [{} for _ in range(b)]  # row -> document id -> its first position in the row
    for row in range(b):
        for t in range(n):
            first[row].setdefault(doc[row][t], t)

    def blk(row, t):
        return (t - first[row][doc[row][t]] if per_document else t) // block

    per_kv = [
        [
            [
                j <= i
                and (hk in dense or blk(row, i) - blk(row, j) < local or (blk(row, j) + offsets[hk]) % stride == 0)
                and doc[row][i] == doc[row][j]
                and (window is None or i - j < window)
                for j in range(n)
            ]
            for i in range(n)
        ]
        for row in range(b)
        for hk in range(n_kv)
    ]
    return torch.tensor(per_kv).view(b, n_kv, n, n).repeat_interleave(heads // n_kv, dim=1)


def masked_attention(q, k, v, allowed):
    """Dense fp64 attention under an explicit [B, H, Tq, Tk] mask (rows with no key -> 0)."""
    groups = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


@pytest.fixture(params=["tiles", "masked_call"])
def kernel_path(request, monkeypatch):
    """Both CPU paths of the pattern kernel (``cpu_path``): the tile plan and one masked fused
    call; checks afterwards that the named path is the one that ran."""
    calls, forward = [], pattern_kernel._masked_call_forward
    monkeypatch.setattr(pattern_kernel, "_masked_call_forward", lambda *a: calls.append(1) or forward(*a))
    with pattern_kernel.cpu_path(request.param):
        yield request.param
    assert bool(calls) == (request.param == "masked_call")


def _qkv(b, n, h, hkv, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, x, d, generator=g, dtype=torch.float64, requires_grad=True) for x in (h, hkv, hkv)]


def compare(q, k, v, mask, allowed, block=16):
    do = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    o, lse = attention(q, k, v, mask, None, block)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    o_r, lse_r = masked_attention(q, k, v, allowed)
    grads_r = torch.autograd.grad((o_r * do).sum(), (q, k, v))
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    fin = torch.isfinite(lse_r)
    assert torch.equal(fin, torch.isfinite(lse))
    errs = [(o - o_r).abs().max(), (lse[fin] - lse_r[fin]).abs().max()]
    errs += [(a - r).abs().max() for a, r in zip(grads, grads_r)]
    assert max(errs) < 1e-10, errs
    return o, lse


S2_CASES = [  # (heads, kv heads, stride, local, options, window, doc starts of 2 rows of 83)
    (4, 4, 4, 1, {}, None, [0, 83, 166]),
    (4, 2, 4, 2, {"layer_offset": 3}, None, [0, 5, 40, 83, 84, 130, 166]),  # docs crossing blocks
    (6, 3, 2, 1, {"dense_heads": (1,)}, 37, [0, 20, 83, 100, 166]),
    (4, 2, 3, 1, {"homogeneous": True, "layer_offset": 1}, None, [0, 50, 83, 166]),
    (4, 4, 5, 1, {"offsets": [4, 0, 2, 1]}, 45, [0, 1, 2, 83, 166]),
    (4, 2, 4, 2, {"layer_offset": 3, "doc_blocks": "row"}, None, [0, 5, 40, 83, 84, 130, 166]),  # row blocks
]


@pytest.mark.parametrize("h,hkv,stride,local,opts,window,starts", S2_CASES)
def test_s2_kernel_matches_brute_force(h, hkv, stride, local, opts, window, starts, kernel_path):
    n, b, block = 83, 2, 16  # 83: not a multiple of the block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of these patterns leave residues uncovered on purpose
        pattern = s2_pattern(block=block, stride=stride, local=local, n_kv_heads=hkv, n_heads=h, **opts)
    cu = torch.tensor(starts)
    allowed = brute_mask(
        n,
        b,
        cu,
        h,
        hkv,
        block=block,
        stride=stride,
        local=local,
        offsets=pattern.offsets,
        dense={i for i, x in enumerate(pattern.dense) if x},
        window=window,
        per_document=pattern.per_document,
    )
    # the offsets themselves, from the definition (the step from the query heads)
    step = 0 if opts.get("homogeneous") else max(1, stride // h)
    base = opts.get("offsets") or [hk * step for hk in range(hkv)]
    assert pattern.offsets == tuple((o + opts.get("layer_offset", 0)) % stride for o in base)
    pos = torch.arange(n)
    doc = doc_ids(cu, torch.arange(b)[:, None] * n + pos[None])
    mask = MaskSpec(pos, pos, doc, doc, True, window, pattern.bind(cu, b, n))
    q, k, v = _qkv(b, n, h, hkv)
    compare(q, k, v, mask, allowed, block=32)  # the kernel's tile is the pattern block whatever it is given
    o_ref, _ = attention_ref(q, k, v, mask)  # the reference the CP tests use agrees too
    assert (o_ref - masked_attention(q, k, v, allowed)[0]).abs().max() < 1e-12


@pytest.mark.parametrize("seed,density", [(3, 0.4), (4, 0.15), (5, 0.7)])
def test_random_layouts_offset_chunks_and_empty_rows(seed, density, kernel_path):
    """Random per-head tables; a Q chunk meeting a K chunk from elsewhere, with a slice of
    global kv heads (as under Ulysses); rows that see nothing give zeros."""
    g = torch.Generator().manual_seed(seed)
    h, hkv, block, nb = 4, 2, 16, 8
    table = torch.rand(4, nb, nb, generator=g) < density  # 4 global kv heads; we hold heads 2 and 3
    layout = BlockLayout(block, table)
    q_pos = torch.cat([torch.arange(32, 56), torch.arange(100, 120)])
    k_pos = torch.cat([torch.arange(0, 40), torch.arange(90, 110)])
    cu = torch.tensor([0, 45, 128])
    q_doc, k_doc = doc_ids(cu, q_pos)[None], doc_ids(cu, k_pos)[None]
    mask = MaskSpec(q_pos, k_pos, q_doc, k_doc, True, None, layout, kv_heads=(2, 3))
    allowed = torch.zeros(1, h, len(q_pos), len(k_pos), dtype=torch.bool)
    for hq in range(h):
        for a, i in enumerate(q_pos.tolist()):
            for c, j in enumerate(k_pos.tolist()):
                same = (i < 45) == (j < 45)
                allowed[0, hq, a, c] = j <= i and same and bool(table[2 + hq // 2, i // block, j // block])
    g2 = torch.Generator().manual_seed(0)
    q = torch.randn(1, len(q_pos), h, 8, generator=g2, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, len(k_pos), hkv, 8, generator=g2, dtype=torch.float64, requires_grad=True) for _ in "kv")
    o, lse = compare(q, k, v, mask, allowed)
    empty = ~allowed.any(-1)  # [1, H, Tq]
    assert empty.any() and torch.isinf(lse[empty]).all() and (o.transpose(1, 2)[empty] == 0).all()


def test_work_is_proportional_to_active_blocks():
    n, block = 1024, 16
    pos = torch.arange(n)
    doc = torch.zeros(1, n, dtype=torch.int64)
    dense_mask = MaskSpec(pos, pos, doc, doc, True, None)
    dense = planned_pairs(dense_mask, block, 4, 4)
    assert dense == 4 * n * (n + 1) // 2  # the dense kernel computes exactly the causal pairs
    tiles = 4 * 64 * 65 // 2 * block * block  # every causal tile pair once, whole
    for stride in (4, 8):
        pattern = s2_pattern(block=block, stride=stride, local=1, n_kv_heads=4, check_coverage=False)
        sparse = planned_pairs(MaskSpec(pos, pos, doc, doc, True, None, pattern.bind(None, 1, n)), block, 4, 4)
        active = pattern.density(n) * tiles  # active (head, block pair) triples x block^2
        assert sparse == round(active)  # no inactive tile is computed
        assert sparse < tiles * (1 / stride + 2 / 64)


def test_coverage_check_warns_and_stride_one_is_dense():
    with pytest.warns(UserWarning, match=r"leaves key blocks j with \(j % 8\) in \[1, 2, 3, 5, 6, 7\]"):
        s2_pattern(block=16, stride=8, local=1, n_kv_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s2_pattern(block=16, stride=4, local=1, n_kv_heads=4).uncovered() == []
        assert s2_pattern(block=16, stride=8, local=1, n_kv_heads=2, dense_heads=(1,)).uncovered() == []
        assert s2_pattern(block=16, stride=1, local=1, n_kv_heads=2).density(200) == 1.0
    with pytest.raises(ValueError, match="model.s2_block=8 must be >= 16"):
        s2_pattern(block=8, stride=4, local=1, n_kv_heads=2)
    with pytest.raises(ValueError, match="model.s2_offsets has 3 entries"):
        s2_pattern(block=16, stride=4, local=1, n_kv_heads=2, offsets=[0, 1, 2])


def test_flex_mask_mod_matches_reference_on_cpu():
    """The FlexAttention path's mask_mod and LSE convention (forward; flex has no CPU backward),
    with documents, a window, a dense head, a Q chunk against K from elsewhere, and empty rows."""
    from models.ops import flex

    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = s2_pattern(block=16, stride=3, local=1, n_kv_heads=2, dense_heads=(1,), layer_offset=1)
    q_pos = torch.cat([torch.arange(20, 50), torch.arange(80, 100)])
    k_pos = torch.arange(0, 70)
    cu = torch.tensor([0, 33, 35, 128])
    bound = pattern.bind(cu, 1, 128)
    mask = MaskSpec(q_pos, k_pos, doc_ids(cu, q_pos)[None], doc_ids(cu, k_pos)[None], True, 25, bound)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, len(q_pos), 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, len(k_pos), 2, 8, generator=g, dtype=torch.float64) for _ in "kv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's eager CPU path warns that it is not compiled
        o, lse = flex.flex_attention(q, k, v, mask)
    o_r, lse_r = attention_ref(q, k, v, mask)
    fin = torch.isfinite(lse_r)
    assert (~fin).any() and torch.equal(fin, torch.isfinite(lse))  # some rows see no key
    assert (o - o_r).abs().max() < 1e-12 and (lse[fin] - lse_r[fin].float()).abs().max() < 1e-5


def test_flex_block_mask_is_built_once_per_pattern_and_shape():
    from models.ops import flex

    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = s2_pattern(block=16, stride=2, local=1, n_kv_heads=2, check_coverage=False)
    pos = torch.arange(64)
    doc = torch.zeros(1, 64, dtype=torch.int64)
    mask = MaskSpec(pos, pos, doc, doc, True, None, pattern.bind(None, 1, 64))
    q, k = torch.randn(1, 64, 4, 8), torch.randn(1, 64, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = flex._block_mask(mask, 1, 4, 2, 64, 64, q.device)
        again = flex._block_mask(MaskSpec(pos, pos, doc, doc, True, None, mask.pattern), 1, 4, 2, 64, 64, q.device)
        other = flex._block_mask(mask, 1, 4, 2, 64, 64, q.device) is first
        o1, _ = flex.flex_attention(q, k, k, mask)
        o2, _ = flex.flex_attention(q, k, k, mask)
    assert again is first and other  # the next layer's mask: same pattern, metadata and shape
    assert torch.equal(o1, o2)
    shifted = MaskSpec(pos, pos, doc, doc, True, 9, mask.pattern)  # a window: another mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert flex._block_mask(shifted, 1, 4, 2, 64, 64, q.device) is not first


def test_flex_lengths_are_bucketed():
    """A few compiled shapes per octave of lengths, padding at most a quarter."""
    from models.ops.flex import FLEX_BLOCK, bucket

    for t in [1, 100, 128, 129, 1000, 4097, 32768, 40000, 131071]:
        b = bucket(t)
        assert b >= t and b % FLEX_BLOCK == 0 and (b - t) <= max(FLEX_BLOCK, t // 4)
    assert len({bucket(t) for t in range(16384, 32769)}) <= 9
