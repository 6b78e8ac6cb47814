"""Two-kind layers (models/hybrid_attention.py): each mixer against a dense fp64 reference of its
paper's formulation on packed documents, the planted bugs the references catch, and the layers
under mixed CP strategies at worlds 3 and 4 (world 2 and every strategy: test_model_cp.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.hybrid_attention import LigerAttention, LolcatsAttention
from models.lizard_attention import LizardAttention
from models.rope import Rotary, apply_rotary
from models.softmax_attention import SoftmaxAttention

B, T, W = 2, 37, 6
CU = torch.tensor([0, 1, 12, 30, 37, 40, 41, 74])  # length-1 docs, docs longer and shorter than W


def _setup(mixer_cls, **cfg_kw):
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, hybrid_window=W, linear_chunk_size=8, **cfg_kw)
    torch.manual_seed(0)
    mixer = mixer_cls(cfg, 0).double()
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ctx = SingleDeviceContext(B, T, CU, block=16)
    pos = ctx.docs.index[None, :] - _doc_start(ctx)  # positions restart at each document
    cos, sin = Rotary(cfg.rope, cfg.hd).cos_sin(pos, torch.float64)
    return mixer, x, cos, sin, ctx


def _doc_start(ctx):
    d = ctx.docs.doc  # [B, T]
    first = torch.zeros_like(d)
    for b in range(B):
        for t in range(1, T):
            first[b, t] = first[b, t - 1] if d[b, t] == d[b, t - 1] else t
    return first


def _masks(ctx):
    """(same document and causal [B, 1, T, T], distance i - j [T, T])."""
    d = ctx.docs.doc
    i = torch.arange(T)
    dist = i[:, None] - i[None, :]
    return ((d[:, :, None] == d[:, None, :]) & (dist >= 0))[:, None], dist


def _qkv(m, x, cos, sin):
    q, k, v = m.qkv(x)
    k, v = m.repeat_kv(k), m.repeat_kv(v)
    return q, k, v, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _window_probs(qr, kr, same, dist, window):
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) / math.sqrt(qr.shape[-1])
    return s.masked_fill(~(same & (dist < window)), -math.inf).softmax(-1)  # [B, H, T, T]


def liger_dense(m, x, cos, sin, ctx):
    """Liger's layer from its pairs: 0.5 window softmax + 0.5 GLA, the GLA weight of (i, j) being
    sum_d softmax(q_i)_d softmax(k_j)_d exp(sum_{j<t<=i} gk_t,d), gk = logsigmoid(k) / 16."""
    q, k, v, qr, kr = _qkv(m, x, cos, sin)
    same, dist = _masks(ctx)
    o_win = torch.einsum("bhij,bjhd->bihd", _window_probs(qr, kr, same, dist, m.window), v)
    cum = (F.logsigmoid(k) / 16).cumsum(1)  # [B, T, H, D]
    decay = (cum[:, :, None] - cum[:, None, :]).exp()  # [B, i, j, H, D]
    a = torch.einsum("bihd,bjhd,bijhd->bhij", q.softmax(-1), k.softmax(-1), decay) * same
    o_lin = torch.einsum("bhij,bjhd->bihd", a, v)
    return m.out(0.5 * o_win + 0.5 * o_lin)


def lolcats_dense(m, x, cos, sin, ctx):
    """LoLCATs' combined scores: g * window softmax inside the window, f(q).f(k) outside,
    divided by their sum (module docstring)."""
    q, k, v, qr, kr = _qkv(m, x, cos, sin)
    same, dist = _masks(ctx)
    g = torch.sigmoid(m.window_factors)[None, :, None, None]
    lin = torch.einsum("bihf,bjhf->bhij", m.q_map(qr), m.k_map(kr)) * (same & (dist >= m.window))
    a = g * _window_probs(qr, kr, same, dist, m.window) + lin
    o = torch.einsum("bhij,bjhd->bihd", a / a.sum(-1, keepdim=True), v)
    return m.out(o)


def lizard_dense(m, x, cos, sin, ctx):
    """Lizard: 0.5 normalised gated hedgehog linear attention + 0.5 one softmax over the window
    keys and the meta tokens (module docstring of models/lizard_attention.py)."""
    q, k, v, qr, kr = _qkv(m, x, cos, sin)
    same, dist = _masks(ctx)
    g = m.h // m.n_kv
    mk, mv = m.meta_k.repeat_interleave(g, 1), m.meta_v.repeat_interleave(g, 1)  # [M, H, D]
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) / math.sqrt(m.d)
    s = s.masked_fill(~(same & (dist < m.window)), -math.inf)
    sm = torch.einsum("bihd,mhd->bhim", qr, mk) / math.sqrt(m.d)
    p = torch.cat([s, sm], -1).softmax(-1)
    o_win = torch.einsum("bhij,bjhd->bihd", p[..., :T], v) + torch.einsum("bhim,mhd->bihd", p[..., T:], mv)
    gk = F.logsigmoid(m.gate_up(m.gate_down(x))).view(B, T, m.h, -1) / 16
    cum = gk.cumsum(1)
    decay = (cum[:, :, None] - cum[:, None, :]).exp()  # [B, i, j, H, F]
    a = torch.einsum("bihf,bjhf,bijhf->bhij", m.q_map(qr), m.k_map(kr), decay) * same
    o_lin = torch.einsum("bhij,bjhd->bihd", a / a.sum(-1, keepdim=True), v)
    return m.out(0.5 * o_lin + 0.5 * o_win)


CASES = [(LigerAttention, liger_dense), (LolcatsAttention, lolcats_dense), (LizardAttention, lizard_dense)]


def _grads(m, x, out):
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("cls,dense", CASES)
def test_two_kind_mixer_matches_its_dense_reference(cls, dense):
    m, x, cos, sin, ctx = _setup(cls)
    out = m(x, cos, sin, ctx)
    ref = dense(m, x, cos, sin, ctx)
    assert (out - ref).abs().max() < 1e-10
    g = _grads(m, x, out)
    m.zero_grad()
    assert (g - _grads(m, x, dense(m, x, cos, sin, ctx))).abs().max() < 1e-10


@pytest.mark.parametrize("cls,dense", CASES)
def test_planted_window_one_key_too_many_fails_the_reference(cls, dense, monkeypatch):
    """The window branch seeing one token too many (W + 1 keys) is caught by the reference."""
    m, x, cos, sin, ctx = _setup(cls)
    run = ctx.run

    def planted(kind, *args, **kw):
        return run(kind, *args, **({**kw, "window": kw["window"] + 1} if kind in ("softmax", "meta_window") else kw))

    monkeypatch.setattr(ctx, "run", planted)
    assert (m(x, cos, sin, ctx) - dense(m, x, cos, sin, ctx)).abs().max() > 1e-4


def test_liger_has_exactly_the_softmax_layers_parameters():
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, attention_bias=True)
    shapes = {n: p.shape for n, p in SoftmaxAttention(cfg, 0).named_parameters()}
    assert {n: p.shape for n, p in LigerAttention(cfg, 0).named_parameters()} == shapes


def test_two_kind_model_calls_every_kind_and_builds_a_strategy_for_each():
    from trainer.config import TrainConfig, cp_strategies

    cfg = TrainConfig()
    cfg.model = ModelConfig(n_layers=4, mixer_pattern=["lolcats", "lolcats", "liger", "softmax"])
    assert cfg.model.kinds_of(0) == ("linear", "softmax", "delay")
    assert cfg.model.kinds() == ["linear", "softmax", "delay"]
    cfg.parallel.cp.strategies = {"softmax": "ring", "linear": "lasp2"}
    assert {k: s.name for k, s in cp_strategies(cfg).items()} == {"linear": "lasp2", "softmax": "ring", "delay": "halo"}


def test_two_kind_model_runs_a_mixed_pattern():
    """A 1:1 pattern with softmax layers: logits finite, every parameter reached by the loss."""
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mixer_pattern=["lolcats", "liger", "softmax"])
    cfg.hybrid_window = 4
    model = Transformer(cfg)
    ids = torch.randint(0, 257, (1, 20))
    model(ids).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.gloo
@pytest.mark.parametrize(
    "world,cells",
    [
        (
            3,
            [
                ("liger", "lasp1+ring", "contiguous"),
                ("lolcats", "lasp2+allgather+halo", "zigzag"),
                ("lizard", "lasp2+gather_window", "contiguous"),
                ("landmark", "gather_keys", "zigzag"),
            ],
        ),
        (
            4,
            [
                ("liger", "lasp2+ulysses", "zigzag"),
                ("lolcats", "lasp1+ring+halo", "contiguous"),
                ("lizard", "lasp2+gather_window", "zigzag"),
            ],
        ),
    ],
)
def test_two_kind_layers_under_mixed_strategies_match_one_device(world, cells):
    """Worlds 3 and 4, a window wider than a rank's chunk (the halo and the window branch reach
    past the neighbouring rank): loss and every gradient equal one device's (fp64)."""
    from parallel.spawn import run_distributed
    from tests.cp_check import check_model

    for per_rank in run_distributed(check_model, world, cells, 96, 16, 40, timeout=600):
        bad = [e for e in per_rank if not e[3] < 1e-9]
        assert not bad, bad


