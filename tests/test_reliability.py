"""Reliability: gaussad never destroys what it did not write, reads the images users really have,
refuses a model whose config and statistics do not belong together, and survives being killed or
running out of disk while saving. Faults are caused for real (processes killed with SIGKILL, a
full tmpfs); see docs/reliability.md for the table these tests back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gaussad.cli import main
from gaussad.data import read_mask, read_rgb
from gaussad.demo import write_demo_dataset
from gaussad.errors import DatasetError, ModelFileError
from gaussad.gaussian import GaussianAD
from gaussad.model_folder import model_digest
from gaussad.output_folders import MARKER
from gaussad.serving import decode_image

# paper-lite0: shared Gaussians, a model of a few hundred KB (the small-disk test fills a 4 MiB tmpfs)
FAST = ["--preset", "paper-lite0", "--image-size", "96", "--levels", "3", "4", "5", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=2, categories=["brushed", "weave"], n_train=12, n_test_good=4,
                       n_test_per_defect=3, image_size=96)
    return root


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("models") / "brushed"
    assert main(["fit", str(dataset / "brushed"), "-o", str(model), *FAST]) == 0
    return model


def cli_error(args: list[str], capsys) -> str:
    """Run the CLI, expecting one `gaussad: error:` line and exit code 2."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gaussad: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of a user's own files; returns its contents to compare with later."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    (path / "notes" / "a.md").write_text("# notes")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- 1. never destroy what gaussad did not write ----------------------------------------------------


def test_fit_refuses_a_users_folder_before_any_compute(dataset, tmp_path, capsys):
    target = tmp_path / "work"
    before = user_folder(target)
    started = time.perf_counter()
    err = cli_error(["fit", str(dataset / "brushed"), "-o", str(target), *FAST], capsys)
    assert str(target) in err and "not a gaussad model folder" in err
    assert time.perf_counter() - started < 2  # refused before the backbone was even built
    assert snapshot(target) == before


def test_fit_refuses_a_plain_file_and_the_current_folder(dataset, tmp_path, capsys, monkeypatch):
    plain = tmp_path / "report.pdf"
    plain.write_bytes(b"%PDF-1.4 a user's file")
    assert "existing file" in cli_error(["fit", str(dataset / "brushed"), "-o", str(plain), *FAST], capsys)
    assert plain.read_bytes() == b"%PDF-1.4 a user's file"

    work = tmp_path / "cwd"
    before = user_folder(work)
    monkeypatch.chdir(work)
    cli_error(["fit", str(dataset / "brushed"), "-o", ".", *FAST], capsys)
    assert snapshot(work) == before


def test_fit_refuses_a_model_folder_holding_a_users_file(fitted, dataset, tmp_path, capsys):
    target = tmp_path / "model"
    shutil.copytree(fitted, target)
    (target / "my-notes.txt").write_text("keep me")
    cli_error(["fit", str(dataset / "brushed"), "-o", str(target), *FAST], capsys)
    assert (target / "my-notes.txt").read_text() == "keep me"


def test_fit_replaces_its_own_model_folder_and_fills_an_empty_one(fitted, dataset, tmp_path):
    own, empty = tmp_path / "own", tmp_path / "empty"
    shutil.copytree(fitted, own)
    empty.mkdir()
    for target in (own, empty):
        assert main(["fit", str(dataset / "weave"), "-o", str(target), *FAST]) == 0
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "stats.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old folder left


def test_evaluate_predict_and_demo_refuse_a_users_output_folder(fitted, dataset, tmp_path, capsys):
    target = tmp_path / "work"
    before = user_folder(target)
    category = str(dataset / "brushed")
    image = str(dataset / "brushed" / "test" / "good" / "000.png")
    for args in (["evaluate", str(fitted), category, "-o", str(target), "--quiet"],
                 ["predict", str(fitted), image, "-o", str(target), "--quiet"],
                 ["demo", "--data", str(dataset), "--out", str(target), *FAST],
                 ["demo-data", str(target)]):
        assert "gaussad did not write" in cli_error(args, capsys)
        assert snapshot(target) == before


