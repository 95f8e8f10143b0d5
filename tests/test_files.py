"""The small shared helpers: a file's SHA-256, a file written whole or not at all, an error's first line."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from gaussad.errors import WeightsError, first_line
from gaussad.files import BLOCK_BYTES, atomic_file, file_sha256
from gaussad.networks import LITE0_PACKAGE, WeightSource


def test_file_sha256_is_hashlib_over_the_bytes(tmp_path):
    data = bytes(range(256)) * (BLOCK_BYTES // 128 + 3)  # more than two blocks
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256(b"prefix")
    assert file_sha256(path, digest) == digest.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


def test_atomic_file_replaces_the_target_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as partial:
        partial.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_file(target) as partial:
        assert partial.parent == tmp_path and partial != target
        partial.write_text("new")
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_first_line():
    assert first_line(RuntimeError("\n  what went wrong\nthe details\n")) == "what went wrong"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("   ")) == "ValueError"


def test_weight_source_parse():
    assert WeightSource.parse("timm") == WeightSource("timm")
    assert WeightSource.parse("none") == WeightSource("none")
    assert WeightSource.parse(LITE0_PACKAGE) == WeightSource("package")
    assert WeightSource.parse("file:/w/x.pth") == WeightSource("file", Path("/w/x.pth"))
    with pytest.raises(WeightsError, match=r"^unknown weight source 'hub': use timm, file:<path>, "
                                           r"package:efficientnet-lite0, package:efficientnet-lite1, "
                                           r"package:efficientnet-lite2 or none$"):
        WeightSource.parse("hub")
