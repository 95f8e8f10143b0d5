"""Whole files: the SHA-256 of one, and one written beside its target and renamed into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BLOCK_BYTES = 1 << 20  # read at a time, so a large file is never held whole


def file_sha256(path: str | Path, digest=None) -> str:
    """The hex SHA-256 of the file's bytes; with `digest` (a hashlib object), the bytes update it
    and its hex digest so far is returned."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A new partial file beside `path` for the block to write. If the block succeeds it replaces
    `path` (mode 0o644), else `path` is left as it was; the partial never stays. A reader never sees
    half a file, and two writers at once each rename a whole one. Its folder must exist."""
    path = Path(path)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(partial)
        os.chmod(partial, 0o644)  # mkstemp makes it private
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
