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
import mmap
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
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


# -- fast paths for the two per-sample costs that dominated the loader and the teach stage (bench_distill.py) ---
# Python's tarfile parses every header field in Python (~50 us per sample of two members) and PIL's
# PNG plugin parses chunks in Python (~45 us per 28x28 image). Our shards are plain ustar files of
# small members and PIL-written 8-bit PNGs, so a direct header walk over an mmap and PIL's C zip
# decoder fed with the joined IDAT data do the same in ~3 us and ~20 us. Anything unusual (PAX or
# GNU long-name headers, a non-local URL, a palette/16-bit/interlaced PNG) falls back to
# webdataset's reader / `shards.decode_png`; tests check both paths give identical samples.

_ZERO_BLOCK = bytes(512)
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {(8, 0): ("L", 1), (8, 2): ("RGB", 3), (8, 6): ("RGBA", 4)}  # (bit depth, colour type) -> mode


class _Unsupported(Exception):
    """A tar feature the fast reader leaves to webdataset's (tarfile-based) reader."""


class _Truncated(EOFError):
    """The tar image ends early; `boundary`: between members (the members read so far are whole)."""

    def __init__(self, msg: str, boundary: bool) -> None:
        super().__init__(msg)
        self.boundary = boundary


def _tar_members(data: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar image (bytes or mmap), in order.

    Raises _Truncated (an EOFError) on a truncated archive, ValueError on a damaged header,
    _Unsupported on extended (PAX / GNU long name) headers.
    """
    off, n = 0, len(data)
    while True:
        if off + 512 > n:
            raise _Truncated(f"unexpected end of data at byte {off}", boundary=True)
        h = data[off : off + 512]
        if h == _ZERO_BLOCK:
            return  # end-of-archive marker
        if h[257:262] != b"ustar":
            if off == 0:
                raise _Unsupported("no ustar magic (a v7 tar, or not a tar: tarfile decides)")
            raise ValueError(f"not a tar header at byte {off}")
        typ = h[156:157]
        if typ not in (b"0", b"\0", b"5"):
            raise _Unsupported(f"tar member type {typ!r}")
        try:
            size = int(h[124:136].rstrip(b" \0") or b"0", 8)
        except ValueError as e:
            raise ValueError(f"bad size field in the tar header at byte {off}") from e
        name = h[0:100].split(b"\0", 1)[0].decode()
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode() + "/" + name
        body = off + 512
        if body + size > n:
            raise _Truncated(f"unexpected end of data in member {name}", boundary=False)
        if typ != b"5":  # directories carry no sample data
            yield name, data[body : body + size]
        off = body + (size + 511) // 512 * 512


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """webdataset-style samples ({"__key__", ext: bytes}) of a local tar shard, fast path first."""
    path = url[len("file:") :] if url.startswith("file:") else url
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(path):
        yield from tarfile_samples([{"url": url}])
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    emitted = 0
    try:
        cur: dict[str, Any] | None = None
        for name, body in _tar_members(data):
            base = name.rsplit("/", 1)[-1]
            dot = base.find(".")
            if dot <= 0:
                continue  # no key.ext: webdataset skips it too
            key = name[: len(name) - len(base) + dot]
            ext = base[dot + 1 :].lower()
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    emitted += 1
                    yield cur
                cur = {"__key__": key, "__url__": url}
            if ext in cur:
                raise ValueError(f"{name}: duplicate file name in tar file")
            cur[ext] = body
        if cur is not None:
            emitted += 1
            yield cur
    except _Truncated as e:
        if e.boundary and cur is not None:  # the sample before the cut is whole: deliver it, like tarfile would
            yield cur
        raise
    except _Unsupported:
        # Let webdataset's reader handle the rest, skipping the samples already delivered.
        yield from islice(tarfile_samples([{"url": url}]), emitted, None)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def decode_png_fast(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8, equal to `shards.decode_png` (8-bit grey/RGB/RGBA; else falls back to it)."""
    if data[:8] != _PNG_SIG or data[12:16] != b"IHDR":
        return decode_png(data)
    w, h, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PNG_MODES.get((depth, colour))
    if mode is None or interlace:
        return decode_png(data)
    off, n, parts = 33, len(data), []
    while off + 8 <= n:
        length, typ = struct.unpack_from(">I4s", data, off)
        if typ == b"IDAT":
            parts.append(data[off + 8 : off + 8 + length])
        elif typ == b"IEND":
            break
        off += 12 + length
    # PIL's "zip" decoder inflates and undoes the PNG row filters in C, like its PNG plugin does.
    img = np.array(Image.frombytes(mode[0], (w, h), b"".join(parts), "zip", mode[0]))  # writable, like decode_png
    return img[:, :, None] if mode[1] == 1 else img


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

    Reads with the loader's fast tar walker (webdataset's grouping, webdataset's reader as the fallback)
    and PNG decoder, so what we test is what the loader sees. A truncated or corrupt shard raises an
    error naming the shard and the last good key.
    """
    last = None
    try:
        for sample in tar_samples(str(path)):
            key = sample["__key__"]
            if "png" not in sample or "cls" not in sample:
                raise ValueError(f"sample {key} lacks png/cls (has {sorted(k for k in sample if k[0] != '_')})")
            label = int(sample["cls"])
            last = key
            yield key, decode_png_fast(sample["png"]) if decode else sample["png"], label
    except Exception as e:  # tarfile.ReadError, zlib errors, ...
        raise ValueError(
            f"corrupt or truncated shard {path} after sample {last!r}: {e}; re-run `dvc repro prepare`"
        ) from e


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
            raise ValueError("no images to compute channel statistics from")
        mean = self.s / (255.0 * self.n)
        std = np.sqrt(np.maximum(self.ss / (255.0**2 * self.n) - mean**2, 1e-12))
        return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


#: what `write_split` / `write_dataset` take per split: (images (N, H, W, C) uint8, labels (N,)) arrays, or
#: an iterable of (image (H, W, C) uint8, label) pairs, e.g. `sources.SplitStream` (constant memory).
Samples = tuple[np.ndarray, np.ndarray] | Iterable[tuple[np.ndarray, int]]


def _sample_iter(split: str, samples: Samples, num_classes: int) -> Iterator[tuple[np.ndarray, int]]:
    if isinstance(samples, tuple) and len(samples) == 2 and isinstance(samples[0], np.ndarray):
        imgs, labels = samples
        if imgs.dtype != np.uint8 or imgs.ndim != 4:
            raise ValueError(f"split {split}: images must be (N, H, W, C) uint8, got {imgs.shape} {imgs.dtype}")
        if len(imgs) != len(labels):
            raise ValueError(f"split {split}: {len(imgs)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"split {split}: labels outside [0, {num_classes})")
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

    Returns the split's manifest entry and its image shape. `stats` accumulates channel statistics;
    `limit` stops after that many samples; `total` (samples expected) only sizes the progress bar.
    """
    shards: list[ShardInfo] = []
    counts = np.zeros(num_classes, dtype=np.int64)
    shape: tuple[int, ...] | None = None
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
        for img, label in _sample_iter(split, samples, num_classes):
            if limit is not None and n >= limit:
                break
            if shape is None:
                shape = tuple(img.shape)
                if img.dtype != np.uint8 or img.ndim != 3:
                    raise ValueError(f"split {split}: images must be (H, W, C) uint8, got {img.shape} {img.dtype}")
            elif tuple(img.shape) != shape:
                raise ValueError(
                    f"split {split}: image {n} has shape {tuple(img.shape)}, the first had {shape}; "
                    "all images must share one size (set the source's resize option)"
                )
            if not 0 <= label < num_classes:
                raise ValueError(f"split {split}: image {n} has label {label} outside [0, {num_classes})")
            if writer is None:
                start = n
                f = open(out_dir / f"{split}-{len(shards):06d}.tar", "wb")  # noqa: SIM115 (closed in close_shard)
                # Fixed mtime/owner: identical inputs give identical bytes (and sha256) on every run.
                writer = wds.TarWriter(f, user="kdcache", group="kdcache", mtime=0)
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
        if f is not None and not f.closed:
            f.close()
    if shape is None:
        raise ValueError(f"split {split}: no images")
    used = int(np.flatnonzero(counts).max()) + 1  # label counts up to the largest label seen, as before
    return SplitManifest(n=n, shards=tuple(shards), label_counts=tuple(int(c) for c in counts[:used])), shape


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
    tmp = out_dir.with_name(out_dir.name + ".partial")
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
    if len(set(shapes.values())) != 1:
        raise ValueError(f"splits have different image shapes {shapes}; set a resize option for the source")
    mean, std = stats.result()
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
