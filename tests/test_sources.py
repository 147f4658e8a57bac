"""Tests for pipeline.data.sources on tiny fixtures in the real on-disk formats (IDX, CIFAR pickles, ImageFolder)."""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import struct
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import (
    FASHION_MNIST_CLASSES,
    SOURCES,
    SplitData,
    load_split,
    open_imagefolder,
    read_idx,
    source_options,
)

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, arr: np.ndarray, *, compress: bool) -> Path:
    """Write ``arr`` as IDX (magic 0x0000, type 0x08 = ubyte, ndim, big-endian dims), optionally gzipped."""
    assert arr.dtype == np.uint8
    payload = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_dir(root: Path, n_train: int = 12, n_test: int = 7, compress_train: bool = True) -> dict[str, np.ndarray]:
    """Tiny MNIST-layout folder: train as .gz, test raw (both forms occur in the wild)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n, compress in (("train", n_train, compress_train), ("t10k", n_test, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


@pytest.mark.parametrize("source", ["fashion_mnist", "mnist"])
def test_idx_reads_gz_and_raw(tmp_path: Path, source: str) -> None:
    arrays = make_idx_dir(tmp_path)
    train = load_split(source, tmp_path, "train")
    test = load_split(source, str(tmp_path), "test")
    assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (7, 28, 28, 1)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(test.images[..., 0], arrays["t10k_images"])
    np.testing.assert_array_equal(test.labels, arrays["t10k_labels"])
    assert train.source_files[0].endswith("train-images-idx3-ubyte.gz")
    assert test.source_files[1].endswith("t10k-labels-idx1-ubyte")
    expected = FASHION_MNIST_CLASSES if source == "fashion_mnist" else [str(d) for d in range(10)]
    assert train.classes == expected and len(train) == 12 and train.num_classes == 10


def test_idx_torchvision_raw_layout(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "FashionMNIST" / "raw")
    assert len(load_split("fashion_mnist", tmp_path, "test")) == 7


def test_read_idx_parses_header_dims(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte", arr, compress=True))
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 7  # writable copy, not a view of the file's bytes


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        load_split("fashion_mnist", tmp_path, "test")
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "prepare.root" in str(err.value)
    load_split("fashion_mnist", tmp_path, "train")  # the other split is intact


def test_idx_bad_magic_truncated_and_mismatched_counts(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        load_split("mnist", tmp_path, "test")
    images.write_bytes(good[:-5])  # truncated download: payload shorter than the header's dims
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*declares shape \(7, 28, 28\)"):
        load_split("mnist", tmp_path, "test")
    images.write_bytes(good)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8), compress=False)
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        load_split("mnist", tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(7, 10, np.uint8), compress=False)
    with pytest.raises(ValueError, match=r"labels span \[10, 10\]"):
        load_split("mnist", tmp_path, "test")


def test_idx_corrupt_gzip_names_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_split("fashion_mnist", tmp_path, "train")


# ---------------------------------------------------------------------------------------------- CIFAR


def _planar(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows in CIFAR's layout: R plane = offset + i, G = 100 + i, B = 200 + i for sample i."""
    rows = np.empty((n, 3, 1024), np.uint8)
    for i in range(n):
        rows[i] = np.array([offset + i, 100 + i, 200 + i], np.uint8)[:, None]
    return rows.reshape(n, 3072)


def dump_py2_style(obj: object, path: Path) -> None:
    """Pickle like the original CIFAR files: protocol 2, bytes keys, numpy arrays via ``numpy.core.multiarray``."""
    # Protocol 2 names globals as newline-terminated text, so the pre-numpy-2 module name can be swapped in.
    data = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_reconstruct" not in data or b"cnumpy.core.multiarray\n" in data
    path.write_bytes(data)