def _dense_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_liger_imports_a_checkpoint_and_exports_what_transformers_holds(model_type, tmp_path):
    """A Llama / Qwen2 checkpoint is a liger model's weights as they are (strict load); the export
    writes the same tensors plus the pattern and window in config.json, and reloads exactly."""
    import json

    from models.hf_io import load_hf_model, save_hf_checkpoint

    dense = _dense_model()
    save_hf_checkpoint(dense, str(tmp_path / "dense"), model_type=model_type)
    liger = load_hf_model(str(tmp_path / "dense"), mixer_pattern=["liger", "softmax"], hybrid_window=4).double()
    sd = dense.state_dict()
    assert all(torch.equal(v.double(), sd[k].double()) for k, v in liger.state_dict().items() if k in sd)
    ids = torch.randint(0, 61, (1, 24))
    out = liger(ids)
    save_hf_checkpoint(liger, str(tmp_path / "liger"), model_type=model_type)
    hf = json.load(open(tmp_path / "liger" / "config.json"))
    assert hf["longctx_mixers"]["mixer_pattern"] == ["liger", "softmax"] and hf["longctx_mixers"]["hybrid_window"] == 4
    back = load_hf_model(str(tmp_path / "liger")).double()
    assert back.cfg.mixer_pattern == ["liger", "softmax"] and back.cfg.hybrid_window == 4
    assert (back(ids) - out).abs().max() < 1e-12


