"""Recipe building blocks without the trainer: carrying weights between stages, freezing,
optimizer state, attention transfer, LoRA, the training mix, evaluation maths."""

import random

import pytest
import torch

from models import Transformer
from models.config import ModelConfig
from models.lora import attach_lora, merge_lora, merge_lora_state
from trainer.distill import AttentionTransfer
from trainer.stages import carry_optimizer_state, carry_weights, freeze

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
HYBRID = dict(
    SMALL,
    mixer_pattern=["linear", "softmax"],
    linear_feature_map="hedgehog",
    linear_normalize=True,
    linear_rope=True,
    linear_output_norm=False,
    linear_output_gate=False,
)


def _models():
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(**SMALL))
    torch.manual_seed(1)
    student = Transformer(ModelConfig(**HYBRID))
    return teacher, student


def test_carry_copies_expands_kv_and_keeps_new_parameters_initialised():
    teacher, student = _models()
    src = dict(teacher.named_parameters())
    counts = carry_weights({k: v.detach() for k, v in src.items()}, student)
    s = dict(student.named_parameters())
    assert torch.equal(s["layers.0.mixer.q_proj.weight"], src["layers.0.mixer.q_proj.weight"])
    assert torch.equal(s["layers.1.mixer.k_proj.weight"], src["layers.1.mixer.k_proj.weight"])  # softmax kept
    hd = 8  # GQA 2 kv heads -> 4 heads: kv head j serves heads 2j, 2j+1 (as the GQA kernel)
    k_old, k_new = src["layers.0.mixer.k_proj.weight"], s["layers.0.mixer.k_proj.weight"]
    for h in range(4):
        assert torch.equal(k_new[h * hd : (h + 1) * hd], k_old[(h // 2) * hd : (h // 2 + 1) * hd])
    assert torch.equal(s["layers.0.mixer.q_map.weight"], torch.eye(hd).repeat(4, 1, 1))  # identity maps
    assert counts == {"copied": len(src) - 2, "expanded": 2, "new": 2, "dropped": 0}


def test_expanded_kv_softmax_equals_the_gqa_teacher():
    """The teacher the student is trained against is the softmax model itself."""
    from models.context import SingleDeviceContext
    from trainer.distill import teacher_attention

    teacher, student = _models()
    carry_weights({k: v.detach() for k, v in teacher.named_parameters()}, student)
    x = torch.randn(2, 24, 32)
    cos, sin = teacher.rotary.cos_sin(torch.arange(24).expand(2, 24), x.dtype)
    ctx = SingleDeviceContext(2, 24)
    want = teacher.layers["0"].mixer(x, cos, sin, ctx)
    got = teacher_attention(student.layers["0"].mixer, x, cos, sin, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attention_transfer_loss_falls_and_only_feature_maps_get_gradients():
    teacher, student = _models()
    with torch.no_grad():
        for p in teacher.parameters():  # weights large enough for peaked attention
            p.mul_(8)
    carry_weights({k: v.detach() for k, v in teacher.named_parameters()}, student)
    freeze(student, ["*.q_map.*", "*.k_map.*"], "test")
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 257, (2, 48), generator=g)
    losses = []
    for _ in range(25):
        with AttentionTransfer(student) as at:
            student(x)
        loss = at.loss()
        loss.backward()
        if not losses:
            with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
            assert with_grad == {"layers.0.mixer.q_map.weight", "layers.0.mixer.k_map.weight"}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_freeze_rejects_patterns_that_match_nothing():
    _, student = _models()
    with pytest.raises(ValueError, match=r"train_params=\['\*.nope'\] match no parameter"):
        freeze(student, ["*.nope"], "recipe.stages[0] (x)")


def test_optimizer_state_kept_for_same_name_and_shape_only():
    teacher, student = _models()
    opt = torch.optim.AdamW(teacher.parameters())
    teacher(torch.randint(0, 257, (1, 16))).mean().backward()
    opt.step()
    new = torch.optim.AdamW(student.parameters())
    n = carry_optimizer_state(opt, teacher, new, student)
    s = dict(student.named_parameters())
    assert torch.equal(
        new.state[s["layers.0.mixer.q_proj.weight"]]["exp_avg"],
        opt.state[dict(teacher.named_parameters())["layers.0.mixer.q_proj.weight"]]["exp_avg"],
    )
    assert s["layers.0.mixer.k_proj.weight"] not in new.state  # shape changed (GQA -> MHA)
    assert n == len(s) - 4  # k/v of layer 0 and both feature maps start fresh


def test_lora_starts_equal_and_merge_equals_unmerged_logits():
    _, student = _models()
    x = torch.randint(0, 257, (2, 40))
    before = student(x)
    attach_lora(student, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8.0)
    torch.testing.assert_close(student(x), before, rtol=0, atol=0)  # B = 0
    for name, p in student.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.2)
    unmerged = student(x)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    assert merge_lora(student) == 8
    assert not any("lora" in n for n, _ in student.named_parameters())
    torch.testing.assert_close(student(x), unmerged, rtol=1e-5, atol=1e-5)
    merged_state = merge_lora_state(state, 8.0 / 4)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(merged_state[k], v, rtol=1e-6, atol=1e-6)


def test_bucket_sums_by_hand():
    from trainer.evaluate import bucket_sums, position_edges

    assert position_edges(8, 4) == [0, 2, 4, 6, 8]
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    pos = torch.tensor([0, 1, 2, 7, 0, 3])
    valid = torch.tensor([True, True, True, True, False, True])
    sums = bucket_sums(ce, pos, valid, [0, 2, 4, 6, 8])
    assert sums.tolist() == [[3.0, 9.0, 0.0, 4.0], [2.0, 2.0, 0.0, 1.0]]


def test_answer_hits_and_summary_by_hand():
    from trainer.eval_report import summarize
    from trainer.evaluate import answer_hits

    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 1] = 1
    labels = torch.tensor([[2, 4, -100, -100]])
    assert answer_hits(logits, labels).tolist() == [1.0, 2.0]
    s = summarize(
        {
            "val_loss": 2.0,
            "val_loss@pos0-4": 3.0,
            "val_loss@pos4-8": 1.0,
            "passkey@64": 0.5,
            "passkey@64@0.1": 1.0,
            "passkey@64@0.9": 0.0,
            "mqar@32": 0.25,
        }
    )
    assert s == {
        "val_loss": 2.0,
        "loss_by_position": {"edges": [0, 4, 8], "loss": [3.0, 1.0]},
        "passkey": {"lengths": [64], "mean": [0.5], "depths": [0.1, 0.9], "accuracy": [[1.0, 0.0]]},
        "mqar": {32: 0.25},
    }


def test_passkey_training_text_matches_the_evaluated_format():
    from trainer.data import ByteTokenizer, passkey_example
    from trainer.data.synthetic import passkey_text

    text = passkey_text(300, 0.5, random.Random(3))
    ids, answer = passkey_example(ByteTokenizer(), 300 - 7, 0.5, random.Random(3))
    assert len(text) == 300 and ByteTokenizer().encode(text) == ids + answer


def test_mix_upsamples_long_documents_to_the_ratio():
    from trainer.data.mix import MixedSource

    docs = ["x" * 1000] * 2 + ["y" * 100] * 30  # long: 2000 chars, short: 3000 chars
    mix = MixedSource(docs, long_min_chars=500, long_ratio=0.75, passkey_fraction=0.5, seed=0)
    natural = [mix.base[i] for i in mix.index]
    long_chars = sum(len(d) for d in natural if len(d) >= 500)
    assert mix.repeat == pytest.approx(4.5) and long_chars / sum(map(len, natural)) == pytest.approx(0.75, abs=0.1)
    assert len(mix) == len(mix.index) + round(0.5 * len(mix.index))
    assert "pass key" in mix[len(mix) - 1] and mix[len(mix) - 1] == mix[len(mix) - 1]  # deterministic


def test_normalized_linear_attention_is_a_weighted_mean_of_values():
    """linear_normalize: o_t = sum_s w_ts v_s with w_ts = phi(q_t).phi(k_s) / sum_s' (...), checked
    against the formula on one head (causal, one document)."""
    from models.context import SingleDeviceContext

    cfg = ModelConfig(**HYBRID)
    mixer = Transformer(cfg).layers["0"].mixer
    x = torch.randn(1, 10, 32)
    cos, sin = torch.ones(1, 10, 1, 8), torch.zeros(1, 10, 1, 8)  # no rotation
    got = mixer(x, cos, sin, SingleDeviceContext(1, 10))
    q = mixer.q_map(mixer.q_proj(x).view(1, 10, 4, 8))
    k = mixer.k_map(mixer.k_proj(x).view(1, 10, 4, 8))
    v = mixer.v_proj(x).view(1, 10, 4, 8)
    w = torch.einsum("bthd,bshd->bhts", q, k).tril()
    o = torch.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdim=True), v)
    torch.testing.assert_close(got, mixer.o_proj(o.reshape(1, 10, 32)), rtol=1e-4, atol=1e-5)
