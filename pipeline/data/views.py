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
        raise NotImplementedError

    def render(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        """The views' pixels: images (B of (H, W, C) uint8), their `row_params`, view (B,) -> (B, H', W', C) uint8."""
        raise NotImplementedError

    def apply(self, images: Images, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Augment a batch: images (B, H, W, C) uint8 (or B arrays), index (B,), view (B,) -> (B, H', W', C) uint8."""
        b = len(images)
        index, view = np.broadcast_to(index, (b,)), np.broadcast_to(view, (b,))
        return self.render(images, self.row_params(index, view), view)


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

    def transform(self) -> dict[str, Any]:
        # No "recipe" key: the layout stores had before the registry, so their spec (and bytes) stay the same.
        return {"pad": self.pad, "flip": self.flip}

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

    def row_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        dy, dx, flip = self.params(index, view)
        return np.stack([dy - self.pad, dx - self.pad, flip.astype(np.int64)], -1).tolist()  # (B, 3): sy, sx, flip

    def render(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
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
        }

    def out_shape(self, image_shape: Sequence[int | None]) -> tuple[int, int, int]:
        return self.size, self.size, int(image_shape[-1])  # type: ignore[arg-type]

    def row_params(self, index: np.ndarray, view: np.ndarray) -> list[Any]:
        """Per row the 64-bit hash of (seed, index, view): the box is drawn from it once the image's size is known."""
        index, view = np.broadcast_arrays(np.asarray(index), np.asarray(view))
        return hash_u64(self.seed, _TAG_VIEW, index, view).tolist()

    def box(self, key: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for one image: torchvision's `RandomResizedCrop.get_params` rule.

        The k-th try's uniforms are `unit(hash(key, k, j))`; i and j are drawn uniformly from the valid offsets.
        """
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        u = _units(key, 5 * _RRC_TRIES + 1)  # (tries * 5 + 1,) uniforms in [0, 1)
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

    def render(self, images: Images, params: Sequence[Any], view: np.ndarray) -> np.ndarray:
        import torch  # lazy: the shard readers and stores import this module without torch
        from torchvision.transforms.v2 import functional as tvf

        out = np.empty((len(images), self.size, self.size, images[0].shape[-1]), dtype=np.uint8)
        for k, (img, key, v) in enumerate(zip(images, params, np.asarray(view).tolist(), strict=True)):
            x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)  # (C, H, W) view
            if v == 0:
                x = tvf.center_crop(tvf.resize(x, [self.eval_resize], antialias=True), [self.size, self.size])
            else:
                top, left, h, w, flip = self.box(int(key), x.shape[1], x.shape[2])
                x = tvf.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
                if flip:
                    x = x.flip(-1)
            out[k] = x.permute(1, 2, 0).numpy()
        return out


_RRC_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
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
    return cls(views=views, seed=seed, **t)  # type: ignore[call-arg]


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
