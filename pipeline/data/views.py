"""Deterministic augmentation views ("consistent teaching").

A random augmentation cached once goes stale if the student sees a different crop. So the
augmentation of sample `i`, view `v` is a pure function of `(seed, i, v)`:

- view 0 is the recipe's evaluation transform (the plain image for `pad_crop_flip`; resize + centre crop
  for `rrc_flip`);
- views 1..V-1 are random: a crop of the zero-padded image + flip (`pad_crop_flip`, 32 px data) or a
  RandomResizedCrop + flip (`rrc_flip`, ImageNet-grade data), their parameters drawn from a counter-based
  hash of `(seed, i, v)`.

Recipes form a registry (`RECIPES`, `build_recipe`); the store records the one it was taught with.

The teacher caches logits for all V views; the student at epoch `e` picks view
`pick_view(seed, e, i, V)` and applies the *same* function, so its input is bit for bit the image
the teacher labelled (tested). A counter-based hash (SplitMix64) instead of a seeded RNG object per
sample keeps it vectorised and independent of worker count, shard order and process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Domain tags so the view-parameter stream and the view-choice stream never collide.
_TAG_VIEW = 0x5649_4557  # "VIEW"
_TAG_PICK = 0x5049_434B  # "PICK"
FRESH_VIEWS = 1 << 30  # `ViewRecipe.fresh`: so many views that each (epoch, sample) gets its own


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014) on uint64 arrays: a well-mixed bijection."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def hash_u64(*parts: int | np.ndarray) -> np.ndarray:
    """Hash integer arrays (broadcast together) into uint64 by chained SplitMix64."""
    arrays = np.broadcast_arrays(*[np.asarray(p, dtype=np.int64).astype(np.uint64) for p in parts])
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    for a in arrays:
        h = _splitmix64(h ^ a)
    return h


#: Images as the loaders hold them: one (B, H, W, C) uint8 array when all share a size, else a list of (H, W, C)
#: uint8 arrays (shards that keep a source's own JPEGs: every image its own size).
Images = np.ndarray | Sequence[np.ndarray]


MIX_WINDOW = 64  # a mixed image's partner is another row of its window of 64 rows within one shard
_TAG_MIX = 0x4D49_5821  # "MIX!"


@dataclass(frozen=True)
class Mix:
    """Mixup / CutMix as part of a view (views >= 1; view 0, the eval transform, is never mixed).

    Mixup (Zhang et al. 2018): ``x = lam * x_i + (1 - lam) * x_j``; CutMix (Yun et al. 2019): a box of
    area ``(1 - lam)`` of the view cut from ``x_j`` into ``x_i``, ``lam`` corrected to the box actually pasted
    (timm's ``rand_bbox`` rule). ``lam ~ Beta(alpha, alpha)``. With both alphas set, CutMix is chosen with
    probability 0.5 (timm's ``switch_prob``); a view is mixed with probability ``prob``. The partner ``j``,
    the choice, ``lam`` and the box are pure functions of ``(seed, i, v)`` and the store's shard layout: ``j``
    is another row of ``i``'s window of ``MIX_WINDOW`` rows inside its shard (so the teacher, reading a shard,
    and the loader, streaming one, both hold it), shown through its own view ``(j, v)``. So the teacher labels
    exactly the mixed image the student sees, and the student's CE term reads ``lam * CE(y_i) + (1 - lam) *
    CE(y_j)``.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.mixup_alpha + self.cutmix_alpha == 0:
            raise ValueError(f"mix: mixup_alpha and cutmix_alpha must be >= 0, one > 0; got {self}")
        if not 0 < self.prob <= 1:
            raise ValueError(f"mix: prob must be in (0, 1], got {self.prob}")

    def to_dict(self) -> dict[str, float]:
        return {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha, "prob": self.prob}

    def plan(
        self, seed: int, index: np.ndarray, view: np.ndarray, shard_rows: int, n: int, hw: tuple[int, int]
    ) -> MixPlan:
        """Partner, weight and box of every (index, view) pair: (B,) arrays, a (H, W) view."""
        index = np.asarray(index, dtype=np.int64)
        view = np.asarray(view, dtype=np.int64)
        s0 = index // shard_rows * shard_rows  # (B,) the row's shard
        w0 = s0 + (index - s0) // MIX_WINDOW * MIX_WINDOW  # its window
        size = np.minimum(w0 + MIX_WINDOW, np.minimum(s0 + shard_rows, n)) - w0  # (B,) rows in the window
        keys = hash_u64(seed, _TAG_MIX, index, view).tolist()
        partner = np.full(len(index), -1, dtype=np.int64)
        lam = np.ones(len(index))
        box = np.zeros((len(index), 4), dtype=np.int64)  # y0, y1, x0, x1: empty unless CutMix
        h, w = hw
        for k, key in enumerate(keys):
            u = _units(key, 5)  # prob, partner, switch, box centre y, x
            if view[k] == 0 or size[k] < 2 or u[0] >= self.prob:
                continue
            off = index[k] - w0[k]
            partner[k] = w0[k] + (off + 1 + int(u[1] * (size[k] - 1))) % size[k]  # never the row itself
            cut = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or u[2] < 0.5)
            alpha = self.cutmix_alpha if cut else self.mixup_alpha
            # Beta(alpha, alpha) from the key's own generator: a pure function of the key (numpy's Generator.beta)
            lam[k] = float(np.random.default_rng(key).beta(alpha, alpha))
            if cut:  # timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre, clipped
                ch, cw = int(h * math.sqrt(1 - lam[k])), int(w * math.sqrt(1 - lam[k]))
                cy, cx = int(u[3] * h), int(u[4] * w)
                y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
                x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
                box[k] = (y0, y1, x0, x1)
                lam[k] = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        return MixPlan(partner, lam, box)


