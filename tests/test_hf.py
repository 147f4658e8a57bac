"""`prepare.source: hf`: Hugging Face datasets on disk (save_to_disk folders, Parquet files), streamed into shards.

Golden reference: the same images as an ImageFolder, prepared by the ImageFolder path, give the same manifest (and
so byte-identical shards: the manifest holds every shard's sha256).
"""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

datasets = pytest.importorskip("datasets")
import pyarrow as pa  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.data.shards import write_split  # noqa: E402
from pipeline.data.sources import OptionError, load_split  # noqa: E402
from pipeline.data.sources.hf import open_hf_split  # noqa: E402
from pipeline.errors import InputError  # noqa: E402

CLASSES = ["ant", "cat", "dog"]


def png(rng: np.random.Generator, size: tuple[int, int] = (6, 8), mode: str = "RGB") -> bytes:
    """A noise image (PNG is lossless, so every pixel is checked exactly)."""
    shape = (*size, 3) if mode == "RGB" else size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def make_pair(tmp: Path, counts: dict[str, int]) -> tuple[Path, datasets.DatasetDict]:
    """The same images twice: an ImageFolder (root/<split>/<class>/<i>.png) and a DatasetDict in ImageFolder order."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in counts.items():
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            for i in range(n):
                data = png(rng)
                path = tmp / "folder" / split / cls / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                images.append({"bytes": data, "path": None})
                labels.append(label)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return tmp / "folder", datasets.DatasetDict(splits)


def run_prepare(tmp: Path, name: str, prepare: dict) -> dict:
    from stages import prepare as stage

    params = tmp / f"{name}.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"name": "ds", "shard_size": 4, "shuffle_seed": 1, **prepare}}))
    stage.main(["--params", str(params), "--out", str(tmp / name)])
    return json.loads((tmp / name / "manifest.json").read_text())


def test_hf_dataset_shards_equal_the_imagefolder_ones(tmp_path: Path) -> None:
    """save_to_disk (DatasetDict), Parquet files and the ImageFolder of the same images: one manifest, one set of
    shard hashes, with the same shuffle of the train split."""
    folder, dd = make_pair(tmp_path, {"train": 5, "test": 2})
    dd.save_to_disk(str(tmp_path / "saved"))
    for split, ds in dd.items():  # a Hub snapshot's layout: data/<split>-00000-of-00001.parquet
        ds.to_parquet(str(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet"))
    reference = run_prepare(tmp_path, "folder_shards", {"source": "imagefolder", "root": str(folder), "encode": "png"})
    assert reference["splits"]["train"]["n"] + reference["splits"]["val"]["n"] == 15 and reference["classes"] == CLASSES
    for root in ("saved", "pq"):
        got = run_prepare(tmp_path, f"{root}_shards", {"source": "hf", "root": str(tmp_path / root)})
        assert got == reference, root
    # One Dataset's save_to_disk folder and one Parquet file are one split each: here, kdcache's train split.
    dd["train"].save_to_disk(str(tmp_path / "one"))
    one = run_prepare(tmp_path, "one_shards", {"source": "hf", "root": str(tmp_path / "one"), "splits": ["train"]})
    assert one["splits"]["train"] == reference["splits"]["train"]
    single = tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"
    one_pq = run_prepare(tmp_path, "pq1_shards", {"source": "hf", "root": str(single), "splits": ["train"]})
    assert one_pq["splits"]["train"] == reference["splits"]["train"]


def test_split_names_columns_and_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = {"img": [{"bytes": png(rng, (4, 4), "L"), "path": None} for _ in range(6)], "y": [0, 2, 1, 2, 0, 1]}
    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.Value("int64"), "note": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict({**rows, "note": ["x"] * 6}, features=features)
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0, 1, 2])})  # labels 0..2 / 0..2
    dd.save_to_disk(str(tmp_path / "dd"))
    # No ClassLabel: classes are 0..max label of any split; no "label" column: name it.
    with pytest.raises(InputError, match=r"no label column among \{'img': 'Image', 'y': 'Value', 'note': 'Value'\}"):
        load_split("hf", tmp_path / "dd", "train")
    test = load_split("hf", tmp_path / "dd", "test", label_column="y")  # test falls back to validation
    assert test.classes == ["0", "1", "2"] and list(test.labels) == [0, 2, 1] and test.images.shape == (3, 4, 4, 1)
    mapped = load_split("hf", tmp_path / "dd", "test", label_column="y", split_names={"test": "train"})
    assert len(mapped) == 6
    with pytest.raises(InputError, match=r"no split 'tset' .* splits: \['train', 'validation'\].*split_names"):
        load_split("hf", tmp_path / "dd", "test", label_column="y", split_names={"test": "tset"})


def test_bad_columns_and_labels_name_the_column_and_the_fix(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = [{"bytes": png(rng, (4, 4)), "path": None} for _ in range(4)]
    base = {"image": datasets.Image()}

    def save(name: str, columns: dict, features: dict) -> Path:
        path = tmp_path / name
        datasets.Dataset.from_dict(
            {"image": images, **columns}, features=datasets.Features({**base, **features})
        ).to_parquet(str(path / "train.parquet"))
        return path

    strings = save("strings", {"label": ["a", "b", "a", "b"]}, {"label": datasets.Value("string")})
    with pytest.raises(InputError, match=r"label column 'label' holds string values .*class_encode_column\('label'\)"):
        load_split("hf", strings, "train")
    floats = save("floats", {"label": [0.0, 1.0, 0.0, 1.0]}, {"label": datasets.Value("float32")})
    with pytest.raises(InputError, match=r"label column 'label' holds float values"):
        load_split("hf", floats, "train")
    unlabelled = save("unlabelled", {"label": [0, -1, 1, -1]}, {"label": datasets.Value("int64")})
    with pytest.raises(InputError, match=r"label -1 at row 1 .*unlabelled rows.*split_names"):
        load_split("hf", unlabelled, "train")
    two = save(
        "two",
        {"fine": [0, 1, 2, 3], "coarse": [0, 0, 1, 1]},
        {"fine": datasets.ClassLabel(num_classes=4), "coarse": datasets.ClassLabel(num_classes=2)},
    )
    with pytest.raises(InputError, match=r"2 candidate label columns \['fine', 'coarse'\].*label_column: fine"):
        load_split("hf", two, "train")
    coarse = load_split("hf", two, "train", label_column="coarse")
    assert coarse.classes == ["0", "1"] and list(coarse.labels) == [0, 0, 1, 1]  # ClassLabel(num_classes=2) names
    with pytest.raises(
        InputError, match=r"no column 'picture' \(option image_column\); columns: .*image_column: image"
    ):
        load_split("hf", two, "train", image_column="picture", label_column="fine")
    with pytest.raises(InputError, match=r"column 'fine' \(ClassLabel\) does not hold images"):
        load_split("hf", two, "train", image_column="fine", label_column="coarse")
    with pytest.raises(FileNotFoundError, match=r"neither a `save_to_disk` folder .* nor a folder of .parquet"):
        load_split("hf", _empty(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        load_split("hf", tmp_path / "absent", "train")
    with pytest.raises(ConfigError, match=r"window_mb=0 is invalid"):
        load_split("hf", two, "train", label_column="fine", window_mb=0)
    for bad in ({"split_names": ["test"]}, {"mode": "CMYK"}, {"resize": 0}, {"window_mb": -1}):  # all OptionErrors
        with pytest.raises(OptionError, match=r"option \w+=.* is invalid"):
            load_split("hf", two, "train", label_column="fine", **bad)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['label'\].*'label_column'"):
        load_split("hf", two, "train", label="fine")


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no data here")
    return tmp / "empty"


def test_gray_and_colour_rows_need_a_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = [{"bytes": png(rng, (4, 4), mode), "path": None} for mode in ("L", "L", "RGB")]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 0, 0]}, features=features).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(InputError, match=r"row 2 of column 'image' is colour but row 0 is grayscale.*mode: RGB"):
        load_split("hf", tmp_path / "d", "train")
    rgb = load_split("hf", tmp_path / "d", "train", mode="RGB", resize=8)
    assert rgb.images.shape == (3, 8, 8, 3)


def _first_shard_before_last_row(stream, out: Path, n: int) -> bool:
    """Shard the stream; whether shard 0 was on disk when the stream yielded its last row."""
    seen = []

    def watched():
        for k, sample in enumerate(stream):
            if k == n - 1:
                seen.append((out / "train-000000.tar").exists())
            yield sample

    entry, shape = write_split(out, "train", watched(), 100, 2)
    assert entry.n == n and shape == (32, 32, 3)
    return seen == [True]


def _stream_peaks(stream) -> tuple[int, int]:
    """Peak memory while the whole stream is read: Python objects (tracemalloc) and Arrow's allocator (which
    tracemalloc does not see; sampled at every row), both above where they started."""
    arrow_base, arrow_peak = pa.total_allocated_bytes(), 0
    tracemalloc.start()
    for _ in stream:
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, arrow_peak


def test_streaming_holds_a_window_not_the_split(tmp_path: Path) -> None:
    """Constant memory: the first shard is on disk before the last rows are fetched, and the memory peak while the
    whole split streams (Python objects and Arrow buffers alike) is a small part of the split's bytes."""
    rng = np.random.default_rng(4)
    n = 800
    images = [{"bytes": png(rng, (32, 32)), "path": None} for _ in range(n)]  # noise: ~3 KB each, ~2.5 MB in all
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)
    total = sum(len(im["bytes"]) for im in images)
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"), batch_size=50)  # row groups of 50 rows
    ds.save_to_disk(str(tmp_path / "saved"))
    del images, ds
    for root in ("pq", "saved"):
        stream = open_hf_split(tmp_path / root, "train", window_mb=1 / 64)  # 16 KB
        stream.permute(0)  # the costly order: every window needs rows from everywhere
        assert 2 <= stream.window_rows() <= 8
        out = tmp_path / f"out_{root}"
        out.mkdir()
        assert _first_shard_before_last_row(stream, out, n)
        peak, arrow = _stream_peaks(stream)
        # Arrow allocates in pool-sized blocks (~0.3 MB here): its peak sits near total / 8, so allow total / 5
        assert peak < total / 8 and arrow < total / 5, (root, peak, arrow, total)
    # The measure can fail: decoding the split into memory holds every image.
    tracemalloc.start()
    data = load_split("hf", tmp_path / "pq", "train")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(data) == n and peak > total
