"""Prompt/completion data (trainer/data/sft.py) and its data masks (models/ops/attention/segments.py):
loss only on completions, a shared-question pack exactly equal to its completions packed one by one,
prefix-LM seeing the prompt both ways, chat rendering, exact resume, clear errors."""

import json

import pytest
import torch

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.ops.attention.segments import COMPLETION, PROMPT, SegmentMask, row_groups, segment_mask
from trainer.data import ByteTokenizer, collate
from trainer.data.sft import FALLBACK_TEMPLATE, SFTPacked, generated_examples, read_examples, render

TOK = ByteTokenizer()
EX = {"prompt": "Q: What is 12 + 30?\nA:", "completion": [" 42", " 12 + 30 = 42", " It is 42."]}


def _batch(examples, mask, n=64, rows=1):
    ds = SFTPacked(examples, TOK, n, mask)
    return collate([ds.next_row() for _ in range(rows)])


def _split_at_eos(tokens):
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == TOK.eos_id:
            out, cur = out + [cur], []
    return out


def _completion_tokens(examples):
    return sum(len(c) for e in examples for c in render(e, TOK)[1])


@pytest.mark.parametrize("mask", ["causal", "prefix_lm", "shared_question"])
def test_loss_only_on_completions(mask):
    """Labelled tokens are exactly the completions (with their eos), in order: a label on a
    prompt token (the planted bug) changes the count and the text."""
    b = _batch([EX], mask, n=64 if mask == "shared_question" else 96)  # one epoch of units per row
    labels = b["labels"][0]
    got = [t for t in labels.tolist() if t != -100]
    assert len(got) == _completion_tokens([EX])
    pieces = TOK.decode([TOK.eos_id if t == TOK.eos_id else t for t in got])  # eos dropped: split by count
    assert sorted(_split_at_eos(got)) == sorted(render(EX, TOK)[1]), pieces
    # every labelled position lies in a completion, or is the prompt's last token (causal / prefix-LM)
    seg, roles = b["segments"].tolist(), b["roles"].tolist()
    role_of = torch.repeat_interleave(torch.tensor(roles), torch.diff(torch.tensor(seg)))
    at = (labels != -100).nonzero().flatten()
    prompt_hits = [int(t) for t in at if role_of[t] == PROMPT]
    assert all(role_of[t] in (COMPLETION, PROMPT) for t in at)
    assert len(prompt_hits) == (0 if mask == "shared_question" else 3)  # one per unit: the prompt's last token
    assert all(role_of[t + 1] == COMPLETION for t in prompt_hits)


def _ce(model, batch, mask_name):
    mask = segment_mask(mask_name, batch)
    b, n = batch["input_ids"].shape
    ctx = SingleDeviceContext(b, n, batch["cu_seqlens"], 16, mask)
    logits = model(batch["input_ids"], batch["positions"], ctx)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).double(), batch["labels"].flatten(), reduction="sum", ignore_index=-100
    )


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1)).double()


def test_shared_question_equals_completions_packed_one_by_one():
    """One prompt with three completions as a shared question: the same loss as the three
    prompt + completion documents (causal); a completion that sees its sibling (the planted bug:
    the group read as one prefix-LM document) does not."""
    model = _model()
    with torch.no_grad():
        shared = _ce(model, _batch([EX], "shared_question"), "shared_question")
        separate = _ce(model, _batch([EX], "causal", n=96), "causal")
        sb = _batch([EX], "shared_question")
        leaky = _ce(model, sb, "prefix_lm")  # completions see each other
    assert abs(shared - separate) < 1e-9, (shared, separate)
    assert abs(leaky - separate) > 1e-3


def test_prefix_lm_prompt_bidirectional_completion_causal():
    model = _model()
    b = _batch([{"prompt": "Copy: abc def\nA:", "completion": " abc def"}], "prefix_lm")
    mask = segment_mask("prefix_lm", b)
    p = (b["roles"] == PROMPT).nonzero()[0, 0].item()
    q_len = int(b["segments"][p + 1] - b["segments"][p])

    def out(ids):
        return model(ids, b["positions"], SingleDeviceContext(1, 64, b["cu_seqlens"], 16, mask))[0]

    base = out(b["input_ids"])
    ids = b["input_ids"].clone()
    ids[0, q_len - 2] += 1  # a late prompt token: every prompt position sees it
    diff = (out(ids) - base).abs().amax(-1)
    assert (diff[: q_len - 2] > 0).all()
    ids = b["input_ids"].clone()
    ids[0, q_len + 2] += 1  # a completion token: nothing before it sees it
    diff = (out(ids) - base).abs().amax(-1)
    assert (diff[: q_len + 2] == 0).all() and diff[q_len + 2] > 0


def test_segments_to_slices():
    b = _batch([EX, {"prompt": "Copy: x\nA:", "completion": " x"}], "shared_question", n=96)
    groups = row_groups(b["segments"], b["roles"], 1, 96)
    assert groups[0][0] == (len(TOK.encode(EX["prompt"])) - 1, [1 + len(c) for c in render(EX, TOK)[1]])
    assert groups[0][-1][1] == []  # the padding: a text group
    for name in ("prefix_lm", "shared_question"):
        sm = segment_mask(name, b).build(1, 96, b["cu_seqlens"], 2)
        sm.check(1, 2)
        assert sm.name == f"data_{name}"


def test_chat_messages_use_the_fallback_template():
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt, completions = render(ex, TOK)
    assert TOK.decode(prompt) == FALLBACK_TEMPLATE.format(role="user", content="hi") + "<|assistant|>\n"
    assert completions == [TOK.encode("hello") + [TOK.eos_id]]


def test_chat_template_of_a_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trainer.data import build_tokenizer

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hi": 2, "hello": 3, "user": 4}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>")
    hf.chat_template = (
        "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    hf.save_pretrained(str(tmp_path))
    tok = build_tokenizer("hf", str(tmp_path))
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt, completions = render(ex, tok)
    assert tok.decode(prompt).split() == ["user", "hi", "[UNK]"]  # "assistant" is not in the vocabulary
    assert completions == [[3, tok.eos_id]]


def test_jsonl_examples_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(
            json.dumps(x)
            for x in [EX, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
        )
    )
    assert len(read_examples([str(good)], "train", 0.0) + read_examples([str(good)], "val", 0.0)) >= 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: each line must be \{\"prompt\""):
        read_examples([str(bad)], "train", 0.0)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match="must end with an assistant message"):
        read_examples([str(bad)], "train", 0.0)


def test_mask_without_prompts_raises():
    plain = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8])}
    with pytest.raises(ValueError, match=r"data.mask=prefix_lm needs prompt/completion data.*data.source=sft"):
        segment_mask("prefix_lm", plain)
    with pytest.raises(ValueError, match="data.mask='bidirectional' is unknown"):
        segment_mask("bidirectional", plain)
    with pytest.raises(ValueError, match="completion segment .* has no prompt"):
        SegmentMask("prefix_lm", (0, 4, 8), (2, 0)).build(1, 8)


def test_resume_is_exact():
    ex = generated_examples(40)
    a = SFTPacked(ex, TOK, 96, "shared_question", seed=3)
    for _ in range(5):
        a.next_row()
    b = SFTPacked(ex, TOK, 96, "shared_question", seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        ra, rb = a.next_row(), b.next_row()
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
    with pytest.raises(ValueError, match="data.seq_len"):
        SFTPacked(ex, TOK, 128, "shared_question", seed=3).load_state_dict(a.state_dict())
