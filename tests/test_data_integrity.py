"""Trust nothing in a run directory: data fingerprints, split checks, model-vs-data checks, decompression bombs.

Unit tests use tiny image folders / IDX files in tmp_path; the run-directory tests (tier ``integration``) train a
one-epoch run of a few dozen 8x8 images (about a second each) and go through the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptnn.data import DataConfig, build_datasets
from adaptnn.data.fingerprint import fingerprint_changes
from adaptnn.errors import CheckpointError, ConfigError, DataError
from adaptnn.io import save_checkpoint
from adaptnn.models import create_model, model_spec
from adaptnn.runs.integrity import (
    check_model_data,
    check_resume_splits,
    check_splits,
    read_splits,
    split_changes,
)
from test_data import write_fashion, write_idx, write_image_tree

TREE = {"train": {"cat": 8, "dog": 8}, "test": {"cat": 4, "dog": 4}}


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="image_folder", root=str(root), val_size=4, **kw)


def stored_info(splits) -> dict:
    """``split_info()`` as it comes back from ``splits.json``."""
    return json.loads(json.dumps(splits.split_info()))


def add_images(directory: Path, count: int, gray: int = 200) -> None:
    for i in range(count):
        Image.new("RGB", (8, 8), (gray,) * 3).save(directory / f"added_{i}.png")


def write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` 8-bit gray pixels (one row of data: never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_stable_for_same_data(tmp_path):
    a, b = build_datasets(DataConfig(name="digits")), build_datasets(DataConfig(name="digits"))
    assert a.fingerprint == b.fingerprint and a.fingerprint["kind"] == "arrays"
    assert build_datasets(DataConfig(name="digits", seed=1)).fingerprint != a.fingerprint  # other train/test split
    write_image_tree(tmp_path, TREE)
    first = build_datasets(folder_cfg(tmp_path)).fingerprint
    assert build_datasets(folder_cfg(tmp_path)).fingerprint == first  # second build reads the decoded cache
    assert first["kind"] == "image_folder" and first["parts"]["train/cat"]["files"] == 8
    info = build_datasets(folder_cfg(tmp_path)).split_info()
    assert json.loads(json.dumps(info))["fingerprint"] == first  # recorded in splits.json


def test_folder_fingerprint_sees_added_files_not_mtimes(tmp_path):
    write_image_tree(tmp_path, TREE)
    before = build_datasets(folder_cfg(tmp_path)).fingerprint
    for path in (tmp_path / "train" / "cat").iterdir():
        os.utime(path, ns=(1, 1))  # touched (copied, restored from backup): same names and sizes
    assert build_datasets(folder_cfg(tmp_path)).fingerprint == before
    add_images(tmp_path / "train" / "dog", 1)
    after = build_datasets(folder_cfg(tmp_path)).fingerprint
    assert after != before
    assert fingerprint_changes(before, after) == ["1 file added to train/dog/ (8 -> 9)"]
    (tmp_path / "test" / "cat" / "0.png").unlink()
    (tmp_path / "test" / "bird").mkdir()
    add_images(tmp_path / "test" / "bird", 2)
    (tmp_path / "train" / "bird").mkdir()
    add_images(tmp_path / "train" / "bird", 2)
    changes = fingerprint_changes(before, build_datasets(folder_cfg(tmp_path)).fingerprint)
    assert "class folder test/bird/ added (2 files)" in changes
    assert "1 file removed from test/cat/ (4 -> 3)" in changes


def test_idx_fingerprint_sees_contents(tmp_path):
    write_fashion(tmp_path / "gz", gz=True)
    write_fashion(tmp_path / "plain", gz=False)
    gz = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "gz"), val_size=5)).fingerprint
    plain = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "plain"), val_size=5)).fingerprint
    assert gz == plain and gz["kind"] == "idx"  # the decoded arrays, named without .gz
    path = tmp_path / "plain" / "t10k-images-idx3-ubyte"
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    assert path.stat().st_size == 16 + images.size
    images[3, 4, 5] ^= 1  # one bit of one pixel, same file size
    write_idx(path, images)
    changed = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "plain"), val_size=5)).fingerprint
    assert changed != plain
    (change,) = fingerprint_changes(plain, changed)
    assert change.startswith("t10k-images-idx3-ubyte changed (sha256 ")


def test_cifar_fingerprint_is_the_batch_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        return pickle.dumps({"data": data, "labels": [i % 10 for i in range(n)]})

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch(4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    cfg = DataConfig(name="cifar10", root=str(tmp_path), val_size=4)
    first = build_datasets(cfg).fingerprint
    assert first["kind"] == "cifar_files" and len(first["parts"]) == 7
    assert build_datasets(cfg).fingerprint == first
    (folder / "data_batch_3").write_bytes(batch(4))
    (change,) = fingerprint_changes(first, build_datasets(cfg).fingerprint)
    assert change.startswith("data_batch_3 changed")


# ----------------------------------------------------------------------------- check_splits


def test_check_splits_refuses_grown_image_folder(tmp_path, caplog):
    """Repro (4) at the API level: three images added after training shift the validation split."""
    write_image_tree(tmp_path, TREE)
    stored = stored_info(build_datasets(folder_cfg(tmp_path)))
    assert check_splits(stored, build_datasets(folder_cfg(tmp_path)), run_dir="runs/x") == []
    add_images(tmp_path / "train" / "cat", 3)
    grown = build_datasets(folder_cfg(tmp_path))
    with pytest.raises(DataError) as info:
        check_splits(stored, grown, run_dir="runs/x")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the data of run runs/x changed since training: ")
    assert "3 files added to train/cat/ (8 -> 11)" in msg
    assert "train/val/test sizes were 12/4/8, now 15/4/8" in msg
    assert "the validation split would contain former training samples" in msg
    assert msg.endswith("pass --allow_data_change (allow_data_change=True) to proceed knowingly")
    with caplog.at_level(logging.WARNING, logger="adaptnn.runs.integrity"):
        changes = check_splits(stored, grown, allow_data_change=True, run_dir="runs/x")
    assert "3 files added to train/cat/ (8 -> 11)" in changes
    assert any("3 files added" in r.getMessage() for r in caplog.records)


def test_check_splits_names_each_kind_of_change(tmp_path):
    digits = build_datasets(DataConfig(name="digits"))
    stored = stored_info(digits)
    assert split_changes(stored, digits) == []
    other_seed = build_datasets(DataConfig(name="digits", seed=1))
    changes = split_changes(stored, other_seed)
    assert any(c.startswith("test changed") for c in changes)
    assert any("former training samples" in c for c in changes)
    renamed = dict(stored, class_names=[*stored["class_names"][:9], "nine"])
    assert split_changes(renamed, digits) == ["class names changed (removed ['nine'], added ['9'])"]
    assert split_changes(dict(stored, dataset="fashion_mnist"), digits) == [
        "the dataset was 'fashion_mnist', now 'digits'"
    ]
    assert split_changes(dict(stored, std=[0.5]), digits) == ["normalisation std was [0.5], now [0.376]"]
    legacy = {k: v for k, v in stored.items() if k != "fingerprint"}  # splits.json of older adaptnn
    assert split_changes(legacy, digits) == []
    assert [c for c in split_changes(legacy, other_seed) if "former training samples" in c]


def test_check_splits_same_count_but_other_files(tmp_path):
    write_image_tree(tmp_path, TREE)
    stored = stored_info(build_datasets(folder_cfg(tmp_path)))
    (tmp_path / "train" / "dog" / "3.png").rename(tmp_path / "train" / "dog" / "renamed.png")
    changes = split_changes(stored, build_datasets(folder_cfg(tmp_path)))
    assert changes == ["files of train/dog/ renamed, replaced or resized (still 8)"]  # same indices, other files


def test_check_resume_splits(tmp_path):
    write_image_tree(tmp_path / "data", TREE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert check_resume_splits(run_dir, build_datasets(folder_cfg(tmp_path / "data"))) == []  # no splits.json yet
    (run_dir / "splits.json").write_text(json.dumps(build_datasets(folder_cfg(tmp_path / "data")).split_info()))
    assert check_resume_splits(run_dir, build_datasets(folder_cfg(tmp_path / "data"))) == []
    reseeded = build_datasets(folder_cfg(tmp_path / "data", seed=3))
    assert check_resume_splits(run_dir, reseeded) == []  # another data config: the checkpoint's check reports it
    add_images(tmp_path / "data" / "train" / "dog", 3)
    with pytest.raises(DataError, match=r"3 files added to train/dog/"):
        check_resume_splits(run_dir, build_datasets(folder_cfg(tmp_path / "data")))
    assert check_resume_splits(run_dir, build_datasets(folder_cfg(tmp_path / "data")), allow_data_change=True)


# ----------------------------------------------------------------------------- read_splits


def test_read_splits_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"splits\.json is missing") as info:
        read_splits(tmp_path)
    assert str(tmp_path / "splits.json") in str(info.value)
    digits = build_datasets(DataConfig(name="digits"))
    good = stored_info(digits)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(good))
    assert read_splits(tmp_path) == good
    corrupt = {
        "{not json": "not valid JSON",
        json.dumps(good)[:-20]: "not valid JSON",
        "[1, 2]": "expected a JSON object",
        json.dumps(dict(good, val_indices=good["val_indices"][:-1])): "'val_indices' holds 143 indices",
        json.dumps(dict(good, val_indices=[-1] * 144)): "'val_indices'",
        json.dumps(dict(good, sizes={"train": 1})): "'sizes'",
        json.dumps({k: v for k, v in good.items() if k != "dataset"}): "'dataset'",
        json.dumps(dict(good, fingerprint=[1])): "'fingerprint'",
        json.dumps(good).replace("0.3053", "NaN"): "NaN",
    }
    for text, problem in corrupt.items():
        path.write_text(text)
        with pytest.raises(DataError) as info:
            read_splits(tmp_path)
        msg = str(info.value)
        assert str(path) in msg and problem in msg and "\n" not in msg
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="cannot read"):
        read_splits(tmp_path)


# ----------------------------------------------------------------------------- check_model_data


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"name": "mecnn_digits", "num_classes": 5}, "'mecnn_digits' predicts 5 classes but dataset 'digits' has 10"),
        ({"name": "mecnn_digits", "num_classes": 20}, "predicts 20 classes but dataset 'digits' has 10"),
        ({"name": "mecnn_cifar"}, "'mecnn_cifar' expects inputs shaped [3, 32, 32] but dataset 'digits' gives [1, 8"),
    ],
)  # fmt: skip
def test_check_model_data_names_both_sides(kwargs, says):
    digits = build_datasets(DataConfig(name="digits"))
    kwargs = dict(kwargs)
    model = create_model(kwargs.pop("name"), **kwargs)
    with pytest.raises(CheckpointError) as info:
        check_model_data(model, digits, checkpoint="runs/x/model.safetensors")
    msg = str(info.value)
    assert says in msg and "checkpoint runs/x/model.safetensors" in msg and "looks foreign" in msg
    with pytest.raises(ConfigError, match="set model.kwargs") as info:
        check_model_data(model, digits, built_from_config=True)
    assert says in str(info.value)
    check_model_data(create_model("mecnn_digits"), digits)  # fits: nothing raised


# ----------------------------------------------------------------------------- decompression bombs


@pytest.fixture
def pil_state():
    """PIL's limit and the warning filters must be exactly as before each bomb test."""
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    yield
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


