"""Whole-document packing of text sources (trainer/data/planned.py): every document of at most a
row lands whole in one row, longer ones are cut into full rows as prepared data cuts them, rows
carry the stream packing's tensors, resume is exact, and retrieval documents keep their needle
with their question (the reason it exists). CPU only, a few seconds."""

import io
import json
import random

import pytest
import torch

from trainer.data import ByteTokenizer, DataLoaderShard, PackedDataset, TextFilesSource
from trainer.data.mix import MixedSource
from trainer.data.planned import PlannedDataset
from trainer.data.synthetic import QUESTION

TOK = ByteTokenizer()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):  # 1-30 characters (whole in rows of 32), a few of 40-90 (cut)
            n = rng.randint(40, 90) if i % 9 == 0 else rng.randint(1, 30)
            f.write(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(n))}) + "\n")
    return str(d)


def _segments(row):
    cu = row["cu_seqlens"].tolist()
    return [(a, b) for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("packing", ["best_fit", "grouped"])
def test_documents_whole_and_rows_well_formed(corpus, packing):
    n = 32
    src = TextFilesSource([corpus], val_fraction=0.0)
    docs = [TOK.encode(src[i]) + [TOK.eos_id] for i in range(len(src))]
    ds = PlannedDataset(src, TOK, n, seed=3, packing=packing, group_rows=2)
    whole, pieces = [], []
    for _ in range(200):  # the pool holds 256 documents (several epochs of this corpus)
        row = next(ds)
        x, y, pos = row["input_ids"], row["labels"], row["positions"]
        assert x.shape == y.shape == pos.shape == (n,) and row["cu_seqlens"][-1] == n
        for a, b in _segments(row):
            assert pos[a:b].tolist() == list(range(b - a))
            seg, lab = x[a:b].tolist(), y[a:b].tolist()
            if all(t == -100 for t in lab) and all(t == TOK.eos_id for t in seg):
                continue  # padding after the row's documents
            if seg[-1] == TOK.eos_id and seg in docs:
                whole.append(seg)
                assert lab == seg[1:] + [-100]  # next token inside the document, -100 at its eos
            else:
                pieces.append(seg)
    short = [d for d in docs if len(d) <= n]
    assert whole and all(len(s) <= n for s in whole)
    assert len({tuple(s) for s in whole}) > len(short) // 2  # (the pool keeps the shortest waiting longest)
    for seg in pieces:  # only documents longer than a row are cut
        assert any(len(d) > n and any(d[k : k + len(seg)] == seg for k in range(len(d))) for d in docs)


@pytest.mark.parametrize("packing", ["best_fit", "grouped"])
@pytest.mark.parametrize("dp_rank,dp_size,k", [(0, 1, 7), (1, 2, 5)])
def test_resume_is_exact(corpus, packing, dp_rank, dp_size, k):
    def loader():
        src = TextFilesSource([corpus], val_fraction=0.0)
        return DataLoaderShard(PlannedDataset(src, TOK, 16, 5, packing, dp_size * 2), dp_rank, dp_size, 2)

    full = loader()
    expect = [next(full) for _ in range(k + 20)]
    first = loader()
    for _ in range(k):
        next(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = loader()
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for a, b in zip([next(second) for _ in range(20)], expect[k:]):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_across_packings_raises(corpus):
    src = TextFilesSource([corpus], val_fraction=0.0)
    stream, planned = PackedDataset(src, TOK, 16, 0), PlannedDataset(src, TOK, 16, 0, "best_fit")
    with pytest.raises(ValueError, match="resume with data.packing=best_fit"):
        stream.load_state_dict(planned.state_dict())
    with pytest.raises(ValueError, match="data.packing"):
        planned.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="data.seq_len"):
        PlannedDataset(src, TOK, 32, 0, "best_fit").load_state_dict(planned.state_dict())


def _passkeys(rows):
    """(passkey documents in the rows, those whose needle and question share a segment)."""
    seen = together = 0
    for row in rows:
        x = row["input_ids"].tolist()
        for a, b in _segments(row):
            text = bytes(t for t in x[a:b] if t < 256).decode("utf-8", "replace")
            if QUESTION.strip() in text:
                seen += 1
                together += "Remember it." in text
    return seen, together


def test_retrieval_documents_keep_needle_and_question():
    """The retrieval recipe's documents at its row length: streamed, about half are cut between
    the needle and the question; packed best_fit, none."""

    class Files:  # a small natural corpus: one long and a few short documents
        docs = ["The quick brown fox. " * 40] + [f"document {i} " * 5 for i in range(20)]

        def __len__(self):
            return len(self.docs)

        def __getitem__(self, i):
            return self.docs[i]

    mix = MixedSource(Files(), 600, None, 5.0, [150, 200, 250], 0)
    kept = {}
    for name, ds in {"stream": PackedDataset(mix, TOK, 256, 0), "best_fit": PlannedDataset(mix, TOK, 256, 0)}.items():
        seen, together = _passkeys([next(ds) for _ in range(80)])
        kept[name] = together / max(seen, 1)
        assert seen > 30, name
    assert kept["best_fit"] == 1.0 and kept["stream"] < 0.8, kept
