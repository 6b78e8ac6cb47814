"""trainer.prepare: every token and boundary read back as tokenized directly, from .txt, .jsonl,
.parquet and datasets directories; byte-identical after a kill and resume; one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from trainer.data.shards import PreparedCorpus, PreparedDataError, token_dtype, tokenizer_info
from trainer.data.tokenizer import ByteTokenizer, build_tokenizer
from trainer.prepare import PrepareError, prepare

TOK = ByteTokenizer()
DOCS = ["short", "", "a medium length document, with commas.", "x" * 50, "héllo wörld ✓", "line one\nline two\n", "z"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(d, docs=DOCS, table=True):
    """docs[0:3] as .txt files, the rest in a .jsonl (blank lines between); with ``table`` also a
    parquet file and a datasets directory of the same texts. Returns the documents in the order
    prepare reads them (inputs sorted by name)."""
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(docs[:3]):
        (d / "sub" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for text in docs[3:]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")
    order = docs[3:] + docs[:3]  # b.jsonl, sub/doc*.txt
    if table:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs[::-1]}), d / "a.parquet", row_group_size=2)
        datasets.Dataset.from_dict({"text": docs[1:]}).save_to_disk(str(d / "c_hf"))
        order = docs[::-1] + order[: len(docs) - 3] + docs[1:] + docs[:3]  # a.parquet, b.jsonl, c_hf, sub/
    return order


def read_back(out):
    corpus = PreparedCorpus([str(out)], tokenizer_info(TOK))
    return [corpus.tokens(g).tolist() for g in range(corpus.n_docs)], corpus


@pytest.mark.parametrize("workers,shard_bytes", [(0, 1), (2, 40), (0, 1 << 20)])
def test_read_back_equals_tokenizing_directly(tmp_path, workers, shard_bytes):
    order = make_corpus(tmp_path / "c")
    m = prepare([str(tmp_path / "c")], str(tmp_path / "o"), workers=workers, shard_bytes=shard_bytes, progress=False)
    docs, corpus = read_back(tmp_path / "o")
    assert docs == [TOK.encode(t) for t in order]  # every token, every boundary
    assert [corpus.doc_len(g) for g in range(corpus.n_docs)] == [len(TOK.encode(t)) for t in order]
    assert m["docs"] == len(order) and m["tokens"] == sum(len(TOK.encode(t)) for t in order)
    assert m["dtype"] == "uint16" and corpus.tag(0) == "a.parquet" and corpus.tag(corpus.n_docs - 1) == "sub/doc2.txt"
    assert not os.path.exists(tmp_path / "o" / "plan.json")
    assert prepare([str(tmp_path / "c")], str(tmp_path / "o"), progress=False) == m  # finished: nothing to do


def test_hf_tokenizer_and_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "hello", "world", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        str(tmp_path / "t")
    )
    tok = build_tokenizer("hf", str(tmp_path / "t"))
    texts = ["hello world .", "world hello", "nope ."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o"), "hf", str(tmp_path / "t"), workers=0, progress=False)
    corpus = PreparedCorpus([str(tmp_path / "o")], tokenizer_info(tok))
    assert [corpus.tokens(g).tolist() for g in range(3)] == [tok.encode(t) for t in texts]
    assert corpus.eos_id == 1
    assert (token_dtype(257), token_dtype(65536), token_dtype(65537)) == ("uint16", "uint16", "uint32")
    with pytest.raises(PreparedDataError, match="was prepared with the hf tokenizer .* this run uses the byte"):
        PreparedCorpus([str(tmp_path / "o")], tokenizer_info(TOK))


def _files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def test_kill_then_resume_gives_identical_shards(tmp_path):
    make_corpus(tmp_path / "c")
    clean = tmp_path / "clean"
    prepare([str(tmp_path / "c")], str(clean), workers=0, shard_bytes=30, progress=False)
    n_shards = len(json.load(open(clean / "manifest.json"))["shards"])
    assert n_shards >= 5
    out = tmp_path / "o"
    assert prepare([str(tmp_path / "c")], str(out), workers=0, shard_bytes=30, max_shards=2, progress=False) == {}
    assert not os.path.exists(out / "manifest.json")
    # what a kill leaves: shard 2 written but not its .json, shard 3 half a .tmp
    (out / "shard_00002.bin").write_bytes(b"\x01\x00" * 3)
    (out / "shard_00003.bin.tmp").write_bytes(b"\x07")
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("shard_00000.bin", "shard_00001.bin")}
    prepare([str(tmp_path / "c")], str(out), workers=2, shard_bytes=30, progress=False)
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # finished shards are not rewritten
    files = _files(out)
    files.pop("shard_00003.bin.tmp", None)  # a stale temporary (rewritten over when its shard is)
    assert files == _files(clean)


def test_bad_inputs_have_one_line_errors(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(PrepareError, match="input '/nonexistent/x' does not exist"):
        prepare(["/nonexistent/x"], out)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(PrepareError, match="is not a .txt, .jsonl or .parquet file"):
        prepare([str(tmp_path / "a.csv")], out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("\n\n")
    with pytest.raises(PrepareError, match="is empty"):
        prepare([str(tmp_path / "empty")], out, workers=0, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(
        PrepareError, match="bad.jsonl at byte 15: each line must be a JSON object with a string 'text'"
    ):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "o2"), workers=0, progress=False)
    make_corpus(tmp_path / "c")
    with pytest.raises(PrepareError, match="has no column 'body'"):
        prepare([str(tmp_path / "c" / "a.parquet")], str(tmp_path / "o3"), text_field="body")
    locked = tmp_path / "locked.txt"
    locked.write_text("x")
    os.chmod(locked, 0)
    if not os.access(locked, os.R_OK):  # root reads everything
        with pytest.raises(PrepareError, match="cannot read .*locked.txt"):
            prepare([str(locked)], str(tmp_path / "o4"))
    # a run into a directory prepared with another tokenizer
    prepare([str(tmp_path / "c" / "b.jsonl")], str(tmp_path / "o5"), workers=0, progress=False)
    m = json.load(open(tmp_path / "o5" / "manifest.json"))
    m["tokenizer"]["fingerprint"] = "0" * 16
    json.dump(m, open(tmp_path / "o5" / "manifest.json", "w"))
    with pytest.raises(PrepareError, match="was prepared with the byte tokenizer .* this run uses"):
        prepare([str(tmp_path / "c" / "b.jsonl")], str(tmp_path / "o5"), workers=0, progress=False)
    with pytest.raises(PreparedDataError, match="holds no manifest.json: run `python -m trainer.prepare"):
        PreparedCorpus([str(tmp_path / "empty")])


def test_cli_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "/nonexistent/x", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "longctx-prepare: error: input '/nonexistent/x' does not exist" in bad.stderr
    make_corpus(tmp_path / "c", table=False)
    ok = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--workers", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0 and "7 documents" in ok.stdout, ok.stderr
    ver = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "--verify", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ver.returncode == 0 and ": ok" in ver.stdout