@dataclass(frozen=True)
class MixPlan:
    """Per row: `partner` (B,) int64 (-1: not mixed), `lam` (B,) weight of the row's own image and label,
    `box` (B, 4) the CutMix box (y0, y1, x0, x1) in the view (empty for Mixup)."""

    partner: np.ndarray
    lam: np.ndarray
    box: np.ndarray


def mix_pixels(own: np.ndarray, other: np.ndarray, lam: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Mix (B, H, W, C) uint8 views row by row: a CutMix box pasted, else lam * own + (1 - lam) * other rounded."""
    out = own.copy()
    for k in range(len(own)):
        y0, y1, x0, x1 = box[k].tolist()
        if y1 > y0 and x1 > x0:  # CutMix
            out[k, y0:y1, x0:x1] = other[k, y0:y1, x0:x1]
        elif lam[k] < 1:  # Mixup (a CutMix box of no area has lam 1: nothing to do)
            a, b = own[k].astype(np.float32), other[k].astype(np.float32)
            out[k] = np.rint(np.float32(lam[k]) * a + np.float32(1 - lam[k]) * b).astype(np.uint8)
    return out


@dataclass(frozen=True)
class MixSource:
    """Where a mixing recipe finds partner images: `images(rows)` -> their decoded images, and the layout."""

    images: Any  # Callable[[np.ndarray], Images]: global rows -> images
    shard_rows: int
    n: int


class ViewRecipe:
    """How view `v` of sample `i` is made: a pure function of `(seed, i, v)` (and the decoded image).

    The registry `RECIPES` maps a name to a recipe class; the store records `to_dict()` and a student trains
    only on the recipe its store names (`from_dict`). A recipe splits its work in two so the loaders stay
    vectorised: `row_params` hashes `(seed, index, view)` for a whole shard at once (no pixels), `render`
    makes the pixels of a batch from the decoded images and those parameters. Both the teacher (`apply`) and
    the student (`render` in the collate) call the same two functions, which is what makes their inputs
    bit-identical (tested). View 0 is the recipe's evaluation transform (the test split's only view).
    """

    name: ClassVar[str]
    views: int
    seed: int

    @classmethod
    def fresh(cls, seed: int = 0, **transform: Any) -> ViewRecipe:
        """Augmentation without a cache (teacher training): every (epoch, sample) draws a view of its own.

        Implemented as a recipe with 2^30 views, so `pick_view` is effectively a fresh random draw.
        """
        if cls is ViewRecipe:
            return build_recipe(transform, views=FRESH_VIEWS, seed=seed)
        return cls(views=FRESH_VIEWS, seed=seed, **transform)  # type: ignore[call-arg]

    @staticmethod
    def from_dict(d: dict) -> ViewRecipe:
        """The recipe a store recorded (`to_dict`); a store without a recipe name holds `pad_crop_flip` views."""
        t = dict(d.get("transform", {}))
        return build_recipe(t, views=int(d["views"]), seed=int(d["seed"]))

    def to_dict(self) -> dict:
        return {"views": self.views, "seed": self.seed, "transform": self.transform()}

    def transform(self) -> dict[str, Any]:
        """The transform's parameters as recorded in a store (JSON types)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for errors and logs, e.g. `rrc_flip(size=224, scale=(0.08, 1.0), ...)`."""
        args = ", ".join(f"{k}={v}" for k, v in self.transform().items() if k != "recipe")
        return f"{self.name}({args})"

    def out_shape(self, image_shape: Sequence[int | None]) -> tuple[int, int, int]:
        """(H, W, C) of a view given the data set's image shape (H, W None when the sizes vary)."""
        raise NotImplementedError

    def row_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        """Per-row view parameters for (index, view) pairs (broadcast), one cheap vectorised hash: no pixels."""
        base = self.crop_params(index, view)
        if self.photometric is None:
            return base
        index, view = np.broadcast_arrays(np.asarray(index), np.asarray(view))
        return list(zip(base, hash_u64(self.seed, _TAG_PHOTO, index, view).tolist(), strict=True))

    def render(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        """The views' pixels: images (B of (H, W, C) uint8), their `row_params`, view (B,) -> (B, H', W', C) uint8.

        The geometric transform (`render_crops`), then the photometric op of each view >= 1 (`photometric`).
        """
        if self.photometric is None:
            return self.render_crops(images, params, view)
        base, keys = zip(*params, strict=True) if len(params) else ((), ())
        return photometric_rows(self.render_crops(images, base, view), keys, view)

    def crop_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        """The geometric transform's per-row parameters (see `row_params`)."""
        raise NotImplementedError

    def render_crops(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        """The geometric transform's pixels (see `render`)."""
        raise NotImplementedError

    mix: Mix | None
    photometric: str | None

    def apply(
        self, images: Images, index: np.ndarray, view: np.ndarray, partners: MixSource | None = None
    ) -> np.ndarray:
        """Augment a batch: images (B, H, W, C) uint8 (or B arrays), index (B,), view (B,) -> (B, H', W', C) uint8.

        A mixing recipe (`mix`) also needs `partners`: where the partner rows' images are, and the shard layout.
        """
        b = len(images)
        index, view = np.broadcast_to(index, (b,)), np.broadcast_to(view, (b,))
        out = self.render(images, self.row_params(index, view), view)
        if self.mix is None:
            return out
        if partners is None:
            raise ValueError(f"{self.describe()} mixes images: apply() needs the partners' MixSource")
        return self.mix_rows(out, index, view, partners)[0]

    def mix_rows(
        self, out: np.ndarray, index: np.ndarray, view: np.ndarray, partners: MixSource
    ) -> tuple[np.ndarray, MixPlan]:
        """Mix rendered views `out` (B, H', W', C) with their partners' views; returns (mixed views, the plan)."""
        assert self.mix is not None
        plan = self.mix.plan(self.seed, index, view, partners.shard_rows, partners.n, out.shape[1:3])
        sel = np.flatnonzero(plan.partner >= 0)
        if len(sel) == 0:
            return out, plan
        j, v = plan.partner[sel], np.asarray(view)[sel]
        other = self.render(partners.images(j), self.row_params(j, v), v)  # the partner through its own view (j, v)
        out = out.copy()
        out[sel] = mix_pixels(out[sel], other, plan.lam[sel], plan.box[sel])
        return out, plan


@dataclass(frozen=True)
class PadCropFlip(ViewRecipe):
    """`pad_crop_flip`: a random HxW window of the zero-padded image (shift in [-pad, pad]) + a horizontal flip.

    The CIFAR recipe (He et al. 2016, "pad 4, random crop 32, flip"). View 0 is the plain image. Needs one image
    size per split: the views are the images' own size.
    """

    name: ClassVar[str] = "pad_crop_flip"
    views: int = 1
    seed: int = 0
    pad: int = 4
    flip: bool = True
    mix: Mix | None = None
    photometric: str | None = None

    def transform(self) -> dict[str, Any]:
        # No "recipe" key: the layout stores had before the registry, so their spec (and bytes) stay the same.
        return {"pad": self.pad, "flip": self.flip, **_extras(self)}

    def out_shape(self, image_shape: Sequence[int | None]) -> tuple[int, int, int]:
        h, w, c = image_shape
        if h is None or w is None:
            raise ValueError(
                "pad_crop_flip keeps each image's size, but this data set's images differ in size: use a recipe "
                "that makes one size (augment: {recipe: rrc_flip, size: ...})"
            )
        return int(h), int(w), int(c)  # type: ignore[arg-type]

    def params(self, index: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crop offsets (dy, dx) in [0, 2*pad] and flip flags for (index, view) pairs (broadcast).

        View 0 is the identity: offsets (pad, pad) and no flip.
        """
        index, view = np.broadcast_arrays(np.asarray(index), np.asarray(view))
        h = hash_u64(self.seed, _TAG_VIEW, index, view)
        span = np.uint64(2 * self.pad + 1)
        dy = (h % span).astype(np.int64)
        dx = ((h >> np.uint64(20)) % span).astype(np.int64)
        flip = ((h >> np.uint64(40)) & np.uint64(1)).astype(bool) & self.flip
        plain = view == 0
        dy = np.where(plain, self.pad, dy)
        dx = np.where(plain, self.pad, dx)
        flip = np.where(plain, False, flip)
        return dy, dx, flip

    def crop_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        dy, dx, flip = self.params(index, view)
        return np.stack([dy - self.pad, dx - self.pad, flip.astype(np.int64)], -1).tolist()  # (B, 3): sy, sx, flip

    def render_crops(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        out = np.stack(images) if not isinstance(images, np.ndarray) else images.copy()  # (B, H, W, C)
        aug = np.asarray(view) > 0
        if aug.any() and (self.pad or self.flip):  # view 0 is the plain image; the others in one gather
            sy, sx, flip = np.asarray(params, dtype=np.int64).reshape(-1, 3)[aug].T
            out[aug] = crop_flip_batch(out[aug], sy, sx, flip.astype(bool), self.pad)
        return out


@dataclass(frozen=True)
class ResizedCropFlip(ViewRecipe):
    """`rrc_flip`: RandomResizedCrop(size, scale, ratio) + horizontal flip, the ImageNet training recipe.

    Szegedy et al. 2015 ("Going deeper with convolutions", Sec. 6): a crop of area fraction ~U(scale) and
    aspect ratio ~logU(ratio), resized to `size` x `size`. The box follows torchvision's
    `RandomResizedCrop.get_params` rule exactly (10 tries, then its central fallback), its uniforms drawn
    from the hash of `(seed, index, view, try)` instead of torch's global RNG; the pixels come from
    torchvision's own `resized_crop` (bilinear, antialiased). View 0, and the only view of a test split, is
    the evaluation transform: resize the shorter side to floor(size / crop_pct), centre crop `size`
    (crop_pct 0.875: 256 -> 224, the torchvision/timm ImageNet evaluation).
    """

    name: ClassVar[str] = "rrc_flip"
    views: int = 1
    seed: int = 0
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_pct: float = 0.875
    mix: Mix | None = None
    photometric: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if self.size <= 0:
            raise ValueError(f"rrc_flip: size must be positive, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"rrc_flip: scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"rrc_flip: ratio must satisfy 0 < min <= max, got {list(self.ratio)}")
        if not (0 < self.crop_pct <= 1):
            raise ValueError(f"rrc_flip: crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def eval_resize(self) -> int:
        """The shorter side before the evaluation centre crop (timm's rule: floor(size / crop_pct))."""
        return int(math.floor(self.size / self.crop_pct))

    def transform(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "size": self.size,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": self.flip,
            "crop_pct": self.crop_pct,
            **_extras(self),
        }

    def out_shape(self, image_shape: Sequence[int | None]) -> tuple[int, int, int]:
        return self.size, self.size, int(image_shape[-1])  # type: ignore[arg-type]

    def crop_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        """Per row the 64-bit hash of (seed, index, view): the box is drawn from it once the image's size is known."""
        index, view = np.broadcast_arrays(np.asarray(index), np.asarray(view))
        return hash_u64(self.seed, _TAG_VIEW, index, view).tolist()

    def box(
        self, key: int, height: int, width: int, units: Sequence[float] | None = None
    ) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for one image: torchvision's `RandomResizedCrop.get_params` rule.

        The k-th try's uniforms are `unit(hash(key, k, j))`; i and j are drawn uniformly from the valid offsets.
        `units`: those uniforms, when a batch computed them at once (`_unit_rows`).
        """
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        u = _units(key, _RRC_UNITS) if units is None else units  # (tries * 5 + 1,) uniforms in [0, 1)
        for t in range(_RRC_TRIES):
            u_area, u_ratio, u_top, u_left = u[5 * t : 5 * t + 4]
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u_top * (height - h + 1))
                left = int(u_left * (width - w + 1))
                return top, left, h, w, bool(self.flip and u[-1] < 0.5)
        in_ratio = width / height  # fallback: torchvision's central crop
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w, bool(self.flip and u[-1] < 0.5)

    def render_crops(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        import torch  # lazy: the shard readers and stores import this module without torch
        from torchvision.transforms.v2 import functional as tvf

        out = np.empty((len(images), self.size, self.size, images[0].shape[-1]), dtype=np.uint8)
        views = np.asarray(view).tolist()
        units = _unit_rows(params, _RRC_UNITS)  # (B, 51): every row's uniforms in one vectorised hash
        for k, (img, v) in enumerate(zip(images, views, strict=True)):
            img = np.asarray(img)  # (H, W, C)
            if v == 0:
                x = torch.from_numpy(img).permute(2, 0, 1)  # (C, H, W) view
                x = tvf.center_crop(tvf.resize(x, [self.eval_resize], antialias=True), [self.size, self.size])
                out[k] = x.permute(1, 2, 0).numpy()
                continue
            top, left, h, w, flip = self.box(0, img.shape[0], img.shape[1], units[k])
            # The crop as a contiguous (H, W, C) block: the resize then runs channels-last in and out, so its
            # result lands in the batch by a plain copy (a (C, H, W) result would need a transposing one).
            crop = torch.from_numpy(np.ascontiguousarray(img[top : top + h, left : left + w])).permute(2, 0, 1)
            x = tvf.resize(crop, [self.size, self.size], antialias=True).permute(1, 2, 0).numpy()  # (S, S, C)
            out[k] = x[:, ::-1] if flip else x
        return out


_TAG_PHOTO = 0x5048_4F54  # "PHOT"
#: TrivialAugment Wide's op space (Mueller & Hutter 2021; torchvision's `v2.TrivialAugmentWide`): name ->
#: (magnitude of each of the 31 bins or None, whether the sign is drawn)
_TA_BINS = 31
_TA_SPACE: dict[str, tuple[list[float] | None, bool]] = {
    "Identity": (None, False),
    "ShearX": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "ShearY": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "TranslateX": (np.linspace(0.0, 32.0, _TA_BINS, dtype=np.float32).tolist(), True),
    "TranslateY": (np.linspace(0.0, 32.0, _TA_BINS, dtype=np.float32).tolist(), True),
    "Rotate": (np.linspace(0.0, 135.0, _TA_BINS, dtype=np.float32).tolist(), True),
    "Brightness": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "Color": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "Contrast": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "Sharpness": (np.linspace(0.0, 0.99, _TA_BINS, dtype=np.float32).tolist(), True),
    "Posterize": (np.round(8 - np.arange(_TA_BINS) / ((_TA_BINS - 1) / 6)).astype(int).tolist(), False),
    "Solarize": (np.linspace(1.0, 0.0, _TA_BINS, dtype=np.float32).tolist(), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
PHOTOMETRIC = ("trivial_augment",)  # the `photometric` option's values


def trivial_augment_op(key: int) -> tuple[str, float]:
    """The TrivialAugment Wide op and signed magnitude of one view: torchvision's draw (op, bin, sign) from the
    view's hash instead of torch's global RNG."""
    u = _units(key, 3)
    name = list(_TA_SPACE)[int(u[0] * len(_TA_SPACE))]
    bins, signed = _TA_SPACE[name]
    if bins is None:
        return name, 0.0
    magnitude = float(bins[int(u[1] * _TA_BINS)])
    return name, -magnitude if signed and u[2] < 0.5 else magnitude


def apply_photometric(x: Any, name: str, magnitude: float) -> Any:
    """One TrivialAugment op on a (C, H, W) uint8 tensor, exactly as torchvision's TrivialAugmentWide applies it
    (nearest interpolation, fill 0; tested against torchvision's own op)."""
    from torchvision.transforms.v2 import functional as tvf

    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(magnitude))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return tvf.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return tvf.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    if name == "Rotate":
        return tvf.rotate(x, angle=magnitude)
    adjust = {"Brightness": tvf.adjust_brightness, "Color": tvf.adjust_saturation,
              "Contrast": tvf.adjust_contrast, "Sharpness": tvf.adjust_sharpness}  # fmt: skip
    if name in adjust:
        return adjust[name](x, 1.0 + magnitude)
    if name == "Posterize":
        return tvf.posterize(x, bits=int(magnitude))
    if name == "Solarize":
        return tvf.solarize(x, threshold=255.0 * magnitude)
    return tvf.autocontrast(x) if name == "AutoContrast" else tvf.equalize(x)


def photometric_rows(out: np.ndarray, keys: Sequence[int], view: np.ndarray) -> np.ndarray:
    """TrivialAugment Wide on the rendered views `out` (B, H, W, C) of views >= 1, in place; row k's op drawn from
    `keys[k]` = hash(seed, index k, view k)."""
    import torch

    for k, (key, v) in enumerate(zip(keys, np.asarray(view).tolist(), strict=True)):
        if v == 0:
            continue
        name, magnitude = trivial_augment_op(key)
        x = torch.from_numpy(np.ascontiguousarray(out[k])).permute(2, 0, 1)
        out[k] = apply_photometric(x, name, magnitude).permute(1, 2, 0).numpy()
    return out


_RRC_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
_RRC_UNITS = 5 * _RRC_TRIES + 1  # 4 uniforms per try (+ 1 spare), and the flip's
_TAG_UNIT = 0x554E_4954  # "UNIT"

#: name -> recipe class: `teach.augment.recipe` / `train_teacher.train.augment.recipe` pick one.
RECIPES: dict[str, type[ViewRecipe]] = {PadCropFlip.name: PadCropFlip, ResizedCropFlip.name: ResizedCropFlip}


def check_recipe(recipe: ViewRecipe, manifest: Any, where: str) -> tuple[int, int, int]:
    """The recipe's view shape for this data set, or a one-line `ConfigError` naming `where` and the fix."""
    from pipeline.config import ConfigError  # the config layer's user error (exit 2, one line)

    try:
        return recipe.out_shape(manifest.image_shape)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}", where=where) from None


def view_manifest(manifest: Any, recipe: ViewRecipe) -> Any:
    """`manifest` with `image_shape` the views' shape: what a model built for this data set and recipe sees."""
    return dataclasses.replace(manifest, image_shape=recipe.out_shape(manifest.image_shape))


def _units(key: int, n: int) -> list[float]:
    """n uniforms in [0, 1) from one 64-bit key (53-bit mantissas of a SplitMix64 stream)."""
    h = hash_u64(np.uint64(key).astype(np.int64), _TAG_UNIT, np.arange(n))
    return ((h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))).tolist()


def _unit_rows(keys: Sequence[int], n: int) -> np.ndarray:
    """`_units(key, n)` of every key at once: (B, n) float64, the same bits (one vectorised hash)."""
    k = np.array(keys, dtype=np.uint64).astype(np.int64)[:, None]  # hash_u64 reads int64 (same 64 bits)
    h = hash_u64(k, _TAG_UNIT, np.arange(n)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def build_recipe(transform: dict[str, Any], *, views: int, seed: int) -> ViewRecipe:
    """A recipe from its params / store spelling: `{recipe: name, **its fields}` (no name: `pad_crop_flip`).

    An unknown name or key is a `ValueError` naming the known ones (the config layer turns it into one line).
    """
    t = dict(transform)
    name = t.pop("recipe", None) or PadCropFlip.name
    cls = RECIPES.get(name)
    if cls is None:
        raise ValueError(f"unknown view recipe {name!r}; known: {sorted(RECIPES)}")
    known = {f.name for f in fields(cls)} - {"views", "seed"}
    unknown = sorted(set(t) - known)
    if unknown:
        raise ValueError(f"view recipe {name} has no option(s) {unknown}; its options: {sorted(known)}")
    for key in ("scale", "ratio"):
        if key in t:
            t[key] = tuple(t[key])
    if t.get("mix") is not None:
        t["mix"] = Mix(**t["mix"])
    if t.get("photometric") not in (None, *PHOTOMETRIC):
        raise ValueError(f"unknown photometric op {t['photometric']!r}; known: {list(PHOTOMETRIC)}")
    return cls(views=views, seed=seed, **t)  # type: ignore[call-arg]


def _extras(recipe: ViewRecipe) -> dict[str, Any]:
    """A recipe's optional `photometric` / `mix` entries as stored: absent when off (stores made before keep their
    spelling, hence their spec and bytes)."""
    out: dict[str, Any] = {} if recipe.photometric is None else {"photometric": recipe.photometric}
    return out if recipe.mix is None else {**out, "mix": recipe.mix.to_dict()}


def crop_flip(img: np.ndarray, sy: int, sx: int, flip: bool) -> np.ndarray:
    """One (H, W, C) image: the HxW window of the zero-padded image shifted by (sy, sx), then mirrored.

    Equivalent to `np.pad` + slice (tested) but without materialising the padded copy: out[y, x] =
    img[y + sy, x + sx] where inside the image, 0 outside. The teacher and the student both call
    this one function, which is what makes their inputs bit-identical.
    """
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    if abs(sy) < h and abs(sx) < w:
        out[max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)] = img[
            max(0, sy) : h - max(0, -sy), max(0, sx) : w - max(0, -sx)
        ]
    return out[:, ::-1] if flip else out


def pick_view(seed: int, epoch: int, index: np.ndarray, views: int) -> np.ndarray:
    """Which cached view the student sees for sample `index` at `epoch`: (B,) int64 in [0, views)."""
    if views == 1:
        return np.zeros(np.shape(index), dtype=np.int64)
    return (hash_u64(seed, _TAG_PICK, epoch, index) % np.uint64(views)).astype(np.int64)


def pick_allowed_view(seed: int, epoch: int, index: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Like `views.pick_view`, restricted to the views the teacher answered for each row.

    allowed: (n, V) bool -> (n,) int64 view per row, -1 where no view is allowed. With every view
    allowed it equals `pick_view`, so budget runs and full runs agree on shared rows.
    """
    n, v = allowed.shape
    if allowed.all():
        return pick_view(seed, epoch, index, v)
    count = allowed.sum(1)
    h = hash_u64(seed, _TAG_PICK, epoch, index)  # same stream as pick_view
    r = (h % np.maximum(count, 1).astype(np.uint64)).astype(np.int64)  # r-th allowed view
    rank = np.cumsum(allowed, 1) - 1  # (n, V)
    view = np.argmax(allowed & (rank == r[:, None]), 1)
    return np.where(count > 0, view, -1)


def crop_flip_batch(images: np.ndarray, sy: np.ndarray, sx: np.ndarray, flip: np.ndarray, pad: int) -> np.ndarray:
    """`views.crop_flip` on a batch at once: (B, H, W, C) uint8 with per-row shifts in [-pad, pad] and flips.

    out[b, y, x] = img[b, y + sy, x' + sx] (0 outside the image), x' = W-1-x if flipped else x: the
    same pixels as `crop_flip` (tested), as one gather from a zero-padded copy instead of B calls.
    """
    b, h, w, _ = images.shape
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, images.shape[3]), dtype=images.dtype)
    padded[:, pad : pad + h, pad : pad + w] = images
    rows = np.arange(h)[None, :] + (sy + pad)[:, None]  # (B, H)
    xs = np.arange(w)
    cols = np.where(flip[:, None], xs[::-1][None, :], xs[None, :]) + (sx + pad)[:, None]  # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
