"""S2 defaults against the authors' layout rule (DKernel's ``get_sparse_attn_mask``) and
Phi-3-small's, written out independently below from their published definitions, block by
block over a grid of settings and token by token over packed documents; a document's S2
output is the same wherever it sits in a pack; the older row-based options stay available
and do differ (the comparisons have teeth)."""

import itertools
import warnings

import pytest
import torch

from models.context import SingleDeviceContext
from models.ops.attention import MaskSpec
from models.ops.documents import doc_ids
from models.s2_pattern import s2_pattern


def published_layout(n_heads, n_kv, nb, *, stride, local, homo=False, offset=0, n_dense=0, step=None):
    """[n_heads, nb, nb] bool, query block i x key block j per query head, as the authors
    describe it: causal blocks; the ``local`` most recent blocks; otherwise key block j is
    kept when (j + h * step + offset) % stride == 0 for the head's KV head h, with the step
    ``max(1, stride // n_heads)`` from the *query* heads, every head offset ``offset`` when
    homogeneous, and the last ``n_dense`` KV heads dense."""
    step = max(1, stride // n_heads) if step is None else step
    per_kv = n_heads // n_kv
    out = torch.zeros(n_heads, nb, nb, dtype=torch.bool)
    for hq in range(n_heads):
        h = hq // per_kv
        for i in range(nb):
            for j in range(i + 1):
                if i - j < local or (not homo and h >= n_kv - n_dense):
                    out[hq, i, j] = True
                else:
                    out[hq, i, j] = (j + (0 if homo else h * step) + offset) % stride == 0
    return out


def ours(pattern, n_heads, nb):
    """Our pattern's block layout, [n_heads, nb, nb] (query heads share their KV head's)."""
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    per_kv = n_heads // pattern.n_kv_heads
    return torch.stack([pattern.active(i, j, torch.tensor(hq // per_kv)) for hq in range(n_heads)])


def _pattern(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most DKernel settings leave residues uncovered: that is its rule
        return s2_pattern(block=16, **kw)


def grid():
    for h, hkv, stride, local, homo, n_dense, offset in itertools.product(
        (1, 2, 4, 8, 16), (1, 2, 4, 8), (1, 2, 3, 4, 8, 16), (1, 2, 3), (False, True), (0, 1, 2), (0, 1, 5)
    ):
        if hkv > h or h % hkv or (homo and n_dense) or n_dense > hkv:
            continue
        yield h, hkv, stride, local, homo, n_dense, offset


def test_defaults_equal_the_published_rule_block_by_block():
    nb, n = 24, 0
    for h, hkv, stride, local, homo, n_dense, offset in grid():
        kw = dict(stride=stride, local=local, n_kv_heads=hkv, n_heads=h, homogeneous=homo, n_dense_heads=n_dense)
        want = published_layout(h, hkv, nb, stride=stride, local=local, homo=homo, offset=offset, n_dense=n_dense)
        got = ours(_pattern(**kw, layer_offset=offset), h, nb)
        assert torch.equal(got & torch.ones(nb, nb, dtype=torch.bool).tril(), want), (h, hkv, stride, local, homo)
        # the default layer offset is 0 in every layer (DKernel's head_sliding_offset)
        if offset == 0:
            assert _pattern(**kw) == _pattern(**kw, layer_offset=0)
        n += 1
    assert n == 2754, n  # settings compared


def test_the_grid_has_teeth():
    """The older choices differ from the rule where the issue says: the step from the KV heads
    (GQA, stride > Hkv), the layer index as offset, row blocks in packs."""
    nb, spread_diff, gqa = 24, 0, 0
    for h, hkv, stride, local, homo, n_dense, offset in grid():
        if homo or offset:
            continue
        want = published_layout(h, hkv, nb, stride=stride, local=local, n_dense=n_dense)
        got = ours(_pattern(stride=stride, local=local, n_kv_heads=hkv, n_heads=h, n_dense_heads=n_dense,
                            head_step="spread"), h, nb)  # fmt: skip
        differs = not torch.equal(got & torch.ones(nb, nb, dtype=torch.bool).tril(), want)
        spread_diff += differs
        # the rule's step equals spread's exactly when both floors agree, e.g. MHA
        assert differs <= (max(1, stride // h) != max(1, stride // hkv))
        gqa += h != hkv and stride > hkv and hkv - n_dense > 1
    assert spread_diff > 0 and spread_diff >= gqa // 2, (spread_diff, gqa)
    # the example: 8 query heads, 2 KV heads, stride 8 -> KV-head offsets (0, 1), not (0, 4)
    assert _pattern(stride=8, local=1, n_kv_heads=2, n_heads=8).offsets == (0, 1)
    assert _pattern(stride=8, local=1, n_kv_heads=2, n_heads=8, head_step="spread").offsets == (0, 4)


def token_mask(pattern, cu, b, n):
    """[B, Hkv, n, n] bool: the token-level S2 mask (pattern, causal, documents) of a packed
    batch, through MaskSpec with the pattern bound to the batch's documents."""
    pos = torch.arange(n)
    doc = doc_ids(cu, torch.arange(b)[:, None] * n + pos[None])
    mask = MaskSpec(pos, pos, doc, doc, True, None, pattern.bind(cu, b, n))
    kidx = torch.arange(n)
    return torch.stack(
        [
            torch.stack([mask.allowed(slice(None), kidx, r) & mask.pattern_allowed(slice(None), kidx, hk, r)
                         for hk in range(pattern.n_kv_heads)])
            for r in range(b)
        ]
    )  # fmt: skip


def published_tokens(layout, length, block):
    """[H, L, L] the token mask of one sequence of ``length`` from a block layout: each block
    pair expanded to block x block tokens, cut to the length, causal (DKernel's return_dense)."""
    dense = layout.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :length, :length]
    return dense & torch.ones(length, length, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    "h,hkv,stride,local,opts,docs",
    [
        (4, 4, 4, 1, {}, [37, 100, 76]),  # the packing example
        (8, 2, 4, 1, {}, [83, 130]),  # GQA: the step from the query heads; lengths not whole blocks
        (8, 4, 2, 2, {"n_dense_heads": 1}, [16, 1, 47, 149]),  # the last KV head dense
        (4, 2, 3, 1, {"homogeneous": True, "layer_offset": 1}, [50, 163]),
        (6, 3, 8, 2, {"layer_offset": 1}, [5, 60, 148]),  # Phi-3-small's offset 1
    ],
)
def test_packed_documents_get_the_published_layout_token_by_token(h, hkv, stride, local, opts, docs):
    block, n = 16, 213
    assert sum(docs) == n
    pattern = _pattern(stride=stride, local=local, n_kv_heads=hkv, n_heads=h, **opts)
    cu = torch.tensor([0, *itertools.accumulate(docs)] + [n + 100, 2 * n])  # row 2: a doc of 100, then one
    got = token_mask(pattern, cu, 2, n)  # [2, Hkv, n, n]
    kw = dict(stride=stride, local=local, homo=opts.get("homogeneous", False), offset=opts.get("layer_offset", 0))
    kw["n_dense"] = opts.get("n_dense_heads", 0)
    per_kv = h // hkv
    for row, lengths in ((0, docs), (1, [100, n - 100])):
        want = torch.zeros(hkv, n, n, dtype=torch.bool)
        start = 0
        for length in lengths:
            layout = published_layout(h, hkv, -(-length // block), **kw)[::per_kv]  # one query head per KV head
            want[:, start : start + length, start : start + length] = published_tokens(layout, length, block)
            start += length
        assert torch.equal(got[row], want), row
    # the same pattern on row blocks (the older choice) differs once documents are packed
    row_pattern = _pattern(stride=stride, local=local, n_kv_heads=hkv, n_heads=h, doc_blocks="row", **opts)
    assert not torch.equal(token_mask(row_pattern, cu, 2, n), got)


def _run(pattern, q, k, v, cu):
    ctx = SingleDeviceContext(q.shape[0], q.shape[1], cu, block=16)
    return ctx.run("sparse", q, k, v, pattern=pattern, causal=True)


@pytest.mark.parametrize("doc_blocks", ["document", "row"])
def test_a_document_attends_the_same_wherever_it_sits(doc_blocks):
    """Documents [37, 100, 76] in one row: each one's output and gradients equal those of the
    document alone (fp64), with per-document blocks; with row blocks they do not."""
    g = torch.Generator().manual_seed(0)
    docs, h, hkv, d = [37, 100, 76], 4, 2, 8
    n = sum(docs)
    pattern = _pattern(stride=4, local=1, n_kv_heads=hkv, n_heads=h, doc_blocks=doc_blocks)
    q = torch.randn(1, n, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    do = torch.randn(1, n, h, d, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *itertools.accumulate(docs)])
    o = _run(pattern, q, k, v, cu)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    errs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = [x[:, a:b].detach().requires_grad_() for x in (q, k, v)]
        o_a = _run(pattern, *alone, None)
        g_a = torch.autograd.grad((o_a * do[:, a:b]).sum(), alone)
        errs.append(max((x - y[:, a:b]).abs().max().item() for x, y in zip([o_a, *g_a], [o, *grads])))
    if doc_blocks == "document":
        assert max(errs) < 1e-12, errs
    else:  # the first document sits at 0 either way; the others meet shifted blocks
        assert errs[0] < 1e-12 and min(errs[1:]) > 1e-3, errs


def test_options_are_validated_with_the_setting_named():
    from models import ModelConfig

    base = dict(dim=64, n_heads=4, n_kv_heads=2, mixer_pattern=["s2"], s2_block=16, s2_stride=2)
    for key, value, match in [
        ("s2_head_step", "query", "model.s2_head_step='query' must be one of"),
        ("s2_doc_blocks", "pack", "model.s2_doc_blocks='pack' must be one of"),
        ("s2_layer_offset", "first", "model.s2_layer_offset='first' must be an integer"),
        ("s2_n_dense_heads", 3, r"model.s2_n_dense_heads=3 must lie in \[0, 2\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**base, **{key: value})
    from models.s2_attention import layer_pattern

    cfg = ModelConfig(**base, s2_layer_offset="layer", s2_head_step="spread", s2_doc_blocks="row")
    assert [layer_pattern(cfg, i).offsets for i in range(3)] == [(0, 1), (1, 0), (0, 1)]
    assert not layer_pattern(cfg, 0).per_document
    cfg = ModelConfig(**base, s2_layer_offset="3", s2_n_dense_heads=1)  # Hydra gives strings
    assert layer_pattern(cfg, 0).offsets == (1, 0) and layer_pattern(cfg, 5).dense == (False, True)


def test_an_unbound_per_document_pattern_says_how_to_bind_it():
    pattern = _pattern(stride=2, local=1, n_kv_heads=1)
    pos = torch.arange(20)
    doc = torch.zeros(1, 20, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bind it with pattern.bind\(cu_seqlens, batch, seq_len\)"):
        MaskSpec(pos, pos, doc, doc, True, None, pattern).pattern_allowed(slice(None), pos, 0)


def phi3small_layout(n_heads, nb, *, stride, local, homo):
    """[n_heads, nb, nb] bool: Phi-3-small's (and vLLM's) blocksparse rule per *query* head h:
    causal blocks, the ``local`` most recent, else (j + h * max(1, stride // n_heads) + 1) % stride
    == 0 (h = 0 for every head when homogeneous)."""
    step = max(1, stride // n_heads)
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    return torch.stack(
        [(j <= i) & ((i - j < local) | ((j + (0 if homo else h * step) + 1) % stride == 0)) for h in range(n_heads)]
    )


@pytest.mark.filterwarnings("ignore:S2 pattern")  # Phi-3-small's layout leaves residues to other layers
@pytest.mark.parametrize("n_kv,homo", [(4, False), (2, True)])
def test_phi3small_settings_import_export(n_kv, homo, tmp_path):
    import json
    import os

    from models import ModelConfig, Transformer
    from models.hf_io import load_hf_model, save_hf_checkpoint
    from models.s2_attention import layer_pattern

    torch.manual_seed(0)
    dense = Transformer(ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=n_kv)).double()  # random weights
    save_hf_checkpoint(dense, str(tmp_path / "dense"))
    path = os.path.join(tmp_path, "dense", "config.json")
    hf = json.load(open(path))
    phi = dict(blocksparse_block_size=16, blocksparse_num_local_blocks=2, blocksparse_vert_stride=8,
               blocksparse_homo_head_pattern=homo, dense_attention_every_n_layers=2)  # fmt: skip
    json.dump({**hf, **phi}, open(path, "w"))
    model = load_hf_model(str(tmp_path / "dense")).double()
    cfg = model.cfg
    assert cfg.mixer_pattern == ["s2", "softmax"] and [cfg.kind_of(i) for i in range(4)] == ["sparse", "softmax"] * 2
    nb = 40
    want = phi3small_layout(4, nb, stride=8, local=2, homo=homo)
    for layer in (0, 2):  # the same layout in every sparse layer
        got = ours(layer_pattern(cfg, layer, False), 4, nb)
        assert torch.equal(got & torch.ones(nb, nb, dtype=torch.bool).tril(), want)
    save_hf_checkpoint(model, str(tmp_path / "s2"))
    out = json.load(open(os.path.join(tmp_path, "s2", "config.json")))
    assert {k: out[k] for k in phi} == phi  # export writes Phi-3-small's keys back
    back = load_hf_model(str(tmp_path / "s2"))
    assert back.cfg.mixer_pattern == cfg.mixer_pattern and str(back.cfg.s2_layer_offset) == "1"
    ids = torch.randint(0, 257, (1, 48))
    assert (back.double()(ids) - model(ids)).abs().max() < 1e-12


def test_phi3small_per_query_head_layout_under_gqa_is_refused():
    from models.hf_io import _s2_from_phi3small

    hf = dict(num_attention_heads=32, num_key_value_heads=8, blocksparse_vert_stride=8,
              blocksparse_homo_head_pattern=False)  # fmt: skip
    with pytest.raises(ValueError, match="per-KV-head S2 patterns cannot express"):
        _s2_from_phi3small(hf)


def test_an_older_longctx_export_keeps_its_pattern():
    from models.hf_io import _s2_from_hf

    old = {"longctx_s2": dict(mixer_pattern=["s2"], block=16, stride=4, local=1, dense_heads=[], offsets=None,
                              homogeneous=False, layer_offset=None)}  # fmt: skip
    got = _s2_from_hf(old)
    assert got["s2_head_step"] == "spread" and got["s2_doc_blocks"] == "row" and got["s2_layer_offset"] == "layer"
