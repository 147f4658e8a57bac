"""CIFAR-C-style corrupted copies of a test split (Hendrycks & Dietterich 2019), made once per data set.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019) corrupt each test image with 15 corruptions at 5 severities. We implement
the 8 that need nothing beyond numpy and PIL, with the CIFAR-10-C severity constants of their
`make_cifar_c.py` (for pixel values x in [0, 1]):

============== ====================================================== =============================
name           x -> x'                                                c at severity 1..5
============== ====================================================== =============================
gaussian_noise x + N(0, c^2)                                          .04 .06 .08 .09 .10
shot_noise     Poisson(c x) / c                                       500 250 100 75 50
gaussian_blur  x * G_sigma (per channel, 'nearest' borders, 4 sigma)   sigma = .4 .6 .7 .8 1
contrast       (x - mean_hw(x)) c + mean_hw(x)                        .75 .5 .4 .3 .15
brightness     HSV value v -> clip(v + c)                             .05 .1 .15 .2 .3
haze           (x + a F) m / (m + a), F = plasma fractal, m = max(x)  (a, decay) = (.2, 3) (.5, 3)
                                                                      (.75, 2.5) (1, 2) (1.5, 1.75)
pixelate       box-downsample to c*(H, W), box-upsample back          .95 .9 .85 .75 .65
jpeg           JPEG round trip at quality c                           80 65 58 50 40
============== ====================================================== =============================

Every result is clipped to [0, 1] and rounded to uint8 (the paper truncates; rounding keeps the
uint8 round trip of an unchanged pixel exact). `haze` is the paper's `fog` (a diamond-square plasma
fractal added as a whitish veil). Brightness adds `c` to the HSV value channel with hue and
saturation fixed; since every RGB channel is proportional to V = max(R, G, B) at fixed H and S, that
is `x * clip(V + c) / V` (and `c` for black pixels), computed without a colour-space round trip; for
one channel images it is `clip(x + c)`.

Randomness is a pure function of `(seed, corruption, severity, index)`: image `index` of the test
split gets its own `numpy.random.Generator` seeded with that tuple, so a corrupted copy is
byte-for-byte reproducible and independent of batch size, `limit` and processing order.

All functions take channel-last images `(N, H, W, C)` with C = 1 or 3 and any H, W (Fashion-MNIST
28x28x1, CIFAR 32x32x3, ...).

On-disk layout written by `write_corrupted` (the `corrupt` DVC stage), under `data/corrupt/<dataset>/`:

    images.npy   (K, S, N, H, W, C) uint8  corruption k, severity s, test image n (memory-mapped on read)
    labels.npy   (N,) int64                labels of the chosen test images
    index.npy    (N,) int64                their rows in the test split (sorted)
    meta.json    corruptions, severities, seed, limit, data set name + manifest sha256, image shape
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image

from pipeline.config import NONEMPTY, NonNegInt, PosInt
from pipeline.data.shards import Manifest, read_rows
from pipeline.errors import InputError
from pipeline.layout import partial_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SEVERITIES = (1, 2, 3, 4, 5)

# CIFAR-10-C constants (Hendrycks & Dietterich 2019, make_cifar_c.py), index = severity - 1.
PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "haze": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg": (80, 65, 58, 50, 40),
}


CorruptionName = Literal[tuple(PARAMS)]  # type: ignore[valid-type]  # the names above, checked by from_dict
Severity = Literal[SEVERITIES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class CorruptConfig:
    """`corrupt`: which corrupted copies of the test split to make (params.yaml section `corrupt`).

    Lives here rather than in `pipeline.config` so the stage's code is one module; same rules
    (`config.from_dict` checks every value and rejects unknown keys).
    """

    corruptions: Annotated[tuple[CorruptionName, ...], NONEMPTY] = tuple(PARAMS)
    severities: Annotated[tuple[Severity, ...], NONEMPTY] = SEVERITIES
    seed: NonNegInt = 0
    limit: PosInt | None = 2000  # test images per corruption (a seeded subset); None = the whole split


# ---------------------------------------------------------------------------------------------
# the corruptions: (B, H, W, C) float64 in [0, 1], severity, one Generator per image -> same shape


def _gaussian_noise(x: np.ndarray, c: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    noise = np.stack([r.normal(0.0, c, size=x.shape[1:]) for r in rngs])
    return x + noise


def _shot_noise(x: np.ndarray, c: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    # Photon counting: pixel intensity x*c is the Poisson rate; fewer photons (smaller c) = more noise.
    return np.stack([r.poisson(xi * c) for xi, r in zip(x, rngs, strict=True)]) / c


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-d Gaussian exp(-t^2 / (2 sigma^2)), t in [-r, r], r = round(truncate * sigma) (as scipy.ndimage)."""
    radius = max(1, int(truncate * sigma + 0.5))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_axis(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="edge")  # skimage.filters.gaussian's default mode='nearest'
    n = x.shape[axis]
    out = np.zeros_like(x)
    for j, w in enumerate(k):  # a short kernel: a sum of shifted copies beats an FFT at 32x32
        out += w * np.take(xp, np.arange(j, j + n), axis=axis)
    return out


