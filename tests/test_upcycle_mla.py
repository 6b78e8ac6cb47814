"""Upcycling softmax layers into MLA (trainer/upcycle.py) and logit distillation
(trainer/objectives/logit_distill.py): the SVD initialisation at full rank reproduces the
teacher layer exactly where the method is lossless (one KV head, every dim RoPE'd) and the K/V
projections exactly in general; the distillation loss is zero when student == teacher."""

import dataclasses

import pytest
import torch

from models import ModelConfig, Transformer
from trainer.objectives.logit_distill import distill_kl
from trainer.stages import carry_weights
from trainer.upcycle import rope_dims

BASE = dict(vocab_size=61, dim=64, n_layers=2, n_heads=4, head_dim=16, mla_latent_norm=False)


def _pair(n_kv, rope, rank, q_lora=None, pattern=("mla", "softmax")):
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(**BASE, n_kv_heads=n_kv)).double()
    for p in teacher.parameters():  # weights that visibly shape the output
        p.data.normal_(0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    cfg = ModelConfig(
        **BASE,
        n_kv_heads=n_kv,
        mixer_pattern=list(pattern),
        mla_qk_rope_head_dim=rope,
        mla_qk_nope_head_dim=16 - rope,
        mla_v_head_dim=16,
        mla_kv_lora_rank=rank,
        mla_q_lora_rank=q_lora,
    )
    student = Transformer(cfg).double()
    counts = carry_weights({k: v.detach() for k, v in teacher.named_parameters()}, student, where=None)
    return teacher, student, counts


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 24), generator=g)
    return ids, torch.arange(24).expand(2, 24)


def test_full_rank_svd_reproduces_the_layer_exactly():
    """MQA teacher, every dim RoPE'd: the shared RoPE key is the teacher's key, the latent carries V."""
    for q_lora in (None, 64):
        teacher, student, counts = _pair(n_kv=1, rope=16, rank=16, q_lora=q_lora)
        assert counts["svd"] > 0
        ids, pos = _inputs()
        with torch.no_grad():
            err = (student(ids, pos) - teacher(ids, pos)).abs().max().item()
        assert err < 1e-10, (q_lora, err)


def test_full_rank_latent_reproduces_k_nope_and_v():
    """GQA teacher, RoPE on 8 of 16 dims: kv_b @ kv_a gives each head's no-RoPE K rows and V exactly."""
    teacher, student, _ = _pair(n_kv=2, rope=8, rank=2 * (8 + 16))
    m, t = student.layers["0"].mixer, teacher.layers["0"].mixer
    nope, _ = rope_dims(16, 8)
    full = m.kv_b_proj.weight @ m.kv_a_proj.weight[: m.dc]  # [H * (Dn + Dv), dim]
    full = full.view(4, 8 + 16, 64)
    k = t.k_proj.weight.view(2, 16, 64)
    v = t.v_proj.weight.view(2, 16, 64)
    for h in range(4):
        assert (full[h, :8] - k[h // 2, nope]).abs().max() < 1e-10
        assert (full[h, 8:] - v[h // 2]).abs().max() < 1e-10


def test_truncated_rank_error_falls_with_rank():
    from trainer.upcycle import svd_init_mla

    errs = []
    for rank in (4, 12, 24, 48):
        teacher, student, _ = _pair(n_kv=2, rope=8, rank=rank)
        src = {k: v.detach() for k, v in teacher.named_parameters()}
        errs.append(svd_init_mla(src, student)[0]["kv"])
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-12 < errs[0], errs


def test_upcycle_needs_matching_widths():
    with pytest.raises(ValueError, match="SVD initialisation needs model.mla_qk_nope_head_dim"):
        torch.manual_seed(0)
        teacher = Transformer(ModelConfig(**BASE))
        cfg = ModelConfig(**BASE, mixer_pattern=["mla"], mla_qk_rope_head_dim=8, mla_v_head_dim=16)
        carry_weights(dict(teacher.named_parameters()), Transformer(cfg), where=None)


def test_distill_loss_zero_when_student_is_teacher():
    teacher, _, _ = _pair(n_kv=2, rope=8, rank=8)
    student = Transformer(dataclasses.replace(teacher.cfg)).double()
    student.load_state_dict(teacher.state_dict())
    ids, pos = _inputs()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        t = teacher(ids, pos)
    s = student(ids, pos)
    assert distill_kl(s, t, labels).abs().item() < 1e-12
    with torch.no_grad():
        student.layers["0"].mixer.q_proj.weight.mul_(1.5)  # a different student: KL > 0
    assert distill_kl(student(ids, pos), t, labels).item() > 1e-3


def test_objective_loss_zero_when_student_is_teacher():
    from parallel.spawn import run_distributed

    assert run_distributed(_objective_loss, 1)[0] < 1e-12


def _objective_loss(rank, world):
    from trainer.objectives import objective_class

    teacher, _, _ = _pair(n_kv=2, rope=8, rank=8)
    student = Transformer(teacher.cfg).double()
    student.load_state_dict(teacher.state_dict())
    ids, pos = _inputs()
    batch = {"input_ids": ids, "positions": pos, "labels": ids}
    obj = objective_class("logit_distill")(None, student, None, teacher=teacher)
    _, value, _ = obj.loss(student, batch, None)
    return abs(value)


MLA_TINY = [
    "model.mla_qk_rope_head_dim=8",
    "model.mla_qk_nope_head_dim=8",
    "model.mla_v_head_dim=16",
    "model.mla_kv_lora_rank=16",
]


@pytest.mark.e2e
def test_recipe_upcycles_a_run_and_distills(tmp_path):
    """Pretrain a tiny softmax run, then recipe=upcycle_mla from its run dir (both stages)."""
    from parallel.spawn import run_distributed
    from tests.test_recipes_e2e import _rows, _train, _weights

    base, up = str(tmp_path / "base"), str(tmp_path / "up")
    run_distributed(_train, 1, [f"trainer.run_dir={base}", "trainer.steps=3"])
    run_distributed(
        _train,
        1,
        ["recipe=upcycle_mla", f"trainer.run_dir={up}", f"init_from={base}"]
        + ["recipe.stages.0.steps=3", "recipe.stages.1.steps=1"]
        + MLA_TINY,
    )
    meta, weights = _weights(up)
    assert meta["config"]["model"]["mixer_pattern"] == ["mla", "mla", "mla", "softmax"]
    assert "layers.0.mixer.kv_b_proj.weight" in weights
    kl = [r["distill_kl"] for r in _rows(up) if "distill_kl" in r]
    assert len(kl) == 3 and all(0 <= v < float("inf") for v in kl), kl
