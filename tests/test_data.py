"""The data pipeline: tokenizers, sources, packing invariants, exact resume, dp sharding,
synthetic probes, and clear errors for bad settings. CPU only, a few seconds."""

import io
import json
import random

import pytest
import torch

from trainer.data import (
    ByteTokenizer,
    DataLoaderShard,
    PackedDataset,
    StdlibSource,
    TextFilesSource,
    build_tokenizer,
    mqar_example,
    passkey_example,
)

TOK = ByteTokenizer()
DOCS = ["short", "", "a medium length document, with commas.", "x" * 50, "héllo wörld ✓", "line one\nline two\n", "z"]


@pytest.fixture
def corpus(tmp_path):
    """A tiny files corpus: DOCS[0:3] as .txt files, the rest as one .jsonl."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS[:3]):
        (d / "sub" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    with open(d / "more.jsonl", "w", encoding="utf-8") as f:
        for text in DOCS[3:]:
            f.write(json.dumps({"text": text}) + "\n\n")
    return str(d)


def _all_docs(paths):
    src = [TextFilesSource(paths, split=s, val_fraction=0.3) for s in ("train", "val")]
    return src, [s[i] for s in src for i in range(len(s))]


def _rows(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- tokenizers ----------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids) and TOK.decode(ids) == text
    assert (TOK.eos_id, TOK.vocab_size) == (256, 257)
    assert TOK.decode(ids + [TOK.eos_id]) == text
    assert TOK.decode([0xFF]) == "\ufffd"  # errors='replace'


def test_hf_tokenizer_from_local_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "hello", "world", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(tmp_path))
    tok = build_tokenizer("hf", str(tmp_path))
    assert (tok.eos_id, tok.vocab_size) == (1, 5)
    assert tok.encode("hello world .") == [2, 3, 4]
    assert tok.decode([2, 3]) == "hello world"


def test_bad_tokenizer_settings_raise():
    with pytest.raises(ValueError, match=r"data.tokenizer_path='/nonexistent/tok' does not exist"):
        build_tokenizer("hf", "/nonexistent/tok")
    with pytest.raises(ValueError, match="data.tokenizer_path=None"):
        build_tokenizer("hf", None)
    with pytest.raises(ValueError, match="data.tokenizer='bpe' is unknown"):
        build_tokenizer("bpe", None)
    assert isinstance(build_tokenizer("byte", None), ByteTokenizer)


# -- sources -------------------------------------------------------------------------------
def test_stdlib_source():
    train, val = StdlibSource(split="train"), StdlibSource(split="val")
    assert len(train) > 500 and len(val) > 0
    assert not set(train.paths) & set(val.paths)
    assert train.paths == sorted(train.paths) == StdlibSource(split="train").paths
    assert not any(
        part in ("test", "tests", "site-packages", "idlelib", "lib2to3")
        for p in train.paths + val.paths
        for part in p.split("/")
    )
    assert "import" in train[0] + train[1] + train[2]


def test_text_files_source(corpus):
    (train, val), docs = _all_docs([corpus])
    assert sorted(docs) == sorted(DOCS)  # every document, exactly once
    assert len(train) > 0 and len(val) > 0
    files = [corpus + "/more.jsonl", corpus + "/sub/doc0.txt"]
    sizes = [len(TextFilesSource(files, split=s, val_fraction=0.0)) for s in ("train", "val")]
    assert sizes == [4, 1]  # val always gets a document
    single = corpus + "/sub/doc2.txt"  # a one-document corpus serves both
    assert TextFilesSource([single])[0] == TextFilesSource([single], split="val")[0] == DOCS[2]


def test_bad_paths_raise(tmp_path):
    with pytest.raises(ValueError, match="data.paths has '/nonexistent/x.txt', which does not exist"):
        TextFilesSource(["/nonexistent/x.txt"])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="data.paths has .*a.csv.*only .txt and .jsonl"):
        TextFilesSource([str(tmp_path / "a.csv")])
    with pytest.raises(ValueError, match="data.paths=.*holds no .txt or .jsonl"):
        TextFilesSource([str(tmp_path)])
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match='"text" field'):
        TextFilesSource([str(tmp_path / "bad.jsonl")])[0]
    with pytest.raises(ValueError, match="no documents for this split.*data.val_fraction"):
        PackedDataset([], TOK, 8)


# -- packing -------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_invariants(corpus, seq_len):
    src = TextFilesSource([corpus], val_fraction=0.0)
    ds = PackedDataset(src, TOK, seq_len, seed=3)
    total = sum(len(TOK.encode(src[i])) + 1 for i in range(len(src)))
    rows = [next(ds) for _ in range(3 * total // seq_len + 2)]  # about three epochs
    for r, nxt in zip(rows, rows[1:]):
        x, y, pos, cu = r["input_ids"], r["labels"], r["positions"], r["cu_seqlens"]
        assert x.shape == y.shape == pos.shape == (seq_len,)
        assert x.dtype == y.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == seq_len and bool((cu[1:] > cu[:-1]).all())
        is_eos = x == TOK.eos_id
        starts = [0] + [t + 1 for t in range(seq_len - 1) if is_eos[t]]
        assert cu[:-1].tolist() == starts  # boundaries right after each eos
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert pos[a:b].tolist() == list(range(b - a))
        assert torch.equal(y == -100, is_eos)  # -100 exactly at document ends
        follow = torch.cat([x[1:], nxt["input_ids"][:1]])
        assert torch.equal(y[~is_eos], follow[~is_eos])  # otherwise the next token
    # the inputs, concatenated, are the documents in each epoch's seeded order, each + eos
    stream = torch.cat([r["input_ids"] for r in rows]).tolist()
    expect = []
    for epoch in range(4):
        perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(3 + epoch))
        for i in perm.tolist():
            expect += TOK.encode(src[i]) + [TOK.eos_id]
    assert stream == expect[: len(stream)]


def test_collated_batch_layout(corpus):
    ds = PackedDataset(TextFilesSource([corpus], val_fraction=0.0), TOK, 16, seed=0)
    b = next(DataLoaderShard(ds, 0, 1, micro_batch=3))
    assert b["input_ids"].shape == b["labels"].shape == b["positions"].shape == (3, 16)
    cu = b["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 48
    assert bool((cu[1:] > cu[:-1]).all()) and {0, 16, 32} <= set(cu.tolist())
    starts = set(cu[:-1].tolist())  # positions restart exactly there
    assert {i for i, p in enumerate(b["positions"].flatten().tolist()) if p == 0} == starts


@pytest.mark.parametrize("dp_rank,dp_size,micro_batch,k", [(0, 1, 2, 0), (0, 1, 2, 3), (0, 1, 1, 11), (1, 2, 2, 5)])
def test_resume_is_exact(corpus, dp_rank, dp_size, micro_batch, k):
    def loader():
        src = TextFilesSource([corpus], val_fraction=0.0)
        return DataLoaderShard(PackedDataset(src, TOK, 8, seed=5), dp_rank, dp_size, micro_batch)

    m = 25
    full = loader()
    expect = _rows(full, k + m)
    assert full.dataset.cursor[0] >= 2  # crossed epoch boundaries
    first = loader()
    _rows(first, k)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = loader()
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    _assert_same(_rows(second, m), expect[k:])
    assert second.state_dict() == full.state_dict()


def test_resume_with_other_data_raises(corpus):
    src = TextFilesSource([corpus], val_fraction=0.0)
    sd = PackedDataset(src, TOK, 8, seed=0).state_dict()
    with pytest.raises(ValueError, match="data.seq_len"):
        PackedDataset(src, TOK, 16, seed=0).load_state_dict(sd)


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_dp_sharding_deals_rows_round_robin(micro_batch):
    def loader(rank, size):
        return DataLoaderShard(PackedDataset(StdlibSource(), TOK, 32, seed=1), rank, size, micro_batch)

    n = 6
    one = torch.cat([b["input_ids"] for b in _rows(loader(0, 1), 2 * n)])
    ranks = [torch.cat([b["input_ids"] for b in _rows(loader(r, 2), n)]) for r in (0, 1)]
    assert torch.equal(ranks[0], one[0::2]) and torch.equal(ranks[1], one[1::2])
    seen = [tuple(r.tolist()) for r in torch.cat(ranks)]
    assert sorted(seen) == sorted(tuple(r.tolist()) for r in one)


# -- synthetic -----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_example(depth):
    ids, answer = passkey_example(TOK, 400, depth, random.Random(7))
    assert len(ids) == 400
    text, ans = TOK.decode(ids), TOK.decode(answer)
    key = ans.strip(" .")
    assert ans == f" {key}." and len(key) == 5 and key.isdigit()
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert needle in text and text.endswith("What is the pass key? The pass key is")
    budget = 400 - len(needle) - 2 - len(" What is the pass key? The pass key is")
    assert (text.index(needle) - 1) / budget == pytest.approx(depth, abs=0.01)
    with pytest.raises(ValueError, match="too short"):
        passkey_example(TOK, 50, depth, random.Random(7))


def test_mqar_labels():
    ids, labels = mqar_example(64, 100, 8, random.Random(0))
    assert len(ids) == len(labels) == 100
    kv = dict(zip(ids[0:16:2], ids[1:16:2]))
    assert len(kv) == 8
    answered = [t for t, lab in enumerate(labels) if lab != -100]
    assert len(answered) == 8
    for t in answered:
        assert ids[t] in kv and labels[t] == kv[ids[t]] == ids[t + 1]
    assert sorted(ids[t] for t in answered) == sorted(kv)