@pytest.mark.parametrize(
    "mixer,new,train",
    [
        ("lolcats", 3, ["*.q_map.*", "*.k_map.*", "*.window_factors"]),  # maps, window factors
        ("lizard", 7, ["*.q_map.*", "*.k_map.*", "*.mixer.gate_*", "*.mixer.meta_*"]),  # maps, gate (3), meta k/v
    ],
)
def test_conversion_target_and_its_transfer_loss_falls(mixer, new, train, tmp_path):
    """From a checkpoint: q/k/v/o copied (GQA kept), the mixer's own modules new; the
    attention-transfer teacher of the layer is exactly the softmax layer it replaced; and
    training only the new modules lowers the transfer MSE."""
    from models.hf_io import load_hf_checkpoint, save_hf_checkpoint
    from trainer.distill import AttentionTransfer, teacher_attention
    from trainer.stages import carry_weights, freeze

    dense = _dense_model()
    with torch.no_grad():
        for p in dense.parameters():  # peaked attention, as in a trained model
            p.mul_(8)
    save_hf_checkpoint(dense, str(tmp_path / "dense"))
    _, state = load_hf_checkpoint(str(tmp_path / "dense"))
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hybrid_window=4)
    cfg.mixer_pattern = [mixer, "softmax"]
    student = Transformer(cfg)
    counts = carry_weights(state, student, where=None)
    assert counts["expanded"] == 0 and counts["new"] == new
    x = torch.randn(2, 24, 32)
    cos, sin = dense.rotary.cos_sin(torch.arange(24).expand(2, 24), x.dtype)
    ctx = SingleDeviceContext(2, 24)
    want = dense.layers["0"].mixer(x, cos, sin, ctx)
    torch.testing.assert_close(teacher_attention(student.layers["0"].mixer, x, cos, sin, ctx), want)
    freeze(student, train, "test")
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        with AttentionTransfer(student) as at:
            student(ids)
        loss = at.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _check_with_sharded_meta(rank, world, cells, *args):
    """check_model with the planted bug: each rank attends to its own slice of the meta tokens."""
    import parallel.strategies.gather_keys as gather_keys
    from tests.cp_check import check_model

    gather_keys.meta_tokens = lambda meta, ctx: meta.chunk(ctx.world_size)[ctx.rank]
    return check_model(rank, world, cells, *args)


