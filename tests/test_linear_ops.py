"""Chunked linear attention (hand-written backward) against the token-by-token reference."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from models.ops.documents import cu_seqlens_from_starts, resets_from_cu_seqlens, starts_from_cu_seqlens
from models.ops.linear_attention import (
    ChunkLinearAttentionFunction,
    chunk_linear_attention,
    fla_backend,
    recurrent_linear_attention_ref,
    scan_segment_grads,
    scan_segment_states,
    segment_output_from_state,
    segment_state,
    segment_transfer,
)

F64 = torch.float64


def _inputs(b, t, h, dk, dv, decay, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = rnd(b, t, h, dk), rnd(b, t, h, dk), rnd(b, t, h, dv)
    g = F.logsigmoid(rnd(b, t, h) + 2) if decay in ("scalar", "both") else None
    gk = F.logsigmoid(rnd(b, t, h, dk) + 2) if decay in ("key", "both") else None
    s0 = rnd(b, h, dk, dv)
    return [x if x is None else x.requires_grad_() for x in (q, k, v, g, gk, s0)]


def _cu(t):
    """Two rows: length-1 documents, several starts inside one 16-token chunk, a doc at the end."""
    row0 = [0, 1, 2, 3, 9, 17, 40, t - 1]
    row1 = [0, 5, 6, 7, 30, t - 2]
    starts = sorted({s for s in row0 if s < t}) + sorted({t + s for s in row1 if s < t})
    return torch.tensor(starts + [2 * t])


def _grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    o, s = out
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    live = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, live)


def _check(out, ref, inputs, tol=1e-10):
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    assert (out[0] - ref[0]).abs().max() < tol
    assert (out[1] - ref[1]).abs().max() < tol
    for a, b in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() < tol


@pytest.mark.parametrize("decay", ["none", "scalar", "key", "both"])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("t", [45, 100])
def test_chunk_matches_reference(decay, chunk, t):
    q, k, v, g, gk, s0 = _inputs(2, t, 2, 8, 6, decay)
    cu = _cu(t)
    out = chunk_linear_attention(q, k, v, g, gk, 0.5, s0, cu, chunk, output_final_state=True)
    ref = recurrent_linear_attention_ref(q, k, v, g, gk, 0.5, s0, cu)
    _check(out, ref, (q, k, v, g, gk, s0))


def test_per_key_decay_in_several_slices(monkeypatch):
    """The per-key pairwise decay block is built a few chunks at a time under a memory budget."""
    from models.ops.linear_attention import chunk

    monkeypatch.setattr(chunk, "PAIRWISE_BUDGET", 2 * 2 * 16 * 16 * 8 * 2)  # two chunks a slice
    q, k, v, g, gk, s0 = _inputs(2, 100, 2, 8, 6, "both")
    cu = _cu(100)
    out = chunk_linear_attention(q, k, v, g, gk, 0.5, s0, cu, 16, output_final_state=True)
    ref = recurrent_linear_attention_ref(q, k, v, g, gk, 0.5, s0, cu)
    _check(out, ref, (q, k, v, g, gk, s0))


@pytest.mark.parametrize("decay", ["none", "key"])
def test_no_documents_no_initial_state(decay):
    q, k, v, g, gk, _ = _inputs(2, 37, 3, 4, 5, decay)
    out = chunk_linear_attention(q, k, v, g, gk, 1.0, chunk_size=16, output_final_state=True)
    ref = recurrent_linear_attention_ref(q, k, v, g, gk, 1.0)
    _check(out, ref, (q, k, v, g, gk))


@pytest.mark.parametrize("per_key", [False, True])
def test_decay_edge_cases(per_key):
    q, k, v, _, _, s0 = _inputs(2, 70, 2, 4, 3, "none")
    cu = _cu(70)
    shape = (2, 70, 2, 4) if per_key else (2, 70, 2)
    for value in (0.0, -30.0):
        dec = torch.full(shape, value, dtype=F64, requires_grad=True)
        g, gk = (None, dec) if per_key else (dec, None)
        out = chunk_linear_attention(q, k, v, g, gk, 1.0, s0, cu, 16, output_final_state=True)
        ref = recurrent_linear_attention_ref(q, k, v, g, gk, 1.0, s0, cu)
        _check(out, ref, (q, k, v, dec, s0))
        if value == 0.0:  # g = 0 is plain linear attention
            plain = chunk_linear_attention(q, k, v, None, None, 1.0, s0, cu, 16, True)
            assert (out[0] - plain[0]).abs().max() < 1e-10
        else:  # g = -30: the prefix vanishes, every token sees only itself
            own = torch.einsum("bthk,bthk,bthv->bthv", q, k, v)
            assert (out[0] - own).abs().max() < 1e-9
    # fp32, long chunk: cumulative log-decay -1920 inside a chunk stays finite
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    dec = torch.full(shape, -30.0, requires_grad=True)
    g, gk = (None, dec) if per_key else (dec, None)
    o, s = chunk_linear_attention(q32, k32, v32, g, gk, 1.0, None, None, 64, True)
    grads = torch.autograd.grad(o.sum() + s.sum(), (q32, k32, v32, dec))
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("decay", ["scalar", "both"])
def test_gradcheck(decay):
    q, k, v, g, gk, s0 = _inputs(2, 7, 1, 2, 3, decay, seed=3)
    resets = resets_from_cu_seqlens(torch.tensor([0, 3, 4, 7, 9, 14]), 2, 7)

    def fn(q, k, v, g, gk, s0):
        return ChunkLinearAttentionFunction.apply(q, k, v, g, gk, s0, resets, 0.8, 3)

    assert torch.autograd.gradcheck(fn, (q, k, v, g, gk, s0), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_causality_probe(decay):
    q, k, v, g, gk, _ = _inputs(1, 40, 2, 4, 4, decay)
    q, k, v = (x.detach() for x in (q, k, v))
    cu = torch.tensor([0, 25, 40])
    base = chunk_linear_attention(q, k, v, g, gk, 1.0, cu_seqlens=cu, chunk_size=16)[0]
    for t in (0, 7, 15, 16, 30, 39):
        for name in ("k", "v"):
            k2, v2 = k.clone(), v.clone()
            (k2 if name == "k" else v2)[:, t] += 1.0
            o = chunk_linear_attention(q, k2, v2, g, gk, 1.0, cu_seqlens=cu, chunk_size=16)[0]
            diff = (o - base).abs().amax(dim=(0, 2, 3))  # [T]
            doc_end = 25 if t < 25 else 40
            assert (diff[:t] == 0).all(), f"{name}_{t} leaks into the past"
            assert diff[t] > 1e-6, f"token {t} does not see itself ({name})"
            assert (diff[t:doc_end] > 0).all(), f"{name}_{t} does not reach its document"
            assert (diff[doc_end:] == 0).all(), f"{name}_{t} leaks into the next document"


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_lasp2_pieces_reassemble_the_sequence(decay):
    """Split each row into 3 contiguous segments (as CP ranks would), scan the all-gathered
    (M, G, has_start) summaries, run each segment with initial_state=S_in: outputs and
    gradients (autograd through the scan) equal the one-piece reference."""
    t, bounds = 45, [0, 13, 30, 45]
    q, k, v, g, gk, _ = _inputs(2, t, 2, 4, 3, decay)
    cu = torch.tensor([0, 5, 13, 14, 20, 29, 45, 60, 90])  # rank 1 of row 0 begins a document
    starts = starts_from_cu_seqlens(cu, 2, t)
    seg = lambda x, r: None if x is None else x[:, bounds[r] : bounds[r + 1]]  # noqa: E731
    summaries = [segment_state(seg(k, r), seg(v, r), seg(g, r), seg(gk, r), seg(starts, r)) for r in range(3)]
    m, big_g, has = (torch.stack(x) for x in zip(*summaries))
    s_in = scan_segment_states(m, torch.stack([segment_transfer(*x) for x in zip(big_g, has)]))
    # the public op takes initial_state into a row's first document even when the segment's
    # token 0 starts one (it never resets at token 0): zero S_in there
    s_in = s_in * torch.stack([~seg(starts, r)[:, 0, None, None, None] for r in range(3)])
    outs = []
    for r in range(3):
        o, _ = chunk_linear_attention(
            seg(q, r),
            seg(k, r),
            seg(v, r),
            seg(g, r),
            seg(gk, r),
            0.5,
            s_in[r],
            cu_seqlens_from_starts(seg(starts, r)),
            8,
        )
        extra = segment_output_from_state(seg(q, r), s_in[r], seg(g, r), seg(gk, r), seg(starts, r), 0.5)
        o0, _ = chunk_linear_attention(
            seg(q, r), seg(k, r), seg(v, r), seg(g, r), seg(gk, r), 0.5, None, cu_seqlens_from_starts(seg(starts, r)), 8
        )
        assert (o - o0 - extra).abs().max() < 1e-10
        outs.append(o)
    o = torch.cat(outs, dim=1)
    ref = recurrent_linear_attention_ref(q, k, v, g, gk, 0.5, cu_seqlens=cu)
    zero = torch.zeros(())
    _check((o, zero), (ref[0], zero), (q, k, v, g, gk))


@pytest.mark.parametrize("decay", ["none", "scalar", "key", "both"])
def test_late_state_hooks(decay):
    """``incoming`` / ``outgoing`` (LASP-2's hooks): the initial state handed in after the
    local chunk scan and dL/dfinal after the intra-chunk gradients give the reference's
    outputs and gradients; the hooks see M, transfer (final = M + transfer * S_in) and the
    gradient of the local outputs wrt S_in. Weak decays (carries matter); row 0 resets at
    token 0 (ignores S_in), row 1 has no document start, row 2 two starts inside chunks."""
    from models.ops.linear_attention import linear_attention_bwd, linear_attention_fwd

    t, chunk = 45, 16
    q, k, v, g, gk, s0 = _inputs(3, t, 2, 4, 3, decay, seed=4)
    g, gk = (None if x is None else (0.1 * x).detach().requires_grad_() for x in (g, gk))
    resets = torch.zeros(3, t, dtype=torch.bool)
    resets[0, [0, 17, 30]] = True
    resets[2, [5, 20]] = True
    cu = cu_seqlens_from_starts(resets)
    gen = torch.Generator().manual_seed(5)
    do, d_fin = torch.randn(3, t, 2, 3, generator=gen, dtype=F64), torch.randn(3, 2, 4, 3, generator=gen, dtype=F64)
    s0_used = s0 * ~resets[:, 0, None, None, None]
    o_ref, fin_ref = recurrent_linear_attention_ref(q, k, v, g, gk, 0.5, s0_used, cu)
    live = [x for x in (q, k, v, g, gk, s0) if x is not None]
    ref = torch.autograd.grad((o_ref * do).sum() + (fin_ref * d_fin).sum(), live, retain_graph=True)
    ds_local_ref = torch.autograd.grad((o_ref * do).sum(), s0)[0]

    seen = {}

    def incoming(m, transfer):
        seen.update(m=m, transfer=transfer)
        return lambda: s0.detach()

    def outgoing(ds_in):
        seen.update(ds_in=ds_in)
        return lambda: d_fin

    args = [x if x is None else x.detach() for x in (q, k, v, g, gk)]
    o, fin = linear_attention_fwd(*args, 0.5, None, resets, chunk, incoming=incoming)
    assert (o - o_ref).abs().max() < 1e-10 and (fin - fin_ref).abs().max() < 1e-10
    assert (seen["m"] + seen["transfer"][..., None] * s0 - fin_ref).abs().max() < 1e-10
    assert (seen["transfer"][[0, 2]] == 0).all() and (seen["transfer"][1] > 0.05).all()
    grads = linear_attention_bwd(*args, 0.5, s0.detach(), resets, chunk, do, outgoing=outgoing)
    assert (seen["ds_in"] - ds_local_ref).abs().max() < 1e-10
    for a, b in zip([x for x in grads if x is not None], ref):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_autocast_leaves_the_op_in_fp32(decay):
    """Under bf16 autocast the op still computes in fp32 (its matmuls are not cast, its
    in-place accumulations see one dtype): outputs and gradients equal the plain fp32 run."""
    inputs = _inputs(2, 45, 2, 4, 3, decay)
    q, k, v, g, _, s0 = (None if x is None else x.detach().float().requires_grad_() for x in inputs)
    cu = _cu(45)
    runs = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = chunk_linear_attention(q, k, v, g, None, 0.5, s0, cu, 16, output_final_state=True)
        runs.append([out[0], out[1], *_grads(out, (q, k, v, g, s0))])
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_segment_grads_are_the_scan_backward():
    """scan_segment_grads (LASP-2's hand-written backward over segments) equals autograd
    through scan_segment_states: dL/dM_j = dL/dS_end_j."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 2, 2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    transfer = torch.rand(5, 2, 2, 3, generator=gen, dtype=F64)
    transfer[2, 1] = 0.0  # segment 2 of row 1 holds a document start
    ds_in = torch.randn(5, 2, 2, 3, 4, generator=gen, dtype=F64)
    (dm,) = torch.autograd.grad((scan_segment_states(m, transfer) * ds_in).sum(), m)
    assert (scan_segment_grads(ds_in, transfer) - dm).abs().max() < 1e-12
    assert (dm[-1] == 0).all()


@pytest.mark.skipif(
    fla_backend.torch_reference("gla", "naive_recurrent_gla") is None,
    reason="fla-core is not installed (the test extra has it): its naive references cannot be compared here",
)
def test_against_fla_naive_references():
    naive_recurrent_gla = fla_backend.torch_reference("gla", "naive_recurrent_gla")
    naive_recurrent_simple_gla = fla_backend.torch_reference("simple_gla", "naive_recurrent_simple_gla")

    q, k, v, g, gk, s0 = (x.detach().float() for x in _inputs(2, 45, 2, 4, 4, "both"))
    o, s = chunk_linear_attention(q, k, v, g, None, 0.5, s0, None, 16, True)
    o_r, s_r = naive_recurrent_simple_gla(q, k, v, g, 0.5, s0, True)
    assert (o - o_r).abs().max() < 1e-4 and (s - s_r).abs().max() < 1e-4
    o, s = chunk_linear_attention(q, k, v, None, gk, 4**-0.5, s0, None, 16, True)
    o_r, s_r = naive_recurrent_gla(q, k, v, gk, s0, True)
    assert (o - o_r).abs().max() < 1e-4 and (s - s_r).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None or not torch.cuda.is_available(),
    reason="the fla Triton dispatch needs fla and a CUDA device",
)
@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
def test_fla_dispatch_matches_torch(decay):
    q, k, v, g, gk, s0 = (None if x is None else x.detach().float().cuda() for x in _inputs(2, 100, 2, 16, 16, decay))
    cu = _cu(100).cuda()
    o, s = chunk_linear_attention(q, k, v, g, gk, 0.25, s0, cu, 64, True, impl="fla")
    o_r, s_r = chunk_linear_attention(q, k, v, g, gk, 0.25, s0, cu, 64, True, impl="chunk")
    assert (o - o_r).abs().max() < 2e-3 and (s - s_r).abs().max() < 2e-3


@pytest.mark.parametrize("cu", [None, [0, 50, 120, 200, 260, 400], [0, 8, 16, 24, 100, 400]])
def test_no_decay_path_matches_reference(cu, monkeypatch):
    """g = gk = None: the decay-free path (no gates computed) and its add-or-copy state scan,
    with no document, a few long documents, and several starts in one chunk."""
    from models.ops.linear_attention import chunk

    def no_gates(*_):
        raise AssertionError("decay-free inputs must not build gates")

    monkeypatch.setattr(chunk, "_scan", no_gates)
    monkeypatch.setattr(chunk, "_scalar_decay", no_gates)
    q, k, v, _, _, s0 = _inputs(2, 200, 2, 4, 3, "none")
    cu = None if cu is None else torch.tensor(cu)
    out = chunk_linear_attention(q, k, v, None, None, 0.5, s0, cu, 8, output_final_state=True)
    ref = recurrent_linear_attention_ref(q, k, v, None, None, 0.5, s0, cu)
    _check(out, ref, (q, k, v, s0))


def test_plain_scan_equals_the_gated_scan():
    """The decay-free scan (adds and copies) equals the gated scan with gates in {0, 1}, both
    directions."""
    from models.ops.linear_attention.chunk import _scan, _scan_plain

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 2, 12, 4, 5, generator=gen, dtype=F64)
    s0 = torch.randn(3, 2, 4, 5, generator=gen, dtype=F64)
    carry = torch.ones(3, 12, dtype=torch.bool)
    carry[1, [0, 5, 11]] = False
    carry[2, 7] = False
    carry[:, 3] = False
    gam = carry[:, None, :, None, None].expand(3, 2, 12, 1, 1).to(F64)
    for reverse in (False, True):
        for got, want in zip(_scan_plain(m, carry, s0, reverse), _scan(m, gam, s0, reverse)):
            assert torch.equal(got, want)
