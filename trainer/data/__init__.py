"""Data pipeline: tokenizers, document sources, packing into rows, dp sharding, probes."""

from trainer.data.packing import DataLoaderShard, PackedDataset, collate
from trainer.data.sources import StdlibSource, TextFilesSource
from trainer.data.synthetic import mqar_example, passkey_example
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "StdlibSource",
    "TextFilesSource",
    "PackedDataset",
    "DataLoaderShard",
    "collate",
    "passkey_example",
    "mqar_example",
]
