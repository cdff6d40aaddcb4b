"""Tests of adaptnn.data: splits, transforms, IDX parsing, CIFAR/Fashion-MNIST loading, image folders."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptnn.data import (
    ArrayDataset,
    DataConfig,
    DataSplits,
    ImageFolderDataset,
    build_datasets,
    carve_validation,
    list_datasets,
    read_idx,
)
from adaptnn.data import folder as folder_mod
from adaptnn.data import sources as sources_mod
from adaptnn.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- helpers


def unnormalise(x: torch.Tensor, splits: DataSplits) -> torch.Tensor:
    mean = torch.tensor(splits.mean).view(-1, 1, 1)
    std = torch.tensor(splits.std).view(-1, 1, 1)
    return x * std + mean


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends with .gz)."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_fashion(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)


def write_image_tree(root: Path, layout: dict[str, dict[str, int]], size: int = 8) -> None:
    """layout: split -> class -> number of images; class k is filled with gray value 40 * (k + 1)."""
    for split, classes in layout.items():
        for k, (name, count) in enumerate(sorted(classes.items())):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (size, size), (40 * (k + 1),) * 3).save(d / f"{i}.png")


TREE = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return build_datasets(DataConfig(name="digits"))


# ----------------------------------------------------------------------------- config


def test_list_datasets():
    assert list_datasets() == ["digits", "fashion_mnist", "cifar10", "cifar100", "image_folder"]


def test_unknown_name_suggests_close_match():
    with pytest.raises(ConfigError, match=r"'digits'.*") as info:
        build_datasets(DataConfig(name="digit"))
    assert "fashion_mnist" in str(info.value) and "image_folder" in str(info.value)
    with pytest.raises(ConfigError, match="cifar10"):
        DataConfig(name="cifar-10")


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_val_size_form(bad):
    with pytest.raises(ConfigError):
        DataConfig(val_size=bad)


@pytest.mark.parametrize("bad", [1437, 5000, 0.0001])
def test_val_size_out_of_range_for_digits(bad):
    # digits has 1437 training samples: all of them (or more) or a fraction rounding to 0 is an error
    with pytest.raises(ConfigError, match="val_size"):
        build_datasets(DataConfig(val_size=bad))


def test_other_config_checks():
    with pytest.raises(ConfigError):
        DataConfig(seed=-1)
    with pytest.raises(ConfigError):
        DataConfig(image_size=0)
    with pytest.raises(ConfigError):
        build_datasets({"name": "digits"})  # type: ignore[arg-type]
    assert DataConfig(root=Path("/x")).root == "/x"


def test_carve_validation_counts():
    train, val = carve_validation(100, 0.25, seed=1)
    assert len(val) == 25 and len(train) == 75
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert list(val) == sorted(val) and list(train) == sorted(train)
    assert len(carve_validation(100, 7, seed=1)[1]) == 7
    assert len(carve_validation(100, 7.0, seed=1)[1]) == 7  # whole float >= 1 is a count
    with pytest.raises(ConfigError, match="empty"):
        carve_validation(10, 0.04, seed=1)  # rounds to 0 samples
    with pytest.raises(ConfigError):
        carve_validation(10, 10, seed=1)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_metadata(digits):
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    assert digits.input_size == (1, 8, 8)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1293, 144, 360)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    x, y = digits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and type(y) is int and 0 <= y < 10
    loader = torch.utils.data.DataLoader(digits.train, batch_size=16)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 1, 8, 8) and yb.dtype == torch.int64


def test_digits_normalisation(digits):
    xs = torch.stack([digits.test[i][0] for i in range(len(digits.test))])
    assert abs(xs.mean().item()) < 0.1 and 0.85 < xs.std().item() < 1.15
    raw = unnormalise(xs, digits)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5  # pixel values 0..16 scaled to [0, 1]


def test_val_split_disjoint_and_complete(digits):
    train_idx = set(digits.train.indices.tolist())
    val_idx = set(digits.val_indices)
    assert not train_idx & val_idx
    assert train_idx | val_idx == set(range(1437))
    assert digits.val_indices == sorted(digits.val_indices)
    assert digits.val.indices.tolist() == digits.val_indices


def test_split_deterministic_per_seed(digits):
    again = build_datasets(DataConfig(name="digits"))
    assert again.val_indices == digits.val_indices
    assert torch.equal(again.test[5][0], digits.test[5][0])
    other = build_datasets(DataConfig(name="digits", seed=1))
    assert other.val_indices != digits.val_indices
    first = [torch.stack([s.test[i][0] for i in range(20)]) for s in (digits, other)]
    assert not torch.equal(*first)  # the seed also changes the digits train/test split
    counts = np.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20% of ~180 per class


def test_val_uses_eval_transforms_and_train_augments(digits):
    assert torch.equal(digits.val[3][0], digits.val[3][0])
    assert torch.equal(digits.test[3][0], digits.test[3][0])
    reads = [digits.train[0][0] for _ in range(30)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    # the val sample is the eval-transformed training image at val_indices[k]
    plain = build_datasets(DataConfig(name="digits", augment=False))
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    base = plain.val.images[plain.val_indices[4]]
    assert torch.allclose(unnormalise(plain.val[4][0], plain), base, atol=1e-5)
    assert plain.val[4][1] == int(plain.val.labels[4])


def test_split_info_is_json(digits):
    info = json.loads(json.dumps(digits.split_info()))
    assert info["dataset"] == "digits" and info["seed"] == 0
    assert info["sizes"] == {"train": 1293, "val": 144, "test": 360}
    assert info["val_indices"] == digits.val_indices
    assert info["fingerprint"] == digits.fingerprint and info["fingerprint"]["kind"] == "arrays"


def test_array_dataset_checks_and_indexing():
    ds = ArrayDataset(torch.zeros(4, 1, 2, 2), [0, 1, 2, 3], indices=[1, 3])
    assert len(ds) == 2 and ds[-1][1] == 3
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(4, 2, 2), [0, 1, 2, 3])


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("name", ["a-idx3-ubyte.gz", "a-idx3-ubyte"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    out = read_idx(tmp_path / name, expected_magic=2051)
    assert out.dtype == np.uint8 and np.array_equal(out, array)


def test_idx_corrupt_files(tmp_path):
    array = np.zeros((5, 4, 3), dtype=np.uint8)
    raw = struct.pack(">IIII", 2051, 5, 4, 3) + array.tobytes()
    cases = {
        "short.gz": gzip.compress(raw[:-7]),  # data shorter than the header says
        "long": raw + b"\0",
        "header": raw[:10],
        "cut.gz": gzip.compress(raw)[:-12],  # truncated gzip stream
        "notgz.gz": b"this is not gzip data",
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_idx(tmp_path / name)
    write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "labels", expected_magic=2051)
    with pytest.raises(DataError):
        read_idx(tmp_path / "missing.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_root(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    splits = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=5))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.input_size == (1, 28, 28) and splits.num_classes == 10
    assert splits.class_names[0] == "T-shirt/top"
    x, y = splits.test[3]
    assert x.shape == (1, 28, 28) and y == 3
    raw = read_idx(tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}")
    assert torch.allclose(unnormalise(x, splits)[0] * 255, torch.from_numpy(raw[3]).float(), atol=1e-3)


def test_fashion_default_location(tmp_path, monkeypatch):
    """Loads Debian's copy when installed, else the same code path on synthetic files."""
    monkeypatch.setattr(sources_mod, "DEFAULT_DOWNLOAD_ROOT", tmp_path / "cache")
    if sources_mod.DEBIAN_FASHION_DIR.is_dir():
        splits = build_datasets(DataConfig(name="fashion_mnist"))
        assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    else:
        write_fashion(tmp_path / "debian")
        monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_DIR", tmp_path / "debian")
        splits = build_datasets(DataConfig(name="fashion_mnist", val_size=0.25))
        assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.input_size == (1, 28, 28)


