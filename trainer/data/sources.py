"""Document sources: ``len(src)`` documents, ``src[i] -> str`` one whole document.

Order is deterministic (sorted paths, file line order). A document's split is decided by
a stable hash of its key (relative path, plus ``:line`` for jsonl), so train and val are
disjoint and do not depend on where the corpus lives. If the hash puts no document in
val, the document with the smallest hash goes there instead (the trainer always builds a
val loader); a one-document corpus serves both splits.
"""

from __future__ import annotations

import hashlib
import json
import os

SPLITS = ("train", "val")
STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


def _hash_fraction(key: str) -> float:
    """A platform-independent hash of ``key`` in [0, 1)."""
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "little") / 2.0**64


def _select(keys: list[str], split: str, val_fraction: float) -> list[int]:
    """Indices of ``keys`` (in order) that belong to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown: choose one of {SPLITS}")
    if len(keys) <= 1:
        return list(range(len(keys)))
    h = [_hash_fraction(k) for k in keys]
    val = {i for i, x in enumerate(h) if x < val_fraction} or {min(range(len(h)), key=h.__getitem__)}
    return [i for i in range(len(keys)) if (i in val) == (split == "val")]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


SAMPLE_BYTES = 1 << 16  # the head of each data file checked for binary content
MAX_UNDECODABLE = 0.01  # more than this fraction of bytes that are not UTF-8: not a text file
_REPLACEMENT = "\ufffd".encode()


def binary_reason(data: bytes) -> str | None:
    """Why ``data`` (a file or its head) is not UTF-8 text, or None. A NUL byte (executables,
    archives, UTF-16) or more than 1% undecodable bytes (random data, another encoding) is
    binary; a few stray bytes in real text are not (read with replacement characters)."""
    if b"\x00" in data:
        return "it holds NUL bytes"
    if not data:
        return None
    text = data.decode("utf-8", errors="replace")
    if len(data) == SAMPLE_BYTES:  # a multi-byte character cut by the sample's end is not an error
        text = text.rstrip("\ufffd")
    bad = text.count("\ufffd") - data.count(_REPLACEMENT)  # U+FFFD written in the file is text
    if bad > MAX_UNDECODABLE * len(data):
        return f"{100 * bad / len(data):.0f}% of its bytes are not UTF-8"
    return None


def check_text_file(path: str, data: bytes | None = None) -> None:
    """ValueError unless ``path`` (its first SAMPLE_BYTES, or ``data``) is UTF-8 text: a binary
    file in data.paths is a wrong path, never something to train on."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read(SAMPLE_BYTES)
    why = binary_reason(data)
    if why is not None:
        raise ValueError(
            f"data.paths: {path} is not a text file ({why}): remove it or point data.paths at "
            "UTF-8 .txt/.jsonl files only"
        )


class StdlibSource:
    """Every ``.py`` file of the Python standard library (the directory of ``os.__file__``),
    minus ``site-packages``, ``test``/``tests``, ``idlelib`` and ``lib2to3`` subtrees; one
    file = one document, sorted by relative path. Files under ``min_chars`` bytes are skipped."""

    def __init__(self, min_chars: int = 1, split: str = "train", val_fraction: float = 0.02):
        self.root = os.path.dirname(os.__file__)
        rels = []
        for d, dirs, files in os.walk(self.root):
            dirs[:] = [x for x in dirs if x not in STDLIB_EXCLUDE]
            for name in files:
                path = os.path.join(d, name)
                if name.endswith(".py") and os.path.getsize(path) >= min_chars:
                    rels.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        rels.sort()
        self.paths = [rels[i] for i in _select(rels, split, val_fraction)]  # relative paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return _read_text(os.path.join(self.root, self.paths[i]))

    def doc_size(self, i: int) -> int:
        """Bytes of document ``i`` (without reading it; the data mix weighs documents by it)."""
        return os.path.getsize(os.path.join(self.root, self.paths[i]))


class TextFilesSource:
    """Local ``.txt`` files (one document each) and ``.jsonl`` files (each non-blank line's
    ``"text"`` field is one document), or directories searched recursively for them. A file that
    is not UTF-8 text (``binary_reason``) is refused with a ValueError naming it, not skipped: it
    means data.paths points at something else than the corpus meant."""

    def __init__(self, paths: list[str], split: str = "train", val_fraction: float = 0.02):
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ValueError("data.paths is empty: give a list of .txt/.jsonl files or dirs")
        entries, keys = [], []  # entry: (file, byte offset of the jsonl line or -1)
        for given in paths:
            for path, rel in self._files(given):
                check_text_file(path)  # the head of each file: a binary one stops the run here
                if path.endswith(".txt"):
                    entries.append((path, -1))
                    keys.append(rel)
                    continue
                with open(path, "rb") as f:
                    offset = 0
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            entries.append((path, offset))
                            keys.append(f"{rel}:{lineno}")
                        offset += len(line)
        if not entries:
            raise ValueError(f"data.paths={list(paths)!r} holds no .txt or .jsonl documents: fix the paths")
        self.entries = [entries[i] for i in _select(keys, split, val_fraction)]

    @staticmethod
    def _files(given: str):
        """(path, key) of every .txt/.jsonl file under ``given``, sorted."""
        if not os.path.exists(given):
            raise ValueError(f"data.paths has {given!r}, which does not exist: fix the path")
        if os.path.isfile(given):
            if not given.endswith((".txt", ".jsonl")):
                raise ValueError(f"data.paths has {given!r}: only .txt and .jsonl files are read")
            return [(given, os.path.basename(given))]
        out = []
        for d, dirs, files in os.walk(given):
            dirs.sort()
            for name in files:
                if name.endswith((".txt", ".jsonl")):
                    path = os.path.join(d, name)
                    out.append((path, os.path.relpath(path, given).replace(os.sep, "/")))
        return sorted(out, key=lambda x: x[1])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> str:
        path, offset = self.entries[i]
        with open(path, "rb") as f:
            f.seek(max(offset, 0))
            data = f.read() if offset < 0 else f.readline()
        check_text_file(path, data)  # binary past the head checked at start
        line = data.decode("utf-8", errors="replace")
        if offset < 0:
            return line
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'{path} at byte {offset}: each jsonl line must be an object with a string "text" field'
            ) from None
        if not isinstance(text, str):
            raise ValueError(f'{path} at byte {offset}: "text" must be a string')
        return text