def make_cifar10(root: Path, per_batch: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    dump_py2_style(meta, folder / "batches.meta")
    for k in range(1, 6):
        batch = {b"batch_label": b"training batch", b"labels": [k, k + 1][:per_batch], b"data": _planar(per_batch, k)}
        dump_py2_style(batch, folder / f"data_batch_{k}")
    dump_py2_style({b"labels": [9, 0, 3], b"data": _planar(3, 50)}, folder / "test_batch")
    return folder


def make_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine{i:02d}".encode() for i in range(100)]
    coarse = [f"coarse{i:02d}".encode() for i in range(20)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": fine, b"coarse_label_names": coarse}, f)
    for split, n in (("train", 4), ("test", 2)):
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": [99, 0, 42, 7][:n],
                 b"coarse_labels": [19, 0, 5, 3][:n], b"data": _planar(n, 1)}  # fmt: skip
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_layout_and_roots(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    train = load_split("cifar10", tmp_path, "train")
    assert train.images.shape == (10, 32, 32, 3) and train.images.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(train.labels, [1, 2, 2, 3, 3, 4, 4, 5, 5, 6])
    # Channel-planar rows -> HWC: sample 0 of batch 1 is R=1, G=100, B=200 at every pixel.
    np.testing.assert_array_equal(train.images[0, 5, 7], [1, 100, 200])
    np.testing.assert_array_equal(train.images[1, 31, 0], [2, 101, 201])
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.source_files[0].endswith("data_batch_1") and train.source_files[-1].endswith("batches.meta")
    test = load_split("cifar10", folder, "test")  # root may be the batches folder itself
    np.testing.assert_array_equal(test.labels, [9, 0, 3])
    np.testing.assert_array_equal(test.images[2, 0, 0], [52, 102, 202])


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    train = load_split("cifar100", tmp_path, "train")
    assert train.images.shape == (4, 32, 32, 3) and len(train.classes) == 100
    np.testing.assert_array_equal(train.labels, [99, 0, 42, 7])
    assert train.classes[99] == "fine99"
    coarse = load_split("cifar100", tmp_path / "cifar-100-python", "test", label_type="coarse")
    np.testing.assert_array_equal(coarse.labels, [19, 0])
    assert coarse.classes == [f"coarse{i:02d}" for i in range(20)]


def test_cifar_wrong_keys_names_found_and_expected(tmp_path: Path) -> None:
    folder = make_cifar100(tmp_path)
    with open(folder / "test", "wb") as f:  # CIFAR-10-style keys in a CIFAR-100 file
        pickle.dump({b"data": _planar(2, 0), b"labels": [1, 2]}, f)
    with pytest.raises(ValueError, match=r"test: pickle lacks key\(s\) \['fine_labels'\]") as err:
        load_split("cifar100", tmp_path, "test")
    assert "found keys ['data', 'labels']" in str(err.value)


def test_cifar_bad_data_shape_and_labels(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 1000), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        load_split("cifar10", tmp_path, "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 10], b"data": _planar(2, 0)}, f)
    with pytest.raises(ValueError, match="names 10 classes"):
        load_split("cifar10", tmp_path, "test")


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):  # loading would call os.getcwd(): harmless, but proves globals are refused
            return (os.getcwd, ())

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": Evil(), b"data": _planar(1, 0)}, f)
    with pytest.raises(ValueError, match="refusing to load global"):
        load_split("cifar10", tmp_path, "test")


def test_cifar_missing_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        load_split("cifar10", tmp_path, "train")
    assert "data_batch_1" in str(err.value) and "cifar-10-batches-py" in str(err.value)


def test_cifar_download_uses_torchvision_only_when_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_cifar100(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        make_cifar100(Path(root))

    # A stand-in torchvision: no network, and no multi-second import of the real one.
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=None, CIFAR100=fake_cifar100)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    assert len(load_split("cifar100", tmp_path, "train", download=True)) == 4
    assert calls == [(str(tmp_path), True)]
    load_split("cifar100", tmp_path, "test", download=True)  # already there: no second download
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- ImageFolder

COLORS = {"cat": (200, 30, 30), "ant": (30, 200, 30), "dog": (30, 30, 200)}


def save_image(path: Path, color: tuple[int, ...] | int, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def make_imagefolder(root: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Classes ant/cat/dog, solid colours (exact through JPEG), PNG and JPEG mixed, one nested sub-folder."""
    for split in splits:
        for cls, color in COLORS.items():
            save_image(root / split / cls / "b.png", color)
            save_image(root / split / cls / "a.jpg", color)
        save_image(root / split / "dog" / "sub" / "c.jpeg", COLORS["dog"])
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()  # hidden folders are not classes
    return root


def make_tar(src: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return archive


def test_imagefolder_classes_order_and_pixels(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds")
    train = load_split("imagefolder", root, "train")
    assert train.classes == ["ant", "cat", "dog"]  # sorted, as torchvision
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2, 2])
    assert train.images.shape == (7, 6, 8, 3) and train.images.dtype == np.uint8
    names = [Path(f).relative_to(root).as_posix() for f in train.source_files]
    # torchvision order: per class, sorted (dirpath, filename); nested folders after the class folder's files.
    assert names == ["train/ant/a.jpg", "train/ant/b.png", "train/cat/a.jpg", "train/cat/b.png",
                     "train/dog/a.jpg", "train/dog/b.png", "train/dog/sub/c.jpeg"]  # fmt: skip
    for img, label in zip(train.images, train.labels, strict=True):
        expected = np.array(COLORS[train.classes[label]])
        assert np.abs(img.astype(int) - expected).max() <= 3  # JPEG: within a few levels of the solid colour
    assert train.skipped == 0


def test_imagefolder_tar_matches_directory(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds")
    flat = make_tar(root, tmp_path / "flat.tar.gz", ".")  # members ./train/...
    nested = make_tar(root, tmp_path / "nested.tgz", "cifar-ish")  # members cifar-ish/train/...
    ref = load_split("imagefolder", root, "test")
    for archive in (flat, nested):
        got = load_split("imagefolder", archive, "test")
        assert got.classes == ref.classes
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_array_equal(got.images, ref.images)
        assert got.source_files[0].startswith(f"{archive}::")
    # A directory holding the ImageFolder in one sub-folder (an extracted archive) works too.
    assert len(load_split("imagefolder", tmp_path, "train")) == 7


def test_imagefolder_test_falls_back_to_val(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", splits=("train", "val"))
    assert len(load_split("imagefolder", root, "test")) == 7
    archive = make_tar(root, tmp_path / "ds.tar.gz", "ds")
    assert len(load_split("imagefolder", archive, "test")) == 7
    with pytest.raises(FileNotFoundError, match=r"no test/ folder \(nor val/\)"):
        load_split("imagefolder", make_imagefolder(tmp_path / "only_train", splits=("train",)), "test")


def test_imagefolder_grayscale_modes(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    for split in ("train", "test"):
        save_image(root / split / "a" / "1.png", 10, mode="L")
        save_image(root / split / "b" / "1.png", 240, mode="L")
    gray = load_split("imagefolder", root, "train")
    assert gray.images.shape == (2, 6, 8, 1)  # all grayscale -> one channel
    np.testing.assert_array_equal(gray.images[:, 0, 0, 0], [10, 240])
    rgb = load_split("imagefolder", root, "train", mode="RGB")
    assert rgb.images.shape == (2, 6, 8, 3)
    save_image(root / "train" / "b" / "2.png", (240, 0, 0))  # one colour image: the split becomes RGB
    mixed = load_split("imagefolder", root, "train")
    assert mixed.images.shape == (3, 6, 8, 3)
    np.testing.assert_array_equal(mixed.images[0, 0, 0], [10, 10, 10])
    assert load_split("imagefolder", root, "train", mode="L").images.shape == (3, 6, 8, 1)


def test_imagefolder_size_mismatch_and_resize(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds")
    save_image(root / "train" / "cat" / "big.png", COLORS["cat"], size=(16, 16))
    with pytest.raises(ValueError, match=r"train/ differ in size \(2 sizes, the first 8x6 \(WxH\)\).*resize="):
        load_split("imagefolder", root, "train")  # in memory: one array needs one size
    stream = open_imagefolder(root, "train")  # what prepare streams: any sizes (rrc_flip views make one)
    assert sorted({img.shape for img, _ in stream}) == [(6, 8, 3), (16, 16, 3)]
    resized = load_split("imagefolder", root, "train", resize=5)
    assert resized.images.shape == (8, 5, 5, 3)


def test_imagefolder_corrupt_error_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "ds")
    bad = root / "test" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = root / "test" / "dog" / "trunc.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png.*on_corrupt='skip'"):
        load_split("imagefolder", root, "test")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources.imagefolder"):
        data = load_split("imagefolder", root, "test", on_corrupt="skip")
    assert data.skipped == 2 and len(data) == 7
    assert not any("broken" in f or "trunc" in f for f in data.source_files)
    assert "skipped 2 undecodable image(s)" in caplog.text and "broken.png" in caplog.text
    # Same in an archive: the message names the archive member.
    archive = make_tar(root, tmp_path / "ds.tar.gz", "ds")
    with pytest.raises(ValueError, match=r"ds\.tar\.gz::ds/test/cat/broken\.png"):
        load_split("imagefolder", archive, "test")


def test_streamed_imagefolder_shards_equal_in_memory_ones(tmp_path: Path) -> None:
    """prepare streams ImageFolders (decode while writing); the shards are those of the in-memory path."""
    import json

    import yaml

    from pipeline.data.shards import write_dataset
    from stages import prepare

    root = make_imagefolder(tmp_path / "ds")
    save_image(root / "train" / "ant" / "gray.png", 90, mode="L")  # mode None + a gray image: RGB for all
    params = {
        "prepare": {
            "name": "ds",
            "source": "imagefolder",
            "root": str(root),
            "shard_size": 3,
            "shuffle_seed": 1,
            "val": 0,
            "encode": "png",  # every image decoded and stored as PNG, like the in-memory reader's arrays
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "streamed")])
    splits = {}
    for split in ("train", "test"):
        d = load_split("imagefolder", root, split)
        perm = np.random.default_rng(1).permutation(len(d)) if split == "train" else np.arange(len(d))
        splits[split] = (d.images[perm], d.labels[perm])
    write_dataset(tmp_path / "memory", "ds", splits, d.classes, 3)
    a = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    b = json.loads((tmp_path / "memory" / "manifest.json").read_text())
    assert a == b and a["image_shape"] == [6, 8, 3] and a["splits"]["train"]["n"] == 8
    # limit and on_corrupt=skip: keys stay contiguous, the corrupt file is not a sample
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    params["prepare"].update(limit=6, options={"on_corrupt": "skip"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "limited")])
    m = json.loads((tmp_path / "limited" / "manifest.json").read_text())
    assert m["splits"]["train"]["n"] == 6 and m["splits"]["test"]["n"] == 6
    assert [(s["start"], s["stop"]) for s in m["splits"]["train"]["shards"]] == [(0, 3), (3, 6)]


def test_streamed_split_is_decoded_while_shards_are_written(tmp_path: Path) -> None:
    """Memory is one image, not the split: the first shard is on disk before the later images are decoded."""
    from pipeline.data.shards import write_split

    root = make_imagefolder(tmp_path / "ds")
    stream = open_imagefolder(root, "train")
    assert len(stream) == 7 and stream.classes == ["ant", "cat", "dog"]
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def watched():
        for k, sample in enumerate(stream):
            seen.append((k, (out / "train-000000.tar").exists()))
            yield sample

    entry, shape = write_split(out, "train", watched(), 2, 3)
    assert entry.n == 7 and shape == (6, 8, 3) and len(entry.shards) == 4
    assert seen[2] == (2, True)  # image 2 was decoded after shard 0 (images 0-1) was closed


def test_imagefolder_empty_class_names_it(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds")
    for split in ("train", "test"):
        (root / split / "emu").mkdir()
    with pytest.raises(ValueError, match=r"empty class folder\(s\) in train/: \['emu'\]"):
        load_split("imagefolder", root, "train")
    (root / "test" / "emu" / "readme.txt").write_text("x")  # only a non-image file: still empty
    with pytest.raises(ValueError, match=r"\['emu'\].*non-image files are ignored"):
        load_split("imagefolder", root, "test")
    archive = make_tar(root, tmp_path / "ds.tar.gz", ".")  # the empty folder survives as a directory member
    with pytest.raises(ValueError, match=r"empty class folder\(s\) in train/: \['emu'\]"):
        load_split("imagefolder", archive, "train")


def test_imagefolder_mismatched_classes_names_them(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds")
    (root / "test" / "ant").rename(root / "test" / "bee")
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=r"only in train/: \['ant'\]|only in test/: \['bee'\]") as err:
            load_split("imagefolder", root, split)
        assert "'ant'" in str(err.value) and "'bee'" in str(err.value)


def test_imagefolder_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a tar archive"):
        load_split("imagefolder", path, "train")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_split("imagefolder", tmp_path / "absent", "train")


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_split_specific() -> None:
    a = load_split("synthetic", None, "train", n=64, size=12, channels=3, num_classes=4, seed=3)
    b = load_split("synthetic", "/ignored", "train", n=64, size=12, channels=3, num_classes=4, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.shape == (64, 12, 12, 3) and a.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert np.bincount(a.labels).tolist() == [16] * 4
    test = load_split("synthetic", None, "test", n=64, size=12, channels=3, num_classes=4, seed=3)
    other = load_split("synthetic", None, "train", n=64, size=12, channels=3, num_classes=4, seed=4)
    assert not np.array_equal(a.images, test.images) and not np.array_equal(a.images, other.images)


def test_synthetic_is_learnable() -> None:
    """Nearest class mean, fitted on train, must beat chance (10%) by far on test: the classes carry signal."""
    train = load_split("synthetic", None, "train", n=500)
    test = load_split("synthetic", None, "test", n=500)
    x_tr = train.images.reshape(len(train), -1).astype(np.float32)
    x_te = test.images.reshape(len(test), -1).astype(np.float32)
    means = np.stack([x_tr[train.labels == k].mean(0) for k in range(10)])
    pred = ((x_te[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == test.labels).mean() > 0.6


# ---------------------------------------------------------------------------------------------- registry


def test_unknown_source_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown source 'cifar'; available: \['cifar10', 'cifar100'"):
        load_split("cifar", ".", "train")
    assert set(SOURCES) == {"fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "hf", "synthetic"}


def test_unknown_option_names_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['resise'\]; valid options: \['mode', 'on_corrupt'"):
        load_split("imagefolder", tmp_path, "train", resise=32)
    with pytest.raises(TypeError, match=r"valid options: \[\]"):
        load_split("fashion_mnist", tmp_path, "train", download=True)
    assert source_options("cifar100") == {"download": False, "label_type": "fine"}


def test_bad_split_and_option_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no split 'valid'; valid splits: \['train', 'test'\]"):
        load_split("synthetic", None, "valid")
    with pytest.raises(ValueError, match=r"on_corrupt='ignore' is invalid; valid values: \['error', 'skip'\]"):
        load_split("imagefolder", tmp_path, "train", on_corrupt="ignore")
    with pytest.raises(ValueError, match="channels=2"):
        load_split("synthetic", None, "train", channels=2)


def test_splitdata_validates() -> None:
    with pytest.raises(ValueError, match="uint8"):
        SplitData(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="labels span"):
        SplitData(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), ["a"])


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split() -> None:
    data = load_split("fashion_mnist", FASHION_ROOT, "test")
    assert data.images.shape == (10000, 28, 28, 1)
    assert np.bincount(data.labels).tolist() == [1000] * 10


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason=f"{CIFAR10_JPEG} absent")
def test_real_cifar10_jpeg_test_split() -> None:
    data = load_split("imagefolder", CIFAR10_JPEG, "test")
    assert data.images.shape == (10000, 32, 32, 3)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(data.labels).tolist() == [1000] * 10


def test_streamed_imagefolder_gets_a_stratified_validation_split(tmp_path: Path) -> None:
    """prepare.val on a streamed ImageFolder: one image of each class moves to `val`, none is decoded twice."""
    import yaml

    from pipeline.data.shards import load_manifest
    from stages import prepare

    root = make_imagefolder(tmp_path / "ds")
    params = {"prepare": {"name": "ds", "source": "imagefolder", "root": str(root), "shard_size": 3, "val": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")])
    m = load_manifest(tmp_path / "out")
    assert m.split("val").label_counts == (1, 1, 1) and m.split("train").label_counts == (1, 1, 2)
    assert m.split("test").n == 7