def test_fashion_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_DIR", tmp_path / "nope")
    monkeypatch.setattr(sources_mod, "DEFAULT_DOWNLOAD_ROOT", tmp_path / "cache")
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(name="fashion_mnist"))
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "root=" in msg and "download=True" in msg
    assert str(tmp_path / "nope") in msg
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty")))


def test_fashion_count_mismatch_and_corruption(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="labels"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=5))
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=5))


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_files(tmp_path, name):
    with pytest.raises(DataError, match="cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"):
        build_datasets(DataConfig(name=name, root=str(tmp_path)))


def test_cifar10_synthetic(tmp_path, monkeypatch):
    """Tiny files in torchvision's format (its md5 check is bypassed): layout and labels survive."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def batch(n: int, first_label: int) -> dict:
        data = np.zeros((n, 3, 32, 32), np.uint8)
        data[:, 0], data[:, 1], data[:, 2] = 10, 20, 30  # R, G, B planes
        return {"data": data.reshape(n, -1), "labels": [(first_label + i) % 10 for i in range(n)]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(4, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(6, 0)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    splits = build_datasets(DataConfig(name="cifar10", root=str(folder), val_size=4))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 6)
    assert splits.input_size == (3, 32, 32) and splits.class_names[3] == "c3"
    x, y = splits.test[2]
    assert y == 2
    rgb = (unnormalise(x, splits) * 255).mean(dim=(1, 2))
    assert torch.allclose(rgb, torch.tensor([10.0, 20.0, 30.0]), atol=1e-3)


# ----------------------------------------------------------------------------- image folder


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="image_folder", root=str(root), val_size=1, **kw)


def test_image_folder_and_cache(tmp_path, monkeypatch):
    write_image_tree(tmp_path, TREE)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8), (40,) * 3).save(tmp_path / "train" / "cat" / "UPPER.PNG")
    splits = build_datasets(folder_cfg(tmp_path))
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.input_size == (3, 8, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 1, 4)
    assert splits.test.labels.tolist() == [0, 0, 1, 1]
    for i, gray in [(0, 40), (3, 80)]:
        x, _ = splits.test[i]
        assert torch.allclose(unnormalise(x, splits) * 255, torch.full((3, 8, 8), float(gray)), atol=1e-3)
    caches = list((tmp_path / ".adaptnn_cache").glob("*.npy"))
    assert len(caches) == 1

    # unchanged tree: the cache is used, nothing is decoded
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(folder_mod, "_decode_all", no_decode)
        again = build_datasets(folder_cfg(tmp_path))
    assert torch.equal(again.test[3][0], splits.test[3][0])

    # a changed tree rebuilds the cache and removes the stale one
    Image.new("RGB", (8, 8), (80,) * 3).save(tmp_path / "train" / "dog" / "new.png")
    grown = build_datasets(folder_cfg(tmp_path))
    assert len(grown.train) + len(grown.val) == 8
    new_caches = list((tmp_path / ".adaptnn_cache").glob("*.npy"))
    assert len(new_caches) == 1 and new_caches != caches


def test_image_folder_lazy_matches_cache(tmp_path, monkeypatch):
    write_image_tree(tmp_path, TREE)
    cached = build_datasets(folder_cfg(tmp_path, augment=False))
    monkeypatch.setattr(folder_mod, "CACHE_MAX_IMAGES", 0)
    lazy = build_datasets(folder_cfg(tmp_path, augment=False))
    assert isinstance(lazy.train, ImageFolderDataset) and isinstance(cached.train, ArrayDataset)
    for a, b in [(lazy.train, cached.train), (lazy.val, cached.val), (lazy.test, cached.test)]:
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_image_folder_unwritable_root_skips_cache(tmp_path, caplog):
    write_image_tree(tmp_path, TREE)
    (tmp_path / ".adaptnn_cache").write_text("a file where the cache directory would go")
    with caplog.at_level(logging.INFO, logger="adaptnn.data"):
        splits = build_datasets(folder_cfg(tmp_path))
    assert len(splits.test) == 4
    assert any("not caching" in r.getMessage() for r in caplog.records)


def test_image_folder_sizes_and_resize(tmp_path, monkeypatch):
    write_image_tree(tmp_path, TREE)
    Image.new("L", (10, 12), 7).save(tmp_path / "train" / "cat" / "odd.png")  # grayscale, other size
    with pytest.raises(DataError, match="image_size"):
        build_datasets(folder_cfg(tmp_path))
    splits = build_datasets(folder_cfg(tmp_path, image_size=6))
    assert splits.input_size == (3, 6, 6) and splits.train[0][0].shape == (3, 6, 6)
    monkeypatch.setattr(folder_mod, "CACHE_MAX_IMAGES", 0)
    lazy = build_datasets(folder_cfg(tmp_path, augment=False))
    with pytest.raises(DataError, match="odd.png"):
        [lazy.train[i] for i in range(len(lazy.train))] + [lazy.val[0]]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError):
        build_datasets(DataConfig(name="image_folder"))
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(folder_cfg(tmp_path / "missing"))
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        build_datasets(folder_cfg(tmp_path))  # empty root
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        build_datasets(folder_cfg(tmp_path))
    write_image_tree(tmp_path, {"train": TREE["train"]})
    with pytest.raises(DataError, match=str(tmp_path / "test")):
        build_datasets(folder_cfg(tmp_path))  # missing test dir
    write_image_tree(tmp_path, {"test": {"cat": 1, "bird": 1}})
    with pytest.raises(DataError, match=r"only in train: \['dog'\].*only in test: \['bird'\]"):
        build_datasets(folder_cfg(tmp_path))
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "train" / "bird")):
        build_datasets(folder_cfg(tmp_path))  # class folder without images
