"""Tokenizers: a download-free byte tokenizer (the default) and a local Hugging Face one.

Both expose ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eos_id`` and
``vocab_size``; neither adds BOS/EOS on its own (packing appends ``eos_id`` itself).
"""

from __future__ import annotations

import os

KINDS = ("byte", "hf")


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 is end-of-document."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """``transformers.AutoTokenizer`` from a local directory (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.model_max_length = 1 << 62  # documents are long; packing cuts them
        eos = self.tok.eos_token_id
        if eos is None:
            eos = self.tok.sep_token_id
        if eos is None:
            raise ValueError(
                f"data.tokenizer_path={path!r} holds a tokenizer without an eos "
                "(or sep) token: packing needs one to end documents"
            )
        self.eos_id = int(eos)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def build_tokenizer(kind: str, path: str | None = None):
    """``kind``: "byte" (``path`` ignored) or "hf" (``path``: a local tokenizer directory)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not path or not os.path.isdir(path):
            raise ValueError(
                f"data.tokenizer_path={path!r} does not exist: point it at a local "
                "directory holding a Hugging Face tokenizer, or set data.tokenizer=byte"
            )
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={kind!r} is unknown: choose one of {KINDS}")