def _gaussian_blur(x: np.ndarray, sigma: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    k = gaussian_kernel(sigma)
    return _blur_axis(_blur_axis(x, k, 1), k, 2)  # separable: rows then columns, channels independent


def _contrast(x: np.ndarray, c: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)  # per image and channel
    return (x - means) * c + means


def _brightness(x: np.ndarray, c: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    v = x.max(axis=3, keepdims=True)  # HSV value; RGB = V * g(H, S), so fixing H, S scales channels by V'/V
    v_new = np.clip(v + c, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = x * (v_new / v)
    return np.where(v > 0, scaled, v_new)  # black: saturation 0, so the pixel becomes grey at V' = c


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map (Fournier et al. 1982) of side `size` (a power of two), scaled to [0, 1].

    Each new point is the mean of its four neighbours plus uniform noise of amplitude w^2, where w
    starts at 100 and shrinks by `decay` per octave, as in CIFAR-C's `fog` (which scales its noise by
    the "wibble" twice): smaller decay = rougher, patchier haze. The map wraps around (toroidal).
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal size must be a power of two >= 2, got {size}")
    m = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        h = step // 2
        amp = wibble * wibble
        # square step: each cell centre = mean of its four corners + noise
        corners = m[0:size:step, 0:size:step]
        acc = corners + np.roll(corners, -1, axis=0)
        acc = acc + np.roll(acc, -1, axis=1)
        m[h:size:step, h:size:step] = acc / 4 + rng.uniform(-amp, amp, acc.shape)
        # diamond step: each edge midpoint = mean of its two corners and two cell centres + noise
        centres = m[h:size:step, h:size:step]
        corners = m[0:size:step, 0:size:step]
        top = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        m[0:size:step, h:size:step] = top / 4 + rng.uniform(-amp, amp, top.shape)
        left = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        m[h:size:step, 0:size:step] = left / 4 + rng.uniform(-amp, amp, left.shape)
        step, wibble = h, wibble / decay
    m -= m.min()
    return m / max(m.max(), 1e-12)


def _haze(x: np.ndarray, c: tuple[float, float], rngs: Sequence[np.random.Generator]) -> np.ndarray:
    a, decay = c
    _, hgt, wid, _ = x.shape
    size = 1 << max(1, int(np.ceil(np.log2(max(hgt, wid)))))  # the smallest power of two covering the image
    fog = np.stack([plasma_fractal(size, decay, r)[:hgt, :wid, None] for r in rngs])  # (B, H, W, 1)
    top = x.max(axis=(1, 2, 3), keepdims=True)
    # Renormalise so the brightest clean pixel stays about as bright: the veil lowers contrast, not exposure.
    return (x + a * fog) * top / (top + a)


def _pil(img: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> PIL image ('L' for one channel, 'RGB' for three)."""
    return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def _from_pil(im: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64) / 255.0
    return a[:, :, None] if a.ndim == 2 else a[:, :, :channels]


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pixelate(x: np.ndarray, c: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    _, hgt, wid, ch = x.shape
    small = (max(1, int(wid * c)), max(1, int(hgt * c)))  # PIL sizes are (width, height)
    out = [_pil(img).resize(small, Image.BOX).resize((wid, hgt), Image.BOX) for img in _to_u8(x)]
    return np.stack([_from_pil(im, ch) for im in out])


def _jpeg(x: np.ndarray, quality: int, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    out = []
    for img in _to_u8(x):
        buf = io.BytesIO()
        _pil(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(_from_pil(Image.open(buf), img.shape[2]))
    return np.stack(out)


CorruptionFn = Callable[[np.ndarray, Any, Sequence[np.random.Generator]], np.ndarray]

CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "haze": _haze,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
}


def check_names(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """Fail loudly on an unknown corruption or severity, listing the valid ones."""
    for name in corruptions:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption '{name}'; available: {sorted(CORRUPTIONS)}")
    for s in severities:
        if s not in SEVERITIES:
            raise ValueError(f"corruption severity must be one of {list(SEVERITIES)}, got {s!r}")


def image_rngs(seed: int, name: str, severity: int, index: np.ndarray) -> list[np.random.Generator]:
    """One Generator per image, seeded by (seed, crc32(name), severity, index): order- and batch-independent."""
    tag = zlib.crc32(name.encode())  # stable across runs and Python versions (unlike hash())
    return [np.random.default_rng([int(seed), tag, int(severity), int(i)]) for i in index]


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0, index: np.ndarray | None = None) -> np.ndarray:
    """Corrupt a batch (N, H, W, C) uint8 with `name` at `severity` (1..5) -> (N, H, W, C) uint8.

    `index` (N,) are the images' rows in their split (default 0..N-1): they seed each image's noise,
    so a row's corrupted pixels do not depend on which batch or subset it arrives in.
    """
    check_names([name], [severity])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"corrupt: images must be (N, H, W, 1|3) uint8, got {images.shape} {images.dtype}")
    index = np.arange(len(images)) if index is None else np.asarray(index)
    if len(index) != len(images):
        raise ValueError(f"corrupt: {len(images)} images but {len(index)} indices")
    x = images.astype(np.float64) / 255.0
    c = PARAMS[name][severity - 1]
    return _to_u8(CORRUPTIONS[name](x, c, image_rngs(seed, name, severity, index)))


# ---------------------------------------------------------------------------------------------
# the stored set


def choose_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Rows of the test split to corrupt: all of them, or a seeded random subset of `limit`, sorted.

    A random subset (not the first `limit`) keeps the class mix of the split even if it is ordered.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"corrupt.limit must be positive or null, got {limit}")
    return np.sort(np.random.default_rng([int(seed), 0x524F5753]).choice(n, size=limit, replace=False))


def write_corrupted(out_dir: str | Path, manifest: Manifest, cfg: CorruptConfig, batch: int = 500) -> Path:
    """Make `cfg.corruptions x cfg.severities` copies of (a subset of) the test split into `out_dir`.

    Written into `<out_dir>.partial` and renamed into place when complete, so a crash never leaves
    a half-written set that evaluation would trust.
    """
    check_names(cfg.corruptions, cfg.severities)
    out_dir = Path(out_dir)
    if not manifest.uniform:
        # The copies are evaluated as they are, so they need the students' input size, which only the views make;
        # corrupting after the eval transform is not built yet: an empty set (no meta.json), evaluation skips mCA.
        log.warning(
            "corrupt: the test images of %s differ in size: no corrupted copies (robustness / mCA not measured)",
            manifest.dataset,
        )
        tmp = partial_path(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "README.txt").write_text("no corrupted copies: the test images differ in size\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir
    rows = choose_rows(manifest.split("test").n, cfg.limit, cfg.seed)
    images, labels = read_rows(manifest, "test", rows)
    tmp = partial_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    k, s = len(cfg.corruptions), len(cfg.severities)
    out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(k, s, *images.shape))
    for ki, name in enumerate(cfg.corruptions):
        for si, sev in enumerate(cfg.severities):
            for start in range(0, len(rows), batch):
                sl = slice(start, start + batch)
                out[ki, si, sl] = corrupt(images[sl], name, sev, cfg.seed, rows[sl])
        log.info("corrupt %s: %d severities x %d images", name, s, len(rows))
    out.flush()
    del out
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "index.npy", rows.astype(np.int64))
    meta = {
        "version": FORMAT_VERSION,
        "dataset": manifest.dataset,
        "manifest_sha256": manifest.sha256,
        "split": "test",
        "corruptions": list(cfg.corruptions),
        "severities": list(cfg.severities),
        "params": {name: list(PARAMS[name]) for name in cfg.corruptions},
        "seed": cfg.seed,
        "limit": cfg.limit,
        "n": len(rows),
        "image_shape": list(images.shape[1:]),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("wrote %s: %d corruptions x %d severities x %d images", out_dir, k, s, len(rows))
    return out_dir


@dataclass
class CorruptedSet:
    """A stored corrupted test set: `images[k, s]` is corruption k at severity s, (N, H, W, C) uint8."""

    images: np.ndarray  # (K, S, N, H, W, C) uint8, memory-mapped
    labels: np.ndarray  # (N,)
    index: np.ndarray  # (N,) rows of the test split
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def corruptions(self) -> list[str]:
        return list(self.meta["corruptions"])

    @property
    def severities(self) -> list[int]:
        return list(self.meta["severities"])


def load_corrupted(folder: str | Path, manifest: Manifest | None = None) -> CorruptedSet:
    """Open a set written by `write_corrupted`; with `manifest`, check it was made from that data set."""
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"no corrupted test set at {folder}: run `dvc repro corrupt` first")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != FORMAT_VERSION:
        got = meta.get("version")
        raise InputError(f"{folder}: format version {got} != {FORMAT_VERSION}; re-run `dvc repro corrupt`")
    if manifest is not None and meta["manifest_sha256"] != manifest.sha256:
        raise InputError(
            f"{folder} was made from data set {meta['dataset']} (manifest {meta['manifest_sha256'][:12]}...), "
            f"but evaluation uses {manifest.dataset} (manifest {manifest.sha256[:12]}...): re-run `dvc repro corrupt`"
        )
    images = np.load(folder / "images.npy", mmap_mode="r")
    return CorruptedSet(images, np.load(folder / "labels.npy"), np.load(folder / "index.npy"), meta)
