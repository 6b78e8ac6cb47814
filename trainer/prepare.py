"""Tokenize a corpus once into memory-mapped shards (format: trainer/data/shards.py).

    python -m trainer.prepare INPUT [INPUT ...] --out DIR [--tokenizer byte|hf --tokenizer-path TOK]
                              [--text-field text] [--workers N] [--shard-mb 256]
    longctx-prepare ...                  # the same, installed
    python -m trainer.prepare --verify DIR   # re-checksum every shard of a finished directory

Inputs (files, or directories searched recursively, in sorted order):
  .txt        one document per file
  .jsonl      one document per non-blank line: the string field ``--text-field`` of its object
  .parquet    one document per row: the string column ``--text-field`` (read by row groups)
  a Hugging Face ``datasets`` directory (``Dataset.save_to_disk``; a DatasetDict: every split,
              in sorted order): one document per row, memory-mapped by ``datasets``
  stdlib      the Python standard library's source files (the default training corpus)

The inputs are cut into chunks of about ``--shard-mb`` input bytes (the same cut on every run),
each chunk becomes one shard, tokenized by a pool of worker processes and written under temporary
names, its ``.json`` last. A killed run resumes: finished shards are kept, unfinished ones are
written again, so the result is byte-identical to an uninterrupted run. ``manifest.json`` comes
when every shard is done; training reads only finished directories.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from models.files import crc32_file, write_atomic
from trainer.data.shards import (
    FORMAT,
    MANIFEST,
    PreparedDataError,
    describe_tokenizer,
    read_manifest,
    shard_name,
    token_dtype,
    tokenizer_info,
)

PLAN = "plan.json"
KINDS = (".txt", ".jsonl", ".parquet")
_BATCH_DOCS = 256  # documents tokenized per call (HF fast tokenizers batch them)
_BATCH_BYTES = 8 << 20


class PrepareError(ValueError):
    """Bad input for prepare: one line naming the input (or option) and the fix."""


@dataclass
class Chunk:
    """One future shard: ``parts`` are (input index, kind-specific range) read in order."""

    parts: list = field(default_factory=list)
    bytes: int = 0


# --------------------------------------------------------------------------- inputs


def _is_hf_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def find_inputs(given: list[str], text_field: str) -> list[dict]:
    """Every input document container, in order: {name, kind, path, [split], bytes}."""
    from trainer.data.sources import StdlibSource

    out = []
    for g in given:
        if g == "stdlib":
            src = [StdlibSource(split=s, val_fraction=0.02) for s in ("train", "val")]
            for rel in sorted(src[0].paths + src[1].paths):
                path = os.path.join(src[0].root, rel)
                out.append({"name": f"stdlib/{rel}", "kind": "txt", "path": path})
            continue
        if not os.path.exists(g):
            raise PrepareError(f"input {g!r} does not exist: fix the path")
        if os.path.isdir(g) and _is_hf_dir(g):
            out += _hf_inputs(g, os.path.basename(os.path.normpath(g)), text_field)
            continue
        if os.path.isfile(g):
            if not g.endswith(KINDS):
                raise PrepareError(f"input {g!r} is not a .txt, .jsonl or .parquet file nor a datasets directory")
            out.append({"name": os.path.basename(g), "kind": os.path.splitext(g)[1][1:], "path": g})
            continue
        found = []
        for d, dirs, files in os.walk(g):
            if _is_hf_dir(d):
                found += _hf_inputs(d, os.path.relpath(d, g).replace(os.sep, "/"), text_field)
                dirs[:] = []
                continue
            dirs.sort()
            for name in files:
                if name.endswith(KINDS):
                    path = os.path.join(d, name)
                    rel = os.path.relpath(path, g).replace(os.sep, "/")
                    found.append({"name": rel, "kind": os.path.splitext(name)[1][1:], "path": path})
        if not found:
            raise PrepareError(f"input {g!r} holds no .txt, .jsonl, .parquet files or datasets directories")
        out += sorted(found, key=lambda x: x["name"])
    for x in out:
        if x["kind"] in ("txt", "jsonl", "parquet"):
            try:
                with open(x["path"], "rb"):
                    x["bytes"] = os.path.getsize(x["path"])
            except OSError as e:
                raise PrepareError(f"cannot read {x['path']}: {e.strerror or e}: fix its permissions") from None
    return out


def _hf_inputs(path: str, name: str, text_field: str) -> list[dict]:
    """The splits of a saved ``datasets`` directory (a Dataset: one)."""
    ds = _load_hf(path)
    splits = sorted(ds) if hasattr(ds, "keys") else [None]
    out = []
    for split in splits:
        part = ds[split] if split is not None else ds
        if text_field not in part.column_names:
            raise PrepareError(
                f"{path}{'[' + split + ']' if split else ''} has no column {text_field!r} "
                f"(it has {', '.join(part.column_names)}): pass --text-field"
            )
        label = f"{name}[{split}]" if split else name
        out.append(
            {"name": label, "kind": "hf", "path": path, "split": split, "rows": len(part), "bytes": _nbytes(part)}
        )
    return out


def _load_hf(path: str):
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"{path} is a Hugging Face datasets directory: pip install 'longctx[data]'") from None
    try:
        return datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 -- the library raises many kinds; one line for all
        raise PrepareError(f"cannot read the datasets directory {path}: {str(e).splitlines()[0]}") from None


def _nbytes(ds) -> int:
    return int(ds.data.nbytes) if len(ds) else 0


def _parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None


def plan_chunks(inputs: list[dict], shard_bytes: int, text_field: str) -> list[Chunk]:
    """Cut the inputs into chunks of about ``shard_bytes`` (deterministic: resume re-plans alike)."""
    chunks, cur = [], Chunk()

    def add(part, nbytes):
        nonlocal cur
        cur.parts.append(part)
        cur.bytes += nbytes
        if cur.bytes >= shard_bytes:
            chunks.append(cur)
            cur = Chunk()

    for k, x in enumerate(inputs):
        if x["kind"] == "txt":
            add((k, 0, 0), x["bytes"])
        elif x["kind"] == "jsonl":
            with open(x["path"], "rb") as f:
                start = 0
                while start < x["bytes"]:
                    f.seek(min(start + max(shard_bytes - cur.bytes, 1), x["bytes"]))
                    f.readline()  # to the next line start
                    end = min(f.tell(), x["bytes"]) if f.tell() > start else x["bytes"]
                    add((k, start, end), end - start)
                    start = end
        elif x["kind"] == "parquet":
            pf = _parquet(x["path"])
            if text_field not in pf.schema_arrow.names:
                raise PrepareError(
                    f"{x['path']} has no column {text_field!r} (it has {', '.join(pf.schema_arrow.names)}): "
                    "pass --text-field"
                )
            for rg in range(pf.num_row_groups):
                add((k, rg, rg + 1), pf.metadata.row_group(rg).total_byte_size)
        else:  # hf: row ranges of about shard_bytes
            per_row = max(x["bytes"] / max(x["rows"], 1), 1.0)
            start = 0
            while start < x["rows"]:
                n = max(int((shard_bytes - cur.bytes) / per_row), 1)
                end = min(start + n, x["rows"])
                add((k, start, end), int((end - start) * per_row))
                start = end
    if cur.parts:
        chunks.append(cur)
    return chunks


def _texts(inputs: list[dict], part, text_field: str):
    """The documents of one part of a chunk, in order: yields (text, bytes read)."""
    k, a, b = part
    x = inputs[k]
    if x["kind"] == "txt":
        try:
            with open(x["path"], "rb") as f:
                data = f.read()
        except OSError as e:
            raise PrepareError(f"cannot read {x['path']}: {e.strerror or e}") from None
        yield data.decode("utf-8", errors="replace"), len(data)
    elif x["kind"] == "jsonl":
        with open(x["path"], "rb") as f:
            f.seek(a)
            pos = a
            while pos < b:
                line = f.readline()
                if not line:
                    break
                at, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise PrepareError(
                        f"{x['path']} at byte {at}: each line must be a JSON object with a string {text_field!r} "
                        "field: fix the line or pass --text-field"
                    )
                yield text, len(line)
    elif x["kind"] == "parquet":
        table = _parquet(x["path"]).read_row_groups(list(range(a, b)), columns=[text_field])
        for text in table.column(0).to_pylist():
            yield _string(text, x["path"], text_field), len(text or "")
    else:
        ds = _load_hf(x["path"])
        ds = ds[x["split"]] if x["split"] is not None else ds
        for lo in range(a, b, 1000):
            for text in ds[lo : min(lo + 1000, b)][text_field]:
                yield _string(text, x["path"], text_field), len(text or "")


def _string(text, path, text_field):
    if not isinstance(text, str):
        raise PrepareError(f"{path}: column {text_field!r} holds a {type(text).__name__}, not text: pass --text-field")
    return text


# --------------------------------------------------------------------------- workers

_W: dict = {}  # per worker process: tokenizer, settings, progress counters


def _init_worker(tokenizer: str, tokenizer_path, inputs, text_field, dtype, counters):
    from trainer.data.tokenizer import ByteTokenizer, build_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel across processes instead
    tok = build_tokenizer(tokenizer, tokenizer_path)
    _W.update(
        tok=tok, byte=isinstance(tok, ByteTokenizer), inputs=inputs, field=text_field, dtype=dtype, counters=counters
    )


def _encode(texts: list[str]) -> list[np.ndarray]:
    dtype = _W["dtype"]
    if _W["byte"]:  # the byte tokenizer's encode, vectorised: ids are the UTF-8 bytes
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]
    ids = _W["tok"].tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [np.asarray(x, dtype=dtype) for x in ids]


def write_shard(out: str, index: int, chunk: Chunk) -> dict:
    """Tokenize one chunk into shard ``index`` (temporary names, renamed when complete, its .json
    last). Returns the shard's entry for the manifest."""
    base = os.path.join(out, shard_name(index))
    offsets, tags, crc, tokens, counted = [0], [], 0, 0, 0
    batch, batch_tags, batch_bytes = [], [], 0
    counters = _W.get("counters")

    with open(base + ".bin.tmp", "wb") as f:

        def flush(final=False):
            nonlocal crc, tokens, batch, batch_tags, batch_bytes, counted
            for ids in _encode(batch):
                data = ids.tobytes()
                f.write(data)
                crc = zlib.crc32(data, crc)
                tokens += len(ids)
                offsets.append(tokens)
            tags.extend(batch_tags)
            if counters is not None:  # progress: estimated bytes until the shard is done, then its own
                last = chunk.bytes - counted if final else min(batch_bytes, chunk.bytes - counted)
                with counters[0].get_lock():
                    counters[0].value += last
                    counters[1].value += tokens - offsets[-1 - len(batch)]
                counted += last
            batch, batch_tags, batch_bytes = [], [], 0

        for part in chunk.parts:
            for text, nbytes in _texts(_W["inputs"], part, _W["field"]):
                batch.append(text)
                batch_tags.append(part[0])
                batch_bytes += nbytes
                if len(batch) >= _BATCH_DOCS or batch_bytes >= _BATCH_BYTES:
                    flush()
        flush(final=True)
        f.flush()
        os.fsync(f.fileno())
    entry = {"name": shard_name(index), "docs": len(tags), "tokens": tokens, "input_bytes": chunk.bytes}
    entry["crc32"] = {"bin": f"{crc:08x}"}
    for ext, arr in ((".idx.npy", np.asarray(offsets, np.int64)), (".src.npy", np.asarray(tags, np.uint32))):
        with open(base + ext + ".tmp", "wb") as f:
            np.save(f, arr)
        entry["crc32"][ext[1:4]] = crc32_file(base + ext + ".tmp")
    for ext in (".bin", ".idx.npy", ".src.npy"):
        os.replace(base + ext + ".tmp", base + ext)
    _write_json(base + ".json", entry)
    return entry


