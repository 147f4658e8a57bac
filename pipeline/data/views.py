"""Deterministic augmentation views ("consistent teaching").

A random augmentation cached once goes stale if the student sees a different crop. So the
augmentation of sample `i`, view `v` is a pure function of `(seed, i, v)`:

- view 0 is the plain image;
- views 1..V-1 are a random crop of the zero-padded image and a random horizontal flip, with the
  offsets and the flip drawn from a counter-based hash of `(seed, i, v)`.

The teacher caches logits for all V views; the student at epoch `e` picks view
`pick_view(seed, e, i, V)` and applies the *same* function, so its input is bit for bit the image
the teacher labelled (tested). A counter-based hash (SplitMix64) instead of a seeded RNG object per
sample keeps it vectorised and independent of worker count, shard order and process.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ViewRecipe:
    """How views are made: stored in the logit store so a student can check it trains on the same views."""

    views: int = 1
    seed: int = 0
    pad: int = 4
    flip: bool = True

    def to_dict(self) -> dict:
        return {"views": self.views, "seed": self.seed, "transform": {"pad": self.pad, "flip": self.flip}}

    @classmethod
    def fresh(cls, seed: int = 0, pad: int = 4, flip: bool = True) -> ViewRecipe:
        """Augmentation without a cache (teacher training): every (epoch, sample) draws a view of its own.

        Implemented as a recipe with 2^30 views, so `pick_view` is effectively a fresh random draw.
        """
        return cls(views=FRESH_VIEWS, seed=seed, pad=pad, flip=flip)

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        t = d.get("transform", {})
        return cls(views=int(d["views"]), seed=int(d["seed"]), pad=int(t.get("pad", 4)), flip=bool(t.get("flip", True)))

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

    def apply(self, images: np.ndarray, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Augment a batch: images (B, H, W, C) uint8, index (B,), view (B,) -> (B, H, W, C) uint8."""
        b = images.shape[0]
        if self.pad == 0 and not self.flip:
            return images
        dy, dx, flip = self.params(np.broadcast_to(index, (b,)), np.broadcast_to(view, (b,)))
        out = np.empty_like(images)
        for k in range(b):
            out[k] = crop_flip(images[k], int(dy[k]) - self.pad, int(dx[k]) - self.pad, bool(flip[k]))
        return out


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