@pytest.mark.gloo
def test_planted_sharded_meta_tokens_fail_the_cp_check():
    """Meta tokens sharded over the CP ranks instead of replicated: CP no longer equals one device."""
    from parallel.spawn import run_distributed

    errs = run_distributed(_check_with_sharded_meta, 2, [("lizard", "lasp2+gather_window", "zigzag")], timeout=600)
    assert all(e[0][3] > 1e-6 for e in errs), errs


def test_kv_cache_bytes_of_the_two_kind_and_landmark_layers():
    """Window + linear layers hold a bounded state (W keys and values, the linear state), nothing
    per token; landmark caches every key like softmax."""
    from models.config import ModelConfig
    from models.kv_cache import kv_cache_bytes

    base = dict(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hybrid_window=8)
    d = 16
    window = 2 * 8 * 2 * d
    for mixer, state in [("liger", 4 * d * d), ("lolcats", 4 * 2 * d * (d + 1)), ("lizard", 4 * 2 * d * (d + 1))]:
        got = kv_cache_bytes(ModelConfig(**base, mixer_pattern=[mixer]), elem_bytes=2)
        assert got == {"kv_cache_bytes_per_token": 0, "state_bytes": (window + state) * 2}, mixer
    got = kv_cache_bytes(ModelConfig(**base, mixer_pattern=["landmark"]), elem_bytes=2)
    assert got == {"kv_cache_bytes_per_token": 2 * 2 * d * 2, "state_bytes": 0}


def test_meta_window_op_matches_its_dense_reference_on_gathered_keys():
    """The O(Tq x W) meta window (the softmax kernel on the window keys, the meta tokens merged by
    log-sum-exp, backward from the merged lse) against the dense [Tq, Tk + M] softmax, fp64, on
    a query chunk against a non-contiguous gathered key set (as under CP), GQA, documents: output
    and the gradients of q, k, v and both meta tensors."""
    from models.lizard_attention import meta_window_core, meta_window_ref
    from models.ops.documents import doc_ids

    g = torch.Generator().manual_seed(3)
    q_index = torch.arange(40, 64)
    k_index = torch.cat([torch.arange(20, 30), torch.arange(33, 64)])
    cu = torch.tensor([0, 35, 50, 128])
    q_doc, k_doc = doc_ids(cu, q_index)[None].expand(2, -1), doc_ids(cu, k_index)[None].expand(2, -1)
    q = torch.randn(2, len(q_index), 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, len(k_index), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    mk, mv = (torch.randn(3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    args = (q, k, v, q_index, q_doc, k_index, k_doc)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    outs = []
    for op in (meta_window_core, meta_window_ref):
        o = op(*args, window=9, meta_k=mk, meta_v=mv)
        outs.append([o, *torch.autograd.grad((o * do).sum(), (q, k, v, mk, mv))])
    errs = [(a - b).abs().max().item() for a, b in zip(*outs)]
    assert max(errs) < 1e-12, errs
    assert outs[0][2].abs().sum() > 0 and outs[0][4].abs().sum() > 0  # keys and meta tokens reached