def test_output_folders_are_reused_by_the_same_command_only(fitted, dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(fitted), str(dataset / "brushed"), "-o", str(out), "--quiet"]
    assert main(args) == 0 and main(args) == 0  # a rerun into its own folder is fine
    assert json.loads((out / MARKER).read_text()) == {"kind": "evaluation"}
    image = str(dataset / "brushed" / "test" / "good" / "000.png")
    assert "evaluation outputs" in cli_error(["predict", str(fitted), image, "-o", str(out), "--quiet"], capsys)


def test_piade_checkpoint_folder_holding_a_users_files_is_refused(dataset, tmp_path, capsys):
    checkpoints = tmp_path / "work"
    before = user_folder(checkpoints)
    err = cli_error(["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), "--model-type", "piade",
                     "--preset", "lite0", "--image-size", "64", "--epochs", "1", "--checkpoint-dir",
                     str(checkpoints), "--quiet"], capsys)
    assert "checkpoints outputs" in err and snapshot(checkpoints) == before and not (tmp_path / "m").exists()


def test_piade_unreadable_checkpoint_is_one_line(dataset, tmp_path, capsys):
    checkpoints, model = tmp_path / "checkpoints", tmp_path / "m"
    args = ["fit", str(dataset / "weave"), "-o", str(model), "--model-type", "piade", "--preset", "lite0",
            "--image-size", "64", "--train-batch-size", "8", "--checkpoint-dir", str(checkpoints), "--quiet"]
    assert main([*args, "--epochs", "1"]) == 0
    (checkpoints / "epoch-0001" / "state.json").write_text("{ not json")
    shutil.rmtree(model)
    assert "cannot read checkpoint" in cli_error([*args, "--epochs", "2"], capsys)
    assert not model.exists()


# ---- 2. the images users really have ----------------------------------------------------------------