def _write_json(path: str, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    write_atomic(path, write)  # fsynced, renamed over path: a reader sees the old file or the new one


def _work(args):
    out, index, chunk = args
    return write_shard(out, index, chunk)


def _finished(out: str, index: int, dtype: str) -> dict | None:
    """The entry of shard ``index`` if its .json exists and its files have the sizes it records
    (a shard without its .json was cut short by a kill: it is written again)."""
    base = os.path.join(out, shard_name(index))
    try:
        with open(base + ".json") as f:
            entry = json.load(f)
        size = os.path.getsize(base + ".bin")
        idx = np.load(base + ".idx.npy", mmap_mode="r")
        src = np.load(base + ".src.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    ok = entry.get("name") == shard_name(index) and size == entry["tokens"] * np.dtype(dtype).itemsize
    return entry if ok and idx.shape == (entry["docs"] + 1,) and src.shape == (entry["docs"],) else None


# --------------------------------------------------------------------------- driver


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str = "byte",
    tokenizer_path: str | None = None,
    text_field: str = "text",
    workers: int | None = None,
    shard_bytes: int = 256 << 20,
    progress: bool | None = None,
    max_shards: int | None = None,
    stats: dict | None = None,
) -> dict:
    """Prepare ``inputs`` into ``out`` (resuming a run there); returns the manifest.
    ``workers``: tokenizer processes (None: one per CPU; 0: in this process).
    ``max_shards``: stop after writing this many shards (the run is unfinished: no manifest).
    ``stats``: filled with this run's work: {"tokens", "shards", "seconds"} (a resumed run skips some)."""
    from trainer.data.tokenizer import build_tokenizer

    if not inputs:
        raise PrepareError("no inputs: give .txt/.jsonl/.parquet files, directories or datasets directories")
    if shard_bytes < 1:
        raise PrepareError(f"--shard-mb must be > 0 (got {shard_bytes} bytes)")
    tok_info = tokenizer_info(build_tokenizer(tokenizer, tokenizer_path))
    dtype = token_dtype(tok_info["vocab_size"])
    found = find_inputs(list(inputs), text_field)
    chunks = plan_chunks(found, shard_bytes, text_field)
    if not chunks:
        raise PrepareError(f"the corpus {list(inputs)} is empty: no documents to prepare")
    plan = {
        "format": FORMAT,
        "tokenizer": tok_info,
        "dtype": dtype,
        "text_field": text_field,
        "inputs": [{k: x[k] for k in ("name", "kind", "bytes")} for x in found],
        "chunks": [asdict(c) for c in chunks],
    }
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as read back
    os.makedirs(out, exist_ok=True)
    _check_previous(out, plan)
    if os.path.exists(os.path.join(out, MANIFEST)):
        return read_manifest(out, "--out")
    _write_json(os.path.join(out, PLAN), plan)

    entries = {i: e for i in range(len(chunks)) if (e := _finished(out, i, dtype)) is not None}
    todo = [i for i in range(len(chunks)) if i not in entries]
    if max_shards is not None:
        todo = todo[:max_shards]
    total = sum(c.bytes for c in chunks)
    done_bytes = sum(chunks[i].bytes for i in entries)
    counters = (mp.Value("q", 0), mp.Value("q", 0))
    init = (tokenizer, tokenizer_path, found, text_field, dtype, counters)
    bar = _Progress(total, done_bytes, len(entries), len(chunks), progress)
    jobs = [(out, i, chunks[i]) for i in todo]
    try:
        if workers == 0 or len(jobs) <= 1:
            _init_worker(*init)
            results = map(_work, jobs)
            for entry in results:
                entries[_index(entry)] = entry
                bar.update(counters, shard_done=True)
        else:
            n = min(workers or os.cpu_count() or 1, len(jobs))
            with mp.get_context("fork").Pool(n, _init_worker, init) as pool:
                pending = pool.imap_unordered(_work, jobs)
                while True:
                    try:
                        entry = pending.next(timeout=0.5)
                    except mp.TimeoutError:
                        bar.update(counters)
                        continue
                    except StopIteration:
                        break
                    entries[_index(entry)] = entry
                    bar.update(counters, shard_done=True)
    finally:
        bar.close()
        if stats is not None:
            stats.update(tokens=counters[1].value, shards=len(jobs), seconds=time.perf_counter() - bar.t0)
    if len(entries) < len(chunks):
        return {}
    shards = [entries[i] for i in range(len(chunks))]
    docs, tokens = sum(s["docs"] for s in shards), sum(s["tokens"] for s in shards)
    if tokens == 0:
        raise PrepareError(f"the corpus {list(inputs)} is empty: its files hold no text")
    manifest = {**{k: plan[k] for k in ("format", "tokenizer", "dtype", "text_field", "inputs")}}
    manifest.update(shards=shards, docs=docs, tokens=tokens, input_bytes=total)
    _write_json(os.path.join(out, MANIFEST), manifest)
    os.remove(os.path.join(out, PLAN))
    return manifest


def _index(entry: dict) -> int:
    return int(entry["name"].rsplit("_", 1)[1])


def _check_previous(out: str, plan: dict) -> None:
    """An earlier (finished or unfinished) run in ``out`` must be of the same inputs and tokenizer."""
    for name in (MANIFEST, PLAN):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise PrepareError(f"{path} is unreadable: delete {out} and prepare again") from None
        if old.get("tokenizer", {}).get("fingerprint") != plan["tokenizer"]["fingerprint"]:
            raise PrepareError(
                f"{out} was prepared with the {describe_tokenizer(old.get('tokenizer', {}))}, this run uses the "
                f"{describe_tokenizer(plan['tokenizer'])}: pass the same --tokenizer/--tokenizer-path, or a new --out"
            )
        same = {k: old.get(k) for k in ("dtype", "text_field", "inputs")} == {
            k: plan[k] for k in ("dtype", "text_field", "inputs")
        }
        if not same or (name == PLAN and old.get("chunks") != plan["chunks"]):
            raise PrepareError(
                f"{out} holds a prepare of other inputs (or --text-field / --shard-mb): "
                "give a new --out, or delete it to start over"
            )


class _Progress:
    """A tqdm bar (bytes, tokens/s, ETA) on a terminal; otherwise a plain line every 10 s."""

    def __init__(self, total: int, done: int, shards_done: int, shards: int, force: bool | None):
        self.total, self.base, self.shards_done, self.shards = total, done, shards_done, shards
        self.t0 = self.last = time.perf_counter()
        self.tokens = 0
        tty = sys.stderr.isatty() if force is None else force
        self.bar = None
        if tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)
        self.quiet = force is False

    def update(self, counters, shard_done: bool = False) -> None:
        self.shards_done += shard_done
        done, self.tokens = self.base + counters[0].value, counters[1].value
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        byte_rate = (done - self.base) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / byte_rate if byte_rate > 0 else float("nan")
        if self.bar is not None:
            self.bar.n = min(done, self.total)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s shards {self.shards_done}/{self.shards}")
        elif not self.quiet and (now - self.last >= 10 or self.shards_done == self.shards and shard_done):
            self.last = now
            print(
                f"[prepare] {done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({100 * done / max(self.total, 1):.0f}%) "
                f"shards {self.shards_done}/{self.shards} {rate / 1e6:.2f}M tokens/s eta {_hms(eta)}",
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    if s != s:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def verify(path: str) -> dict:
    """Re-checksum every file of a finished prepared directory; PreparedDataError naming the first bad one."""
    m = read_manifest(path, "--verify")
    for s in m["shards"]:
        base = os.path.join(path, s["name"])
        for key, ext in (("bin", ".bin"), ("idx", ".idx.npy"), ("src", ".src.npy")):
            if not os.path.exists(base + ext) or crc32_file(base + ext) != s["crc32"][key]:
                raise PreparedDataError(f"{base}{ext} is missing or fails its checksum: prepare the corpus again")
    return m


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="longctx-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help=".txt/.jsonl/.parquet files, directories, datasets dirs, or stdlib")
    p.add_argument("--out", help="the prepared directory to write (an unfinished one resumes)")
    p.add_argument("--tokenizer", default="byte", help="byte | hf (as data.tokenizer)")
    p.add_argument("--tokenizer-path", default=None, help="a local Hugging Face tokenizer dir (data.tokenizer_path)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl objects / column of tables")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="input megabytes per shard")
    p.add_argument("--verify", metavar="DIR", help="re-checksum a finished prepared directory and exit")
    a = p.parse_args(argv)
    try:
        if a.verify:
            m = verify(a.verify)
            print(f"[prepare] {a.verify}: {len(m['shards'])} shards, {m['docs']} documents, {m['tokens']} tokens: ok")
            return
        if not a.out:
            raise PrepareError("--out is required: the directory to write the shards to")
        run: dict = {}
        m = prepare(
            a.inputs, a.out, a.tokenizer, a.tokenizer_path, a.text_field, a.workers, int(a.shard_mb * 2**20), stats=run
        )
        done = (
            f"this run tokenized {run['tokens']} tokens ({run['shards']} shards) in {run['seconds']:.1f}s: "
            f"{run['tokens'] / max(run['seconds'], 1e-9) / 1e6:.2f}M tokens/s"
            if run
            else "already prepared"
        )
        print(
            f"[prepare] {a.out}: {m['docs']} documents, {m['tokens']} tokens ({m['dtype']}) in {len(m['shards'])} "
            f"shards from {m['input_bytes'] / 1e6:.1f} MB; {done}"
        )
    except ValueError as e:  # PrepareError, PreparedDataError, tokenizer settings: one line
        print(f"longctx-prepare: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
