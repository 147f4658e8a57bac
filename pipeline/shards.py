"""WebDataset shards and their manifest.

A split is written as `<split>-NNNNNN.tar` shards of `shard_size` consecutive samples. Each sample
is `{"__key__": "%08d" % index, "png": <PNG bytes>, "cls": <label>}`, so a sample's key *is* its row
in the logit store, and shard `j` covers rows `[j*shard_size, min((j+1)*shard_size, N))`: one
shard's logits are one contiguous block read.

`manifest.json` records N per split, the classes, every shard's index range and sha256, and the
train split's per-channel mean/std. It carries no timestamps, so re-running `prepare` on the same
source reproduces it byte for byte and the logit stores that fingerprint it stay valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
KEY_DIGITS = 8


def sample_key(index: int) -> str:
    """The WebDataset `__key__` of sample `index` (zero-padded so keys sort like indices)."""
    return f"{index:0{KEY_DIGITS}d}"


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (lossless, so teacher and student decode identical pixels)."""
    img = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)  # level 1: 3x faster, ~same size
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8."""
    arr = np.array(Image.open(io.BytesIO(data)))  # a writable copy: torch.from_numpy needs one
    return arr[:, :, None] if arr.ndim == 2 else arr


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's folder
    start: int  # first sample index (inclusive)
    stop: int  # last sample index (exclusive)
    sha256: str

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SplitManifest:
    n: int
    shards: tuple[ShardInfo, ...]
    label_counts: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a prepared data set, plus where it lives and its hash."""

    dataset: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C)
    shard_size: int
    mean: tuple[float, ...]  # per channel, train split, pixel values in [0, 1]
    std: tuple[float, ...]
    splits: dict[str, SplitManifest]
    root: Path  # folder holding manifest.json and the shards
    sha256: str  # of manifest.json's bytes: the data set's fingerprint

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitManifest:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in {self.root / MANIFEST}; splits: {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [str(self.root / s.path) for s in self.split(split).shards]

    def shard_for_url(self, split: str) -> dict[str, ShardInfo]:
        """Map absolute shard path -> ShardInfo, used by the loader to find a shard's row range."""
        return {str(self.root / s.path): s for s in self.split(split).shards}

    def iter_labels(self, split: str) -> np.ndarray:
        """All labels of a split in index order, (N,) int64 (reads every shard's `cls`)."""
        labels = np.empty(self.split(split).n, dtype=np.int64)
        for shard in self.split(split).shards:
            for key, _, label in iter_shard(self.root / shard.path, decode=False):
                labels[int(key)] = label
        return labels


def _to_jsonable(m: Manifest) -> dict[str, Any]:
    d = asdict(m)
    d.pop("root")
    d.pop("sha256")
    d["version"] = MANIFEST_VERSION
    return d


def load_manifest(root: str | Path) -> Manifest:
    """Parse `<root>/manifest.json`; a missing one names the stage that makes it."""
    root = Path(root)
    path = root / MANIFEST if root.is_dir() or not root.name.endswith(".json") else root
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run `dvc repro prepare` (or `python -m stages.prepare`) first")
    raw = path.read_bytes()
    d = json.loads(raw)
    if d.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {d.get('version')} != {MANIFEST_VERSION}; re-run prepare")
    splits = {
        name: SplitManifest(
            n=s["n"], shards=tuple(ShardInfo(**x) for x in s["shards"]), label_counts=tuple(s["label_counts"])
        )
        for name, s in d["splits"].items()
    }
    return Manifest(
        dataset=d["dataset"],
        classes=tuple(d["classes"]),
        image_shape=tuple(d["image_shape"]),
        shard_size=d["shard_size"],
        mean=tuple(d["mean"]),
        std=tuple(d["std"]),
        splits=splits,
        root=path.parent.resolve(),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def iter_shard(path: str | Path, decode: bool = True) -> Iterator[tuple[str, np.ndarray | bytes, int]]:
    """Yield `(key, image, label)` from one tar shard in file order (image decoded unless decode=False).

    Reads with webdataset's own tar grouping, so what we test is what the loader sees. A truncated
    or corrupt shard raises an error naming the shard and the last good key.
    """
    last = None
    try:
        for sample in tarfile_samples([{"url": str(path)}]):
            key = sample["__key__"]
            if "png" not in sample or "cls" not in sample:
                raise ValueError(f"sample {key} lacks png/cls (has {sorted(k for k in sample if k[0] != '_')})")
            label = int(sample["cls"])
            last = key
            yield key, decode_png(sample["png"]) if decode else sample["png"], label
    except Exception as e:  # tarfile.ReadError, zlib errors, ...
        raise ValueError(
            f"corrupt or truncated shard {path} after sample {last!r}: {e}; re-run `dvc repro prepare`"
        ) from e


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of (N, H, W, C) uint8 in [0, 1] units, computed in float64 blocks."""
    c = images.shape[-1]
    s = np.zeros(c)
    ss = np.zeros(c)
    n = 0
    for i in range(0, len(images), 10000):
        block = images[i : i + 10000].reshape(-1, c).astype(np.float64) / 255.0
        s += block.sum(0)
        ss += (block**2).sum(0)
        n += len(block)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, shard_size: int) -> SplitManifest:
    """Write one split as deterministic tar shards; returns its manifest entry."""
    n = len(images)
    shards = []
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    for j, start in enumerate(tqdm(range(0, n, shard_size), desc=f"prepare {split}", unit="shard", disable=None)):
        stop = min(start + shard_size, n)
        name = f"{split}-{j:06d}.tar"
        with open(out_dir / name, "wb") as f:
            # Fixed mtime/owner: identical inputs give identical bytes (and sha256) on every run.
            writer = wds.TarWriter(f, user="kdcache", group="kdcache", mtime=0)
            for i in range(start, stop):
                writer.write({"__key__": sample_key(i), "png": encode_png(images[i]), "cls": int(labels[i])})
            writer.close()
        shards.append(ShardInfo(path=name, start=start, stop=stop, sha256=sha256_file(out_dir / name)))
    return SplitManifest(n=n, shards=tuple(shards), label_counts=tuple(int(c) for c in counts))


def write_dataset(
    out_dir: str | Path,
    dataset: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    shard_size: int,
) -> Manifest:
    """Write all splits + manifest into `out_dir` atomically (a `.partial` folder renamed at the end).

    `splits` maps split name -> (images (N, H, W, C) uint8, labels (N,) int64). The first split
    named `train` (else the first one) provides the normalisation statistics.
    """
    out_dir = Path(out_dir)
    if shard_size <= 0:
        raise ValueError(f"prepare.shard_size must be positive, got {shard_size}")
    shapes = {name: imgs.shape[1:] for name, (imgs, _) in splits.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"splits have different image shapes {shapes}; set a resize option for the source")
    for name, (imgs, labels) in splits.items():
        if imgs.dtype != np.uint8 or imgs.ndim != 4:
            raise ValueError(f"split {name}: images must be (N, H, W, C) uint8, got {imgs.shape} {imgs.dtype}")
        if len(imgs) != len(labels):
            raise ValueError(f"split {name}: {len(imgs)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"split {name}: labels outside [0, {len(classes)}) for classes {classes}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats_split = "train" if "train" in splits else next(iter(splits))
    mean, std = _channel_stats(splits[stats_split][0])
    entries = {name: write_split(tmp, name, imgs, labels, shard_size) for name, (imgs, labels) in splits.items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "image_shape": list(next(iter(shapes.values()))),
        "shard_size": shard_size,
        "mean": mean,
        "std": std,
        "splits": {name: asdict(e) for name, e in entries.items()},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("wrote %s: %s", out_dir, {k: e.n for k, e in entries.items()})
    return load_manifest(out_dir)


def verify_shards(manifest: Manifest, split: str | None = None) -> None:
    """Check every shard's sha256 against the manifest (a changed shard names itself)."""
    for name in [split] if split else list(manifest.splits):
        for shard in manifest.split(name).shards:
            got = sha256_file(manifest.root / shard.path)
            if got != shard.sha256:
                raise ValueError(
                    f"shard {manifest.root / shard.path} has sha256 {got[:12]}..., manifest says "
                    f"{shard.sha256[:12]}...; the shards changed after prepare: re-run `dvc repro prepare`"
                )
