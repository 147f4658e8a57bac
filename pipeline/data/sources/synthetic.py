"""``synthetic``: small deterministic, learnable images for tests and demos (no files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.sources.base import SPLITS, OptionError, SplitData, check_choice, check_split


def load_synthetic(
    root: Path | None,
    split: str,
    *,
    n: int = 512,
    size: int = 16,
    channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
) -> SplitData:
    """Deterministic, learnable toy images; ``root`` is ignored.

    Each class has a fixed random low-frequency template (4x4 Gaussian blocks upsampled to ``size``),
    shared by both splits; a sample is its class template shifted by up to 1 pixel plus Gaussian pixel
    noise. A tiny CNN (even a nearest-centroid classifier) gets far above chance, yet the noise keeps it
    from being a lookup. Train and test draw different samples from streams seeded by ``(seed, split)``.
    """
    check_split("synthetic", split)
    for name, value, low in (("n", n, 1), ("size", size, 4), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"option {name}={value!r} is invalid; expected an int >= {low}")
    check_choice("channels", channels, (1, 3))
    proto = np.random.default_rng([seed, 0])  # templates: independent of the split, so test matches train
    coarse = proto.normal(size=(num_classes, 4, 4, channels))
    block = -(-size // 4)  # ceil: upsample by whole blocks, then crop to size
    templates = coarse.repeat(block, axis=1).repeat(block, axis=2)[:, :size, :size]  # (K, S, S, C)
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes, shuffled
    shifts = rng.integers(-1, 2, size=(n, 2))
    images = templates[labels]  # (N, S, S, C)
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], (int(dy), int(dx)), axis=(0, 1))
    images = 128.0 + 45.0 * images + rng.normal(0.0, 35.0, size=images.shape)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return SplitData(images, labels, [f"class_{k}" for k in range(num_classes)], [])
