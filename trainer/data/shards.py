"""Prepared corpora on disk: token shards written once by ``trainer.prepare``, read memory-mapped.

A prepared directory holds, per shard ``shard_NNNNN``:
    shard_NNNNN.bin      token ids of the shard's documents back to back, no eos between them
                         (uint16 when the vocabulary fits, else uint32; ``manifest.json`` "dtype")
    shard_NNNNN.idx.npy  int64 [docs + 1] document boundaries: document d is bin[idx[d]:idx[d+1]]
    shard_NNNNN.src.npy  uint32 [docs] source tag of each document: an index into "inputs"
    shard_NNNNN.json     written last (the shard is finished): counts and CRC-32 of the three files
and once every shard is finished ``manifest.json``: the tokenizer (name, kind, fingerprint,
vocab_size, eos_id), dtype, the inputs, every shard's counts and checksums, the totals.

Readers append the tokenizer's eos to every document (the eos belongs to the document it ends),
so a document of L tokens takes L + 1 positions in a row. Nothing is loaded: token ids and
boundaries are read through numpy memmaps of the files, a few shards open at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "longctx-prepared-1"
_OPEN_SHARDS = 64  # memmaps kept open per corpus (each holds a file descriptor)
_DROP_EVERY = 256  # document reads between dropping this process's mapped pages (see _drop_pages)


class PreparedDataError(ValueError):
    """A prepared directory is missing, unfinished, damaged or made with another tokenizer."""


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_info(tok) -> dict:
    """What identifies a tokenizer: {kind, name, fingerprint (16 hex digits of a SHA-256 over its
    full definition), vocab_size, eos_id}. Two tokenizers with one fingerprint encode alike."""
    from trainer.data.tokenizer import ByteTokenizer

    if isinstance(tok, ByteTokenizer):
        kind, name, definition = "byte", "byte", "utf-8 bytes"
    else:
        hf = tok.tok
        kind, name = "hf", os.path.basename(os.path.normpath(str(hf.name_or_path))) or "hf"
        backend = getattr(hf, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
    text = f"{definition}\neos={tok.eos_id}\nvocab={tok.vocab_size}"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return {"kind": kind, "name": name, "fingerprint": digest, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}


def describe_tokenizer(info: dict) -> str:
    return f"{info['kind']} tokenizer {info['name']!r} (fingerprint {info['fingerprint']})"


def read_manifest(path: str, setting: str = "data.paths") -> dict:
    """The manifest of a finished prepared directory; PreparedDataError (one line) otherwise."""
    if not os.path.isdir(path):
        raise PreparedDataError(f"{setting} has {path!r}, which is not a directory: give a prepared directory")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PreparedDataError(
            f"{setting} has {path!r}, which holds no {MANIFEST}: run `python -m trainer.prepare INPUTS --out {path}` "
            "(again, if it was interrupted: it resumes)"
        ) from None
    except (OSError, ValueError) as e:
        raise PreparedDataError(f"{path}/{MANIFEST} is unreadable ({e}): prepare the corpus again") from None
    if manifest.get("format") != FORMAT:
        raise PreparedDataError(f"{path}/{MANIFEST} is not a {FORMAT} manifest: prepare the corpus again")
    return manifest


class PreparedCorpus:
    """The documents of one or more prepared directories, in order (global document index g).

    ``doc_len(g)`` tokens (without the eos), ``tokens(g, a, b)`` the ids [a, b) of document g as
    int64, ``tag(g)`` its input's name. ``tokenizer``: the run's tokenizer info (tokenizer_info);
    a directory prepared with another one is refused."""

    def __init__(self, paths: list[str], tokenizer: dict | None = None, setting: str = "data.paths"):
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise PreparedDataError(f"{setting} is empty: give prepared directories (python -m trainer.prepare)")
        self.paths, self.shards, self.inputs = list(paths), [], []
        counts = []
        for path in self.paths:
            m = read_manifest(path, setting)
            if tokenizer is not None and m["tokenizer"]["fingerprint"] != tokenizer["fingerprint"]:
                raise PreparedDataError(
                    f"{path} was prepared with the {describe_tokenizer(m['tokenizer'])}, but this run uses the "
                    f"{describe_tokenizer(tokenizer)}: set data.tokenizer / data.tokenizer_path to the one it was "
                    "prepared with, or prepare it again with this one"
                )
            self.tokenizer = m["tokenizer"]
            offset = len(self.inputs)
            self.inputs += [i["name"] for i in m["inputs"]]
            for s in m["shards"]:
                self.shards.append((path, s["name"], s["docs"], s["tokens"], m["dtype"], offset))
                counts.append(s["docs"])
        self.doc_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [shards + 1]
        self.n_docs = int(self.doc_starts[-1])
        self.n_tokens = sum(s[3] for s in self.shards)
        self.eos_id = int(self.tokenizer["eos_id"])
        self._open: OrderedDict = OrderedDict()
        self._reads = 0

    def __getstate__(self):  # DataLoader workers reopen the memmaps themselves
        return {**self.__dict__, "_open": OrderedDict()}

    def __deepcopy__(self, memo):  # read-only: copies of a loader share it
        return self

    def _shard(self, i: int):
        """(tokens memmap, boundaries memmap, tags memmap) of shard i, checked against its manifest entry."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path, name, docs, tokens, dtype, _ = self.shards[i]
        base = os.path.join(path, name)
        try:
            idx = np.load(base + ".idx.npy", mmap_mode="r")
            src = np.load(base + ".src.npy", mmap_mode="r")
            size = os.path.getsize(base + ".bin")
            itemsize = np.dtype(dtype).itemsize
            ids = np.memmap(base + ".bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        except (OSError, ValueError) as e:
            raise PreparedDataError(f"{base}: {e}: prepare the corpus again") from None
        if idx.shape != (docs + 1,) or src.shape != (docs,) or size != tokens * itemsize or int(idx[-1]) != tokens:
            raise PreparedDataError(f"{base} does not match {path}/{MANIFEST} (truncated?): prepare the corpus again")
        self._open[i] = (ids, idx, src)
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[i]

    def _drop_pages(self) -> None:
        """Unmap the pages read so far (MADV_DONTNEED; they stay in the kernel's page cache and fault
        back in cheaply). Without it every page a read touched (and the kernel's read-around) counts
        in this process's RSS until the shard closes, and RSS grows with the corpus read."""
        import mmap

        for arrays in self._open.values():
            for a in arrays:
                m = getattr(a, "_mmap", None)
                if m is not None and hasattr(mmap, "MADV_DONTNEED"):
                    m.madvise(mmap.MADV_DONTNEED)

    def _count_read(self) -> None:
        self._reads += 1
        if self._reads % _DROP_EVERY == 0:
            self._drop_pages()

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, document index within it) of global document g."""
        if not 0 <= g < self.n_docs:
            raise IndexError(f"document {g} is not in [0, {self.n_docs})")
        i = int(np.searchsorted(self.doc_starts, g, side="right")) - 1
        return i, g - int(self.doc_starts[i])

    def doc_len(self, g: int) -> int:
        i, d = self.locate(g)
        idx = self._shard(i)[1]
        self._count_read()
        return int(idx[d + 1]) - int(idx[d])

    def tokens(self, g: int, a: int = 0, b: int | None = None) -> np.ndarray:
        """Token ids [a, b) of document g (no eos), int64 [b - a]."""
        i, d = self.locate(g)
        ids, idx, _ = self._shard(i)
        start, end = int(idx[d]), int(idx[d + 1])
        b = end - start if b is None else b
        out = np.array(ids[start + a : start + b], dtype=np.int64)  # a copy: the pages may be dropped
        self._count_read()
        return out

    def tag(self, g: int) -> str:
        i, d = self.locate(g)
        return self.inputs[self.shards[i][5] + int(self._shard(i)[2][d])]

    def lengths(self, lo: int, hi: int) -> np.ndarray:
        """Token counts of documents [lo, hi), int64 (reads only boundaries; for statistics)."""
        out = []
        while lo < hi:
            i, d = self.locate(lo)
            idx = self._shard(i)[1]
            n = min(hi - lo, self.shards[i][2] - d)
            out.append(np.diff(np.asarray(idx[d : d + n + 1], dtype=np.int64)))
            lo += n
        return np.concatenate(out) if out else np.zeros(0, np.int64)
