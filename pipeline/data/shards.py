"""WebDataset shards and their manifest.

A split is written as `<split>-NNNNNN.tar` shards of `shard_size` consecutive samples. Each sample
is `{"__key__": "%08d" % index, "png" | "jpg": <image bytes>, "cls": <label>}` (a lossless PNG, or a source's
own JPEG bytes kept as they were: `prepare.encode`), so a sample's key *is* its row
in the logit store, and shard `j` covers rows `[j*shard_size, min((j+1)*shard_size, N))`: one
shard's logits are one contiguous block read.

`manifest.json` records N per split, the classes, every shard's index range and sha256, and the
train split's per-channel mean/std. Images may differ in size (a source's own JPEGs): the manifest's
`image_shape` then has null height/width and each such split lists its (height, width) per sample in
`<split>-sizes.npy` (sha256 in the manifest). It carries no timestamps, so re-running `prepare` on the same
source reproduces it byte for byte and the logit stores that fingerprint it stay valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from pipeline.data.tario import IMAGE_EXTS, decode_image, encode_png, tar_samples
from pipeline.errors import InputError, UserError
from pipeline.layout import partial_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
KEY_DIGITS = 8


class ShardError(UserError, ValueError):
    """A tar shard that does not hold what the manifest says (missing, corrupt, truncated, reordered)."""


class UnknownSplitError(ShardError, KeyError):
    """A split the manifest does not have (a KeyError too: `manifest.split(name)` is a lookup)."""


_REPREPARE = "re-run `dvc repro prepare` (or `dvc pull`)"


def sample_key(index: int) -> str:
    """The WebDataset `__key__` of sample `index` (zero-padded so keys sort like indices)."""
    return f"{index:0{KEY_DIGITS}d}"


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


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
    sizes: SizesInfo | None = None  # per-sample (height, width), when the split's images differ in size


@dataclass(frozen=True)
class SizesInfo:
    path: str  # `<split>-sizes.npy` beside the manifest: (N, 2) uint32 (height, width) per sample
    sha256: str


@dataclass(frozen=True)
class Encoded:
    """A source image kept as its own encoded bytes (`prepare.encode: keep`), with its decoded pixels.

    `image` (H, W, C) uint8 is what the loaders will decode from `data` (checked by the source), used here for
    the channel statistics and the shape.
    """

    data: bytes
    ext: str  # one of tario.IMAGE_EXTS
    image: np.ndarray


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a prepared data set, plus where it lives and its hash."""

    dataset: str
    classes: tuple[str, ...]
    image_shape: tuple[int | None, int | None, int]  # (H, W, C); H, W None when the images differ in size
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
            raise UnknownSplitError(f"split '{name}' not in {self.root / MANIFEST}; splits: {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [str(self.root / s.path) for s in self.split(split).shards]

    def shard_for_url(self, split: str) -> dict[str, ShardInfo]:
        """Map absolute shard path -> ShardInfo, used by the loader to find a shard's row range."""
        return {str(self.root / s.path): s for s in self.split(split).shards}

    @property
    def uniform(self) -> bool:
        """Whether every image has the manifest's one `image_shape` (else see `sizes`)."""
        return self.image_shape[0] is not None

    def sizes(self, split: str) -> np.ndarray:
        """(N, 2) int64 (height, width) of every image of `split` (checked against the manifest's sha256)."""
        s = self.split(split)
        if s.sizes is None:
            h, w, _ = self.image_shape
            return np.tile(np.array([h, w], dtype=np.int64), (s.n, 1))
        path = self.root / s.sizes.path
        if not path.exists() or sha256_file(path) != s.sizes.sha256:
            raise ShardError(f"{path} is missing or does not match its sha256 in the manifest; {_REPREPARE}")
        return np.load(path).astype(np.int64)

    def iter_labels(self, split: str) -> np.ndarray:
        """All labels of a split in index order, (N,) int64 (reads every shard's `cls`)."""
        labels = np.empty(self.split(split).n, dtype=np.int64)
        for shard in self.split(split).shards:
            for i, _, label in iter_shard(self.root / shard.path, decode=False):
                labels[i] = label
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
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); {_REPREPARE}") from e
    if not isinstance(d, dict) or d.get("version") != MANIFEST_VERSION:
        found = d.get("version") if isinstance(d, dict) else type(d).__name__
        raise ShardError(f"{path}: manifest version {found} != {MANIFEST_VERSION}; {_REPREPARE}")
    try:
        return _manifest_from(d, path, raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path} is not a kdcache manifest ({type(e).__name__}: {e}); {_REPREPARE}") from e