def test_png_bomb_first_image_is_a_one_line_error(tmp_path, pil_state, recwarn):
    """Repro (7): the first image's header is read for the size; a bomb there was a traceback."""
    write_image_tree(tmp_path, TREE)
    write_png_header(tmp_path / "train" / "cat" / "0.png", 100_000, 100_000)  # 10^10 pixels in 225 bytes
    with pytest.raises(DataError) as info:
        build_datasets(folder_cfg(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "train" / "cat" / "0.png") in msg and "10,000,000,000 pixels" in msg and "\n" not in msg
    assert "decompression bomb" in msg
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("lazy", [False, True])
def test_png_bomb_between_warning_and_error_limits(tmp_path, monkeypatch, pil_state, recwarn, lazy):
    """Above PIL's limit but below twice it PIL only warns (and decoded it); now it is refused, never decoded."""
    write_image_tree(tmp_path, TREE)
    bomb = tmp_path / "train" / "dog" / "zz.png"
    write_png_header(bomb, 10_000, 10_000)  # 10^8 pixels: between 89.5M (warning) and 179M (error)
    if lazy:
        monkeypatch.setattr("adaptnn.data.folder.CACHE_MAX_IMAGES", 0)
        splits = build_datasets(folder_cfg(tmp_path, image_size=8, augment=False))
        with pytest.raises(DataError, match="100,000,000 pixels"):
            [splits.train[i] for i in range(len(splits.train))] + [splits.val[i] for i in range(len(splits.val))]
    else:
        with pytest.raises(DataError, match="100,000,000 pixels") as info:
            build_datasets(folder_cfg(tmp_path, image_size=8))
        assert str(bomb) in str(info.value)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixel_limit_follows_pil_setting(tmp_path, monkeypatch, pil_state):
    write_image_tree(tmp_path, TREE)  # 8x8 = 64 pixels each
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 is in PIL's warning range (40, 80]
        with pytest.raises(DataError, match=r"64 pixels, above the limit of 40 pixels"):
            build_datasets(folder_cfg(tmp_path))
        m.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 64 is above PIL's error limit 40
        with pytest.raises(DataError, match=r"64 pixels, above the limit of 20 pixels"):
            build_datasets(folder_cfg(tmp_path))
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user switched PIL's check off
        assert len(build_datasets(folder_cfg(tmp_path)).train) == 12


def test_png_bomb_via_cli_is_one_line(tmp_path, capsys, pil_state):
    from adaptnn.cli import main

    write_image_tree(tmp_path / "data", TREE)
    write_png_header(tmp_path / "data" / "train" / "cat" / "0.png", 100_000, 100_000)
    argv = ["train", "--data.name", "image_folder", "--data.root", str(tmp_path / "data"), "--run_dir"]
    assert main([*argv, str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "0.png is too large" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- run directories (CLI)

TRAIN = ["--data.val_size", "4", "--model.name", "mecnn_digits", "--model.kwargs", "{in_chans: 3, widths: [4,8,8,8]}",
         "--train.epochs", "1", "--train.batch_size", "4"]  # fmt: skip


def train_folder_run(tmp_path: Path) -> tuple[Path, Path]:
    """A one-epoch run on a 24-image folder (2 classes, 8x8 RGB): ``(data root, run dir)``."""
    from adaptnn.cli import main

    root, run_dir = tmp_path / "data", tmp_path / "run"
    write_image_tree(root, TREE)
    assert (
        main(["train", "--data.name", "image_folder", "--data.root", str(root), *TRAIN, "--run_dir", str(run_dir)]) == 0
    )
    return root, run_dir


@pytest.mark.integration
def test_calibrate_refuses_grown_image_folder(tmp_path, capsys):
    """Repro (4): three images added to the folder; calibrate fitted thresholds on former training images."""
    from adaptnn.cli import main

    root, run_dir = train_folder_run(tmp_path)
    assert main(["calibrate", str(run_dir), "--tolerance", "0.5"]) == 0
    add_images(root / "train" / "cat", 3)
    capsys.readouterr()
    assert main(["calibrate", str(run_dir), "--tolerance", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"the data of run {run_dir} changed since training" in err
    assert "3 files added to train/cat/" in err and "former training samples" in err and "--allow_data_change" in err
    assert main(["evaluate", str(run_dir), "--policies", "[]"]) == 2
    assert "changed since training" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize(
    "foreign, says",
    [
        ({"name": "mecnn_digits", "num_classes": 5}, "predicts 5 classes but dataset 'digits' has 10"),
        ({"name": "mecnn_digits", "num_classes": 20}, "predicts 20 classes but dataset 'digits' has 10"),
        ({"name": "mecnn_mnist"}, "expects inputs shaped [1, 28, 28] but dataset 'digits' gives [1, 8, 8]"),
    ],
)
def test_evaluate_refuses_foreign_checkpoint(tmp_path, capsys, foreign, says):
    """Repro (6): another run's checkpoint (other classes or input size) in a digits run."""
    from adaptnn.cli import main

    run_dir = tmp_path / "run"
    argv = ["train", "--data.name", "digits", "--data.val_size", "100", "--train.epochs", "1", "--run_dir"]
    assert main([*argv, str(run_dir)]) == 0
    foreign = dict(foreign)
    model = create_model(foreign.pop("name"), **foreign)
    save_checkpoint(run_dir / "model.safetensors", model, {"model_spec": model_spec(model)})
    capsys.readouterr()
    for command in (["calibrate", str(run_dir)], ["evaluate", str(run_dir), "--policies", "[]"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert says in err and "looks foreign" in err and str(run_dir / "model.safetensors") in err
        assert "Traceback" not in err and not (run_dir / "report.json").exists()


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_splits_json_fails_before_work(tmp_path, capsys, monkeypatch, damage):
    """Repro (7): a missing splits.json was a traceback after evaluating everything; now one line, at once."""
    from adaptnn.cli import main

    _root, run_dir = train_folder_run(tmp_path)
    assert main(["calibrate", str(run_dir), "--tolerance", "0.5"]) == 0
    if damage == "missing":
        (run_dir / "splits.json").unlink()
    else:
        (run_dir / "splits.json").write_text('{"dataset": "image_folder", "sizes": ')

    def no_work(*args, **kwargs):
        raise AssertionError("data loaded although splits.json is unusable")

    monkeypatch.setattr("adaptnn.data.splits.SOURCES", {name: no_work for name in ("image_folder",)})
    capsys.readouterr()
    for command in (["evaluate", str(run_dir), "--policies", "[]"], ["calibrate", str(run_dir)]):
        start = time.perf_counter()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert time.perf_counter() - start < 5
        assert str(run_dir / "splits.json") in err and "Traceback" not in err
        assert ("is missing" if damage == "missing" else "is corrupt") in err
