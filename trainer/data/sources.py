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
    ``"text"`` field is one document), or directories searched recursively for them."""

    def __init__(self, paths: list[str], split: str = "train", val_fraction: float = 0.02):
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ValueError("data.paths is empty: give a list of .txt/.jsonl files or dirs")
        entries, keys = [], []  # entry: (file, byte offset of the jsonl line or -1)
        for given in paths:
            for path, rel in self._files(given):
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
        if offset < 0:
            return _read_text(path)
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8", errors="replace")
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'{path} at byte {offset}: each jsonl line must be an object with a string "text" field'
            ) from None
        if not isinstance(text, str):
            raise ValueError(f'{path} at byte {offset}: "text" must be a string')
        return text