def _manifest_from(d: dict[str, Any], path: Path, raw: bytes) -> Manifest:
    splits = {
        name: SplitManifest(
            n=s["n"],
            shards=tuple(ShardInfo(**x) for x in s["shards"]),
            label_counts=tuple(s["label_counts"]),
            sizes=SizesInfo(**s["sizes"]) if s.get("sizes") else None,
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


def iter_shard(
    path: str | Path,
    *,
    expect: range | None = None,
    wanted: Sequence[bool] | np.ndarray | None = None,
    decode: bool = True,
) -> Iterator[tuple[int, np.ndarray | bytes, int]]:
    """Yield ``(index, image, label)`` from one tar shard in file order: the project's one shard reader.

    expect: the manifest's row range of the shard; every key must be the next row of it and the shard
        must end at ``expect.stop`` (a tar cut at a member boundary reads cleanly but short).
    wanted: (len(expect),) bool; rows that are False are checked but neither decoded nor yielded.
    decode: PNG / JPEG -> (H, W, C) uint8 (else the image's bytes).

    Reads with the fast tar walker and decoders (`pipeline.data.tario`), so what the tests check is
    what the loader sees. Anything wrong raises :class:`ShardError` naming the shard and the last good key.
    """
    path = str(path)
    if wanted is not None and (expect is None or len(wanted) != len(expect)):
        raise ValueError("iter_shard: `wanted` needs `expect` and one entry per row of it")
    flags = None if wanted is None else (wanted.tolist() if isinstance(wanted, np.ndarray) else list(wanted))
    nxt = expect.start if expect is not None else None
    last: str | None = None
    samples = tar_samples(path)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except FileNotFoundError as e:
            raise ShardError(f"shard {path} is listed in the manifest but missing ({e}); {_REPREPARE}") from e
        except Exception as e:  # EOFError, tarfile.ReadError, OSError...: name the shard and the last good sample
            raise ShardError(f"corrupt or truncated shard {path} after sample {last!r}: {e}; {_REPREPARE}") from e
        key = sample["__key__"]
        try:
            i = int(key)
        except ValueError:
            i = -1
        if nxt is not None:
            if i != nxt:
                raise ShardError(
                    f"shard {path}: sample key {key!r} where row {nxt} was expected (after sample {last!r}); "
                    f"shards and manifest disagree: {_REPREPARE}"
                )
            nxt += 1
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            has = sorted(k for k in sample if k[0] != "_")
            raise ShardError(
                f"corrupt or truncated shard {path} after sample {last!r}: sample {key} lacks png|jpg/cls "
                f"(has {has}); {_REPREPARE}"
            )
        last = key
        if flags is not None and not flags[i - expect.start]:  # type: ignore[union-attr]
            continue
        try:
            label = int(sample["cls"])
            image = decode_image(ext, sample[ext]) if decode else sample[ext]
        except Exception as e:
            raise ShardError(f"shard {path}: cannot decode sample {key}: {e}; {_REPREPARE}") from e
        yield i, image, label
    if expect is not None and nxt != expect.stop:
        raise ShardError(
            f"corrupt or truncated shard {path} after sample {last!r}: the shard ends there, but the manifest "
            f"says rows [{expect.start}, {expect.stop}); {_REPREPARE}"
        )


def read_rows(manifest: Manifest, split: str, rows: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Images (n, H, W, C) uint8 and labels (n,) of the given rows (any order, repeats allowed).

    Reads only the shards holding them and decodes only the rows asked for. Images that differ in size
    (`manifest.uniform` False) come as a list of n (H, W, C) arrays.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_split = manifest.split(split).n
    if len(rows) and (rows.min() < 0 or rows.max() >= n_split):
        raise IndexError(f"rows outside split {split} of {n_split} samples")
    images: Any = np.empty((len(rows), *manifest.image_shape), np.uint8) if manifest.uniform else [None] * len(rows)
    labels = np.empty(len(rows), dtype=np.int64)
    wanted = np.zeros(n_split, dtype=bool)
    wanted[rows] = True
    where: dict[int, list[int]] = {}  # row -> positions in the output
    for pos, r in enumerate(rows.tolist()):
        where.setdefault(r, []).append(pos)
    for shard in manifest.split(split).shards:
        mask = wanted[shard.start : shard.stop]
        if not mask.any():
            continue
        expect = range(shard.start, shard.stop)
        for i, img, label in iter_shard(manifest.root / shard.path, expect=expect, wanted=mask):
            for pos in where[i]:
                images[pos], labels[pos] = img, label
    return images, labels


def take_images(images: np.ndarray | list[np.ndarray], rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """images[rows] for an (N, H, W, C) array or a list of N differently sized (H, W, C) images."""
    return images[rows] if isinstance(images, np.ndarray) else [images[r] for r in np.asarray(rows).tolist()]


def read_shard(manifest: Manifest, split: str, j: int) -> np.ndarray | list[np.ndarray]:
    """All images (n, H, W, C) uint8 of shard ``j`` of ``split``, keys checked against its row range (a list of
    n arrays when the images differ in size)."""
    info = manifest.split(split).shards[j]
    images = [img for _, img, _ in iter_shard(manifest.root / info.path, expect=range(info.start, info.stop))]
    return np.stack(images) if manifest.uniform else images


class ChannelStats:
    """Per-channel mean/std in [0, 1] units, accumulated image by image with exact integer sums.

    Integer sums make the result independent of how the pixels are grouped (one array or a stream of
    images), so streamed and in-memory preparation write the same manifest.
    """

    def __init__(self) -> None:
        self.s: np.ndarray | None = None  # (C,) int64 sum of pixel values
        self.ss: np.ndarray | None = None  # (C,) int64 sum of squared pixel values
        self.n = 0  # pixels per channel

    def add(self, images: np.ndarray) -> None:
        """images: (..., C) uint8 (one image (H, W, C) or a block (B, H, W, C))."""
        px = images.reshape(-1, images.shape[-1]).astype(np.int64)  # (P, C)
        s, ss = px.sum(0), (px * px).sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += len(px)

    def result(self) -> tuple[list[float], list[float]]:
        if self.s is None or self.ss is None or self.n == 0:
            raise InputError("no images to compute channel statistics from")
        mean = self.s / (255.0 * self.n)
        std = np.sqrt(np.maximum(self.ss / (255.0**2 * self.n) - mean**2, 1e-12))
        return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


#: what `write_split` / `write_dataset` take per split: (images (N, H, W, C) uint8, labels (N,)) arrays, or
#: an iterable of (image, label) pairs, e.g. `sources.SplitStream` (constant memory), each image an (H, W, C)
#: uint8 array (stored as PNG) or an `Encoded` source file (its own bytes stored).
Samples = tuple[np.ndarray, np.ndarray] | Iterable[tuple[np.ndarray, int]]


def _sample_iter(split: str, samples: Samples, num_classes: int) -> Iterator[tuple[np.ndarray, int]]:
    if isinstance(samples, tuple) and len(samples) == 2 and isinstance(samples[0], np.ndarray):
        imgs, labels = samples
        if imgs.dtype != np.uint8 or imgs.ndim != 4:
            raise InputError(f"split {split}: images must be (N, H, W, C) uint8, got {imgs.shape} {imgs.dtype}")
        if len(imgs) != len(labels):
            raise InputError(f"split {split}: {len(imgs)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"split {split}: labels outside [0, {num_classes})")
        return zip(imgs, (int(y) for y in labels), strict=True)
    return iter(samples)


def write_split(
    out_dir: Path,
    split: str,
    samples: Samples,
    shard_size: int,
    num_classes: int,
    *,
    stats: ChannelStats | None = None,
    limit: int | None = None,
    total: int | None = None,
) -> tuple[SplitManifest, tuple[int, ...]]:
    """Write one split as deterministic tar shards, sample by sample (memory: one image at a time).

    Returns the split's manifest entry and its image shape ((None, None, C) when the sizes vary: then the
    per-sample sizes go to `<split>-sizes.npy`). `stats` accumulates channel statistics; `limit` stops after
    that many samples; `total` (samples expected) only sizes the progress bar.
    """
    shards: list[ShardInfo] = []
    counts = np.zeros(num_classes, dtype=np.int64)
    shape: tuple[int, ...] | None = None
    sizes: list[tuple[int, int]] = []  # (height, width) per sample
    writer: Any = None
    f: Any = None
    n = 0
    start = 0

    def close_shard() -> None:
        writer.close()
        f.close()
        name = f"{split}-{len(shards):06d}.tar"
        shards.append(ShardInfo(path=name, start=start, stop=n, sha256=sha256_file(out_dir / name)))

    bounds = [x for x in (total, limit) if x is not None]
    bar = tqdm(total=min(bounds) if bounds else None, desc=f"prepare {split}", unit="img", disable=None, leave=False)
    try:
        for item, label in _sample_iter(split, samples, num_classes):
            if limit is not None and n >= limit:
                break
            img = item.image if isinstance(item, Encoded) else item
            if img.dtype != np.uint8 or img.ndim != 3:
                raise InputError(f"split {split}: images must be (H, W, C) uint8, got {img.shape} {img.dtype}")
            if shape is None:
                shape = tuple(img.shape)
            elif img.shape[2] != shape[2]:
                raise InputError(
                    f"split {split}: image {n} has {img.shape[2]} channels, the first had {shape[2]}; "
                    "set the source's mode option (RGB or L) so all images share one"
                )
            sizes.append(img.shape[:2])
            if not 0 <= label < num_classes:
                raise InputError(f"split {split}: image {n} has label {label} outside [0, {num_classes})")
            if writer is None:
                start = n
                f = open(out_dir / f"{split}-{len(shards):06d}.tar", "wb")  # noqa: SIM115 (closed in close_shard)
                # Fixed mtime/owner: identical inputs give identical bytes (and sha256) on every run.
                writer = wds.TarWriter(f, user="kdcache", group="kdcache", mtime=0)
            if isinstance(item, Encoded):
                writer.write({"__key__": sample_key(n), item.ext: item.data, "cls": int(label)})
            else:
                writer.write({"__key__": sample_key(n), "png": encode_png(img), "cls": int(label)})
            if stats is not None:
                stats.add(img)
            counts[label] += 1
            n += 1
            bar.update(1)
            if n - start == shard_size:
                close_shard()
                writer = None
        if writer is not None:
            close_shard()
    finally:
        bar.close()
        if f is not None and not f.closed:  # an error mid-shard: end the tar writer before its file (the partial
            with contextlib.suppress(Exception):  # folder is discarded; a writer left open would write at exit)
                writer.close()
            f.close()
    if shape is None:
        raise InputError(f"split {split}: no images")
    used = int(np.flatnonzero(counts).max()) + 1  # label counts up to the largest label seen, as before
    size_info = None
    if len(set(sizes)) > 1:  # images of many sizes (a source's own JPEGs): their sizes beside the manifest
        shape = (None, None, shape[2])
        name = f"{split}-sizes.npy"
        np.save(out_dir / name, np.asarray(sizes, dtype=np.uint32))
        size_info = SizesInfo(path=name, sha256=sha256_file(out_dir / name))
    entry = SplitManifest(n=n, shards=tuple(shards), label_counts=tuple(int(c) for c in counts[:used]), sizes=size_info)
    return entry, shape


def _split_json(e: SplitManifest) -> dict[str, Any]:
    """A split's manifest entry (no `sizes` key when the images share one size: such manifests keep their bytes)."""
    d = asdict(e)
    if d["sizes"] is None:
        del d["sizes"]
    return d


def write_dataset(
    out_dir: str | Path,
    dataset: str,
    splits: dict[str, Samples],
    classes: list[str],
    shard_size: int,
    *,
    limit: int | None = None,
) -> Manifest:
    """Write all splits + manifest into `out_dir` atomically (a `.partial` folder renamed at the end).

    `splits` maps split name -> (images (N, H, W, C) uint8, labels (N,) int64) arrays, or an iterable of
    (image, label) pairs written as it is consumed (constant memory). The first split named `train`
    (else the first one) provides the normalisation statistics. `limit`: at most that many per split.
    """
    out_dir = Path(out_dir)
    if shard_size <= 0:
        raise ValueError(f"prepare.shard_size must be positive, got {shard_size}")
    tmp = partial_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats_split = "train" if "train" in splits else next(iter(splits))
    stats = ChannelStats()
    entries, shapes = {}, {}
    for name, samples in splits.items():
        # (images, labels) arrays, or a stream that knows its length (SplitStream): sizes the progress bar
        total = len(samples[1]) if isinstance(samples, tuple) else getattr(samples, "__len__", lambda: None)()
        entries[name], shapes[name] = write_split(
            tmp,
            name,
            samples,
            shard_size,
            len(classes),
            stats=stats if name == stats_split else None,
            limit=limit,
            total=total,
        )
    if len({s[2] for s in shapes.values()}) != 1:
        raise InputError(f"splits have different channel counts {shapes}; set the source's mode option")
    shape = next(iter(shapes.values())) if len(set(shapes.values())) == 1 else (None, None, shapes[stats_split][2])
    mean, std = stats.result()
    manifest = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "image_shape": list(shape),
        "shard_size": shard_size,
        "mean": mean,
        "std": std,
        "splits": {name: _split_json(e) for name, e in entries.items()},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("wrote %s: %s", out_dir, {k: e.n for k, e in entries.items()})
    return load_manifest(out_dir)
