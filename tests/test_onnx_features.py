"""gaussad.onnx_features: ONNX Runtime's features against torch's on real photographs, the export
cache keyed by the weights' content, its faults; the runtime choice."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from feature_helpers import LITE0, cpu_backbone, random_images
from PIL import Image

from gaussad.errors import RuntimeUnavailableError
from gaussad.features import resolve_runtime, to_tensor
from gaussad.networks import LITE0_PACKAGE, build_model
from gaussad.onnx_features import cache_dir

# ---- the runtimes -----------------------------------------------------------------------------------


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the level, relative to max |want| (elementwise ratios blow up near 0)."""
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name, weights, levels", [(LITE0, LITE0_PACKAGE, range(9)), ("resnet18", "none", range(5))])
def test_onnxruntime_features_equal_the_torch_features_on_real_photos(name, weights, levels):
    """The parity the onnxruntime runtime promises: on every level, max |onnx - torch| <= 1e-4 max |torch|,
    on real photographs, at a batch size (3) other than the export's (2)."""
    photos = torch.stack([to_tensor(Image.fromarray(getattr(skimage.data, photo)()), 224)
                          for photo in ("chelsea", "coffee", "astronaut")])
    want = cpu_backbone(name, weights, levels, 224, runtime="torch").extract(photos)
    got = cpu_backbone(name, weights, levels, 224, runtime="onnxruntime").extract(photos)
    assert sorted(got) == sorted(want) == list(levels)
    for level in want:
        assert got[level].shape == want[level].shape and got[level].dtype == torch.float32
        assert max_relative_error(got[level], want[level]) <= 1e-4, f"level {level}"


def test_the_export_is_cached_by_the_content_of_the_weights(tmp_path, monkeypatch, source_state):
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights.pth"
    torch.save(source_state, weights)
    first = cpu_backbone(LITE0, f"file:{weights}", levels=(2,))
    exported = sorted(cache_dir().glob("*.onnx"))
    assert len(exported) == 1 and cache_dir() == tmp_path / "cache"
    written = exported[0].stat().st_mtime_ns
    cpu_backbone(LITE0, f"file:{weights}", levels=(2,))  # the same bytes: the same file, not exported again
    assert sorted(cache_dir().glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == written

    torch.save(build_model(LITE0, "none", seed=8).state_dict(), weights)  # same name, other weights
    other = cpu_backbone(LITE0, f"file:{weights}", levels=(2,))
    assert len(list(cache_dir().glob("*.onnx"))) == 2
    images = random_images(2)
    assert not torch.allclose(other.extract(images)[2], first.extract(images)[2])
    cpu_backbone(LITE0, f"file:{weights}", levels=(2, 3))  # other levels, other size: exports of their own
    cpu_backbone(LITE0, f"file:{weights}", levels=(2,), image_size=96)
    assert len(list(cache_dir().glob("*.onnx"))) == 4 and not list(cache_dir().glob("*.partial"))


def test_a_damaged_export_in_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "cache"))
    cpu_backbone(LITE0, "none", levels=(1,))
    [path] = cache_dir().glob("*.onnx")
    path.write_bytes(b"not an ONNX graph")
    with pytest.raises(RuntimeUnavailableError, match="--runtime torch") as info:
        cpu_backbone(LITE0, "none", levels=(1,))
    assert str(path) in str(info.value)
    assert torch.equal(cpu_backbone(LITE0, "none", levels=(1,), runtime="torch").extract(random_images())[1].isnan(),
                       torch.zeros(2, 16, 32, 32, dtype=torch.bool))  # the way out works


def test_an_export_cache_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "file" / "onnx"))
    with pytest.raises(RuntimeUnavailableError, match="GAUSSAD_ONNX_CACHE.*--runtime torch") as info:
        cpu_backbone(LITE0, "none", levels=(1,))
    assert str(tmp_path / "file" / "onnx") in str(info.value)


def test_the_runtime_choice():
    assert resolve_runtime(None, torch.device("cpu")) == "onnxruntime"
    assert resolve_runtime(None, torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="--runtime torch"):
        resolve_runtime("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", torch.device("cpu"))
