"""Writing files so that a reader never sees a partial one (checkpoints, exported weights)."""

from __future__ import annotations

import os
import tempfile
import zlib

PARTIAL_SUFFIX = ".part"  # names of files still being written end with this; readers skip them


def write_atomic(path: str, write) -> None:
    """Write ``path`` through a temporary file beside it: ``write(tmp_path)`` fills it, it is
    fsynced, then renamed over ``path``. On any failure the temporary file is removed and the
    error re-raised, so ``path`` is either its old self or complete."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def crc32_file(path: str) -> str:
    """The CRC-32 of a file's bytes as 8 hex digits, read 4 MiB at a time (manifests)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"