def png_rgb16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = rgb16.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def write_variants(gray8: np.ndarray, rgb8: np.ndarray, folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The same pictures in the formats cameras and tools write, each with its known 8-bit RGB version."""
    folder.mkdir(parents=True, exist_ok=True)
    gray_rgb = np.repeat(gray8[..., None], 3, axis=2)
    variants = {}

    def add(name, expected, save):
        path = folder / name
        save(path)
        variants[name] = (path, expected)

    add("gray16.png", gray_rgb, lambda p: Image.fromarray(gray8.astype(np.uint16) * 257).save(p))
    add("gray16.tif", gray_rgb, lambda p: tifffile.imwrite(p, gray8.astype(np.uint16) * 257))
    add("rgb16.tif", rgb8, lambda p: tifffile.imwrite(p, rgb8.astype(np.uint16) * 257, photometric="rgb"))
    add("rgb16.png", rgb8, lambda p: png_rgb16(p, rgb8.astype(np.uint16) * 257))
    add("float.tif", gray_rgb, lambda p: tifffile.imwrite(p, gray8.astype(np.float32) / 255))
    add("rgba.png", rgb8, lambda p: Image.fromarray(np.dstack([rgb8, np.full(gray8.shape, 90, np.uint8)])).save(p))
    add("la.png", gray_rgb, lambda p: Image.fromarray(np.dstack([gray8, gray8])[..., :2], "LA").save(p))
    palette = Image.fromarray(rgb8).quantize(64)
    add("palette.png", np.asarray(palette.convert("RGB")), lambda p: palette.save(p))
    cmyk = Image.fromarray(rgb8).convert("CMYK")
    add("cmyk.tif", np.asarray(cmyk.convert("RGB")), lambda p: cmyk.save(p))
    bilevel = gray8 > 127
    add("bilevel.png", np.repeat((bilevel * 255).astype(np.uint8)[..., None], 3, 2),
        lambda p: Image.fromarray(bilevel).save(p))
    return variants


def test_every_format_reads_as_its_known_8bit_version(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (40, 56)).astype(np.uint8)
    gray8[0, :2] = (0, 255)  # the full range
    rgb8 = rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)
    for name, (path, expected) in write_variants(gray8, rgb8, tmp_path).items():
        np.testing.assert_array_equal(np.asarray(read_rgb(path)), expected, err_msg=name)
        np.testing.assert_array_equal(np.asarray(decode_image(path.read_bytes())), expected, err_msg=name)
    # arrays as a client sends them: uint16 and float in [0, 1] scale to the same 8-bit picture
    np.testing.assert_array_equal(np.asarray(decode_image(rgb8.astype(np.uint16) * 257)), rgb8)
    np.testing.assert_array_equal(np.asarray(decode_image(rgb8 / 255.0)), rgb8)


def test_16bit_masks_and_bad_float_images(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 2:4] = 65535
    Image.fromarray(mask).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask16.png", (8, 8)), mask > 0)
    tifffile.imwrite(tmp_path / "hdr.tif", np.full((8, 8), 300.0, np.float32))
    with pytest.raises(DatasetError, match=r"hdr.tif has values in \[300, 300\].*\[0, 1\]"):
        read_rgb(tmp_path / "hdr.tif")
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(DatasetError, match="nan.tif holds NaN"):
        read_rgb(tmp_path / "nan.tif")


def convert_category(source: Path, target: Path, convert) -> None:
    """A copy of a demo category with every image (not mask) rewritten by `convert(gray8, path)`."""
    shutil.copytree(source, target)
    for path in list(target.rglob("*.png")):
        if "ground_truth" in path.parts:
            continue
        with Image.open(path) as img:
            gray8 = np.asarray(img.convert("L"))
        path.unlink()
        convert(gray8, path)


@pytest.mark.slow  # ~20 s: keeps the default run near 10 minutes
def test_16bit_category_fits_and_scores_as_its_8bit_original(dataset, tmp_path):
    """The bug: 16-bit PNGs saturated to white and fit failed with 'zero variance'. Now a 16-bit copy
    (and a 16-bit TIFF copy) of a category gives the same scores as the 8-bit original."""
    converters = {
        "png16": lambda gray8, path: Image.fromarray(gray8.astype(np.uint16) * 257).save(path),
        "tif16": lambda gray8, path: tifffile.imwrite(path.with_suffix(".tif"), gray8.astype(np.uint16) * 257),
    }
    results = {}
    for name in ("original", *converters):
        category = tmp_path / name / "brushed"
        if name == "original":
            shutil.copytree(dataset / "brushed", category)
        else:
            convert_category(dataset / "brushed", category, converters[name])
        model, out = tmp_path / name / "model", tmp_path / name / "eval"
        assert main(["fit", str(category), "-o", str(model), *FAST]) == 0
        assert main(["evaluate", str(model), str(category), "-o", str(out), "--quiet"]) == 0
        results[name] = json.loads((out / "metrics.json").read_text())
    for name in converters:
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert results[name][key] == pytest.approx(results["original"][key], abs=1e-9), (name, key)
    assert results["original"]["image_auroc"] > 0.6


def test_unusual_formats_and_1x1_images_fit_and_predict(tmp_path):
    """A training folder mixing RGBA, palette, CMYK, 16-bit and bilevel files, and one of 1×1 images."""
    rng = np.random.default_rng(1)
    for name, size in (("mixed", 48), ("tiny", 1)):
        train = tmp_path / name / "train" / "good"
        train.mkdir(parents=True)
        for index in range(6):
            gray8 = rng.integers(0, 256, (size, size)).astype(np.uint8)
            rgb8 = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            for fmt, (path, _) in write_variants(gray8, rgb8, tmp_path / "variants" / f"{name}{index}").items():
                shutil.copy(path, train / f"{index}-{fmt}")
        test = tmp_path / name / "test" / "good"
        test.mkdir(parents=True)
        for path in sorted(train.iterdir())[:3]:
            shutil.copy(path, test / path.name)
        model, out = tmp_path / name / "model", tmp_path / name / "pred"
        assert main(["fit", str(tmp_path / name), "-o", str(model), *FAST]) == 0, name
        assert main(["predict", str(model), str(test), "-o", str(out), "--quiet"]) == 0, name
        with open(out / "predictions.csv") as table:
            assert len(table.readlines()) == 1 + 3


def bomb_png(path: Path, side: int = 20000) -> None:
    """A small PNG whose header says side × side pixels (it would decode to side² bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_its_header(fitted, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    err = cli_error(["predict", str(fitted), str(bomb), "-o", str(tmp_path / "pred"), "--quiet"], capsys)
    assert str(bomb) in err and "decompression bomb" in err and "400000000 pixels" in err
    with pytest.raises(DatasetError, match="decompression bomb"):
        decode_image(bomb.read_bytes())
    bomb_png(bomb, side=10000)  # between Pillow's warning and error bounds: refused by gaussad's own check
    assert "10000×10000 pixels" in cli_error(["predict", str(fitted), str(bomb), "-o", str(tmp_path / "pred"),
                                               "--quiet"], capsys)


# ---- 3. a model folder whose config and statistics do not belong together ---------------------------


def test_edited_config_is_detected(fitted, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fitted, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "image_size": 128}))
    with pytest.raises(ModelFileError, match="does not match stats.safetensors"):
        GaussianAD.load(model, device="cpu", progress=False)
    (model / "config.json").write_text(json.dumps(config))  # the config as saved loads again
    assert GaussianAD.load(model, device="cpu", progress=False).config["image_size"] == 96


def test_config_and_statistics_from_two_saves_are_detected(fitted, dataset, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["fit", str(dataset / "weave"), "-o", str(other), *FAST]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(fitted, mixed)
    shutil.copy(other / "stats.safetensors", mixed / "stats.safetensors")
    err = cli_error(["evaluate", str(mixed), str(dataset / "brushed"), "-o", str(tmp_path / "eval"), "--quiet"],
                    capsys)
    assert "does not match" in err and not (tmp_path / "eval").exists()


def test_format_1_folder_without_digest_still_loads_and_is_saved_signed(fitted, tmp_path):
    """Folders saved before the digest (format 1) are in users' registries: they load, unchecked."""
    old = tmp_path / "old"
    shutil.copytree(fitted, old)
    config = json.loads((old / "config.json").read_text())
    del config["digest"]
    (old / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    model = GaussianAD.load(old, device="cpu", progress=False)
    model.save(old)
    saved = json.loads((old / "config.json").read_text())
    assert saved["format_version"] == 2 and saved["digest"] == model_digest(saved, old / "stats.safetensors")


def test_digest_is_an_independent_sha256(fitted):
    import hashlib

    config = json.loads((fitted / "config.json").read_text())
    body = {k: v for k, v in config.items() if k != "digest"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True).encode()
                              + (fitted / "stats.safetensors").read_bytes()).hexdigest()
    assert config["digest"] == expected == model_digest(config, fitted / "stats.safetensors")


# ---- faults: killed while fitting or saving, disk full ----------------------------------------------

# Runs `gaussad fit` in a child process that kills itself with SIGKILL at a chosen point of saving;
# the kill is real, only its moment is chosen (a save takes milliseconds).
KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import gaussad.model_folder as folder
    point = os.environ["KILL_AT"]
    def kill():
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "after-tensors":
        original_digest = folder.model_digest
        folder.model_digest = lambda *a: (kill(), original_digest(*a))[1]
    elif point == "after-exchange":
        original_exchange = folder._exchange
        folder._exchange = lambda a, b: (original_exchange(a, b), kill())[0]
    from gaussad.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_fit(args: list[str], env: dict | None = None, script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "gaussad.cli", *args]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def model_state(model: Path) -> tuple[str, dict]:
    return json.loads((model / "config.json").read_text())["digest"], snapshot(model)


@pytest.mark.parametrize("point", [pytest.param("after-tensors", marks=pytest.mark.slow), "after-exchange"])
def test_kill_during_save_leaves_a_complete_model(fitted, dataset, tmp_path, point):
    model = tmp_path / "model"
    shutil.copytree(fitted, model)
    old_digest, _ = model_state(model)
    args = ["fit", str(dataset / "weave"), "-o", str(model), *FAST]
    process = run_fit(args, {"KILL_AT": point}, KILL_DURING_SAVE)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    loaded = GaussianAD.load(model, device="cpu", progress=False)  # complete: old or new, never partial
    new_digest = json.loads((model / "config.json").read_text())["digest"]
    assert (new_digest == old_digest) == (point == "after-tensors")
    assert loaded.config["levels"] == [3, 4, 5]
    assert run_fit(args).wait(timeout=300) == 0  # the rerun succeeds and clears the dead save's leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.slow
def test_kill_during_feature_extraction(fitted, dataset, tmp_path):
    """SIGKILL while the backbone runs: no model folder at all for a first fit, the old one intact
    for a refit; the rerun succeeds."""
    big = tmp_path / "data"
    write_demo_dataset(big, seed=3, categories=["weave"], n_train=150, n_test_good=1, n_test_per_defect=1,
                       image_size=96)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    new_model, old_model = tmp_path / "new", tmp_path / "old"
    shutil.copytree(fitted, old_model)
    before = model_state(old_model)
    for model in (new_model, old_model):
        args = ["fit", str(big / "weave"), "-o", str(model), *FAST, "--batch-size", "4"]
        process = run_fit(args, {"TMPDIR": str(scratch)})
        deadline = time.monotonic() + 120
        while not any(p.glob("level_*.npy") for p in scratch.glob("gaussad-features-*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.kill()
        process.wait()
        if model is new_model:
            assert not model.exists()
        else:
            assert model_state(model) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert run_fit(["fit", str(big / "weave"), "-o", str(new_model), *FAST]).wait(timeout=300) == 0
    assert GaussianAD.load(new_model, device="cpu", progress=False).fit_info["n_train_images"] > 100


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root can mount one, as CI is); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_saving_keeps_the_previous_model(fitted, dataset, small_disk, capsys):
    model = small_disk / "model"
    shutil.copytree(fitted, model)
    before = model_state(model)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # leave 16 KiB, less than a model
    err = cli_error(["fit", str(dataset / "weave"), "-o", str(model), *FAST], capsys)
    assert f"cannot save the model to {model}" in err and "No space left on device" in err
    assert "unchanged" in err and model_state(model) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model"]


# ---- the matrix of bad input: one `gaussad: error:` line, exit 2, nothing written -------------------
# (the last three were tracebacks before)


def damage(case: str, data: Path, model: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Prepare one bad input in fresh copies; returns the CLI arguments and a text the error must hold."""
    category = data / "brushed"
    train = category / "train" / "good"
    out = str(tmp_path / "out")
    fit = ["fit", str(category), "-o", out, *FAST]
    evaluate = ["evaluate", str(model), str(category), "-o", out, "--quiet"]
    first = sorted(train.iterdir())[0]
    mask = category / "ground_truth" / "crack" / "000_mask.png"
    config = model / "config.json"
    if case == "no dataset root":
        return ["fit", str(tmp_path / "nowhere"), "-c", "brushed", "-o", out, *FAST], "nowhere"
    if case == "no categories in root":
        (tmp_path / "empty").mkdir()
        return ["fit", str(tmp_path / "empty"), "-c", "brushed", "-o", out, *FAST], "no category"
    if case == "root without -c":
        return ["fit", str(data), "-o", out, *FAST], "choose one with -c"
    if case == "unknown category":
        return ["fit", str(data), "-c", "bottle", "-o", out, *FAST], "'bottle'"
    if case == "no train/good":
        shutil.rmtree(train)
        return fit, "train/good"
    if case == "empty train/good":
        for path in train.iterdir():
            path.unlink()
        return fit, str(train)
    if case == "text file named .png":
        first.write_text("not an image")
        return fit, str(first)
    if case == "zero-byte image":
        first.write_bytes(b"")
        return fit, str(first)
    if case == "truncated image":
        first.write_bytes(first.read_bytes()[:200])
        return fit, str(first)
    if case == "float image out of range":
        tifffile.imwrite(first.with_suffix(".tif"), np.full((8, 8), 2.0, np.float32))
        return fit, "[0, 1]"
    if case == "no test folder":
        shutil.rmtree(category / "test")
        return evaluate, str(category / "test")
    if case == "missing mask":
        mask.unlink()
        return evaluate, "missing mask"
    if case == "mask of another size":
        Image.new("L", (10, 10)).save(mask)
        return evaluate, str(mask)
    if case == "corrupt mask":
        mask.write_bytes(b"\x89PNG garbage")
        return evaluate, str(mask)
    if case == "no model folder":
        return ["predict", str(tmp_path / "no-model"), str(first), "-o", out], "config.json is missing"
    if case == "config not JSON":
        config.write_text("{")
        return evaluate, "not valid JSON"
    if case == "statistics missing":
        (model / "stats.safetensors").unlink()
        return evaluate, "stats.safetensors is missing"
    if case == "config edited":
        config.write_text(config.read_text().replace('"image_size": 96', '"image_size": 128'))
        return evaluate, "does not match"
    if case == "predict path missing":
        return ["predict", str(model), str(tmp_path / "nope.png"), "-o", out], "nope.png"
    if case == "predict empty folder":
        (tmp_path / "none").mkdir()
        return ["predict", str(model), str(tmp_path / "none"), "-o", out], "no images found"
    if case == "unknown threshold name":
        return ["predict", str(model), str(first), "-o", out, "--threshold", "best"], "'best'"
    if case == "level out of range":
        return [*fit[:4], "--preset", "lite0", "--levels", "3", "12", "--image-size", "96", "--quiet"], "levels"
    if case == "variance out of range":
        return [*fit, "--variance", "1.5"], "variance"
    if case == "holdout out of range":
        return [*fit, "--holdout", "1.5"], "holdout"
    if case == "missing weights file":
        return [*fit, "--weights", f"file:{tmp_path / 'w.pth'}"], "w.pth"
    if case == "garbage weights file":
        (tmp_path / "w.pth").write_text("garbage")
        return [*fit, "--weights", f"file:{tmp_path / 'w.pth'}"], "w.pth"
    if case == "unknown backbone":
        return [*fit, "--backbone", "no_such_net", "--weights", "none"], "no_such_net"
    if case == "unknown weight source":
        return [*fit, "--weights", "ftp://x"], "ftp://x"
    if case == "batch size 0":
        return [*evaluate, "--batch-size", "0"], "batch_size must be at least 1"
    if case == "GPU that is not there":
        return [*fit, "--device", "cuda:99"], "'cuda:99'"
    if case == "unknown device":
        return [*evaluate, "--device", "gpu0"], "unknown device 'gpu0'"
    raise AssertionError(case)


BAD_INPUTS = [
    "no dataset root", "no categories in root", "root without -c", "unknown category", "no train/good",
    "empty train/good", "text file named .png", "zero-byte image", "truncated image", "float image out of range",
    "no test folder", "missing mask", "mask of another size", "corrupt mask", "no model folder", "config not JSON",
    "statistics missing", "config edited", "predict path missing", "predict empty folder", "unknown threshold name",
    "level out of range", "variance out of range", "holdout out of range", "missing weights file",
    "garbage weights file", "unknown backbone", "unknown weight source", "batch size 0", "GPU that is not there",
    "unknown device",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_matrix(case, dataset, fitted, tmp_path, capsys):
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(dataset, data)
    shutil.copytree(fitted, model)
    args, expected = damage(case, data, model, tmp_path)
    before = snapshot(tmp_path)
    assert expected in cli_error(args, capsys)
    assert not (tmp_path / "out").exists()  # nothing written
    assert {k: v for k, v in snapshot(tmp_path).items()} == before  # nothing of the user's changed


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_feature_extraction_from_threads_at_once_equals_one_at_a_time(runtime):
    """A served model scores requests from several threads; each pass stays apart on both runtimes
    (forward hooks once shared one output dict: the load test saw KeyErrors)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from gaussad.features import Backbone
    from gaussad.networks import LITE0_PACKAGE

    backbone = Backbone("tf_efficientnet_lite0", LITE0_PACKAGE, (2, 3, 5), 64, device="cpu", runtime=runtime)
    batches = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    alone = [backbone.extract(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(backbone.extract, batches))
    for one, other in zip(alone, together):
        assert sorted(one) == sorted(other) == [2, 3, 5]
        for level in one:
            torch.testing.assert_close(one[level], other[level], rtol=1e-5, atol=1e-6)
