"""The `prepare` stage's library side: a source data set -> WebDataset shards + manifest.

The train split of the source is divided into `train` and `val` (`prepare.val`: a fraction or a count;
seeded and class-stratified, `stratified_split`) before sharding, so every checkpoint choice downstream
(best epoch, loss settings, anything a benchmark tunes) is made on `val` and the source's test split is
used for final reporting only.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, PrepareConfig
from pipeline.data.shards import Manifest, Samples, write_dataset
from pipeline.data.sources import STREAMED, SplitData, StreamedSplit, check_options, load_split
from pipeline.errors import InputError

log = logging.getLogger(__name__)

_TAG_VAL = 0x56414C  # "VAL": the validation draw's own random stream


def open_split(cfg: PrepareConfig, split: str) -> SplitData | StreamedSplit:
    """One split of the source: in memory (IDX, CIFAR pickles, synthetic) or streamed (ImageFolder, hf)."""
    if cfg.source in STREAMED:
        # Streamed: indexed now, decoded while the shards are written (memory: one image or window, any size).
        if cfg.root is None:
            raise ConfigError(f"source {cfg.source!r} needs a root: set `prepare.root` to where the data set is")
        check_options(cfg.source, cfg.options)
        opener = STREAMED[cfg.source]
        # `prepare.encode` reaches the sources that hold encoded files (ImageFolder); the others decode to PNG
        keep = {"encode": cfg.encode} if "encode" in inspect.signature(opener).parameters else {}
        return opener(Path(cfg.root), split, **cfg.options, **keep)
    return load_split(cfg.source, cfg.root, split, **cfg.options)


def validation_counts(labels: np.ndarray, val: float | int, classes: list[str]) -> np.ndarray:
    """Validation images per class: `val * n_c` rounded half up for a fraction, a count spread over the classes in
    proportion to their sizes (largest remainders) otherwise. Every class keeps at least one image on each
    side, else a `ConfigError` names the class and the fix."""
    counts = np.bincount(labels, minlength=len(classes))  # (C,)
    n = int(counts.sum())
    if isinstance(val, float):
        k = np.floor(val * counts + 0.5).astype(np.int64)  # round half up: 5 images at 0.1 give one
        what = f"prepare.val={val}"
    else:
        if val >= n:
            raise ConfigError(
                f"prepare.val={val} is not smaller than the train split ({n} images): give a fraction such as 0.1 "
                "or a smaller count"
            )
        exact = val * counts / n
        k = np.floor(exact).astype(np.int64)
        order = np.argsort(-(exact - k), kind="stable")  # largest remainders first
        k[order[: val - int(k.sum())]] += 1
        what = f"prepare.val={val}"
    present = counts > 0
    for c in np.flatnonzero(present & (k == 0)):
        need = int(np.ceil(n / counts[c])) if not isinstance(val, float) else None
        hint = f"a fraction of at least {0.5 / counts[c]:.3g}" if isinstance(val, float) else f"at least {need}"
        raise ConfigError(
            f"{what} leaves class {classes[c]!r} ({counts[c]} train images) without validation images: "
            f"raise prepare.val ({hint}) or set prepare.val: 0 for no validation split"
        )
    for c in np.flatnonzero(present & (k >= counts)):
        raise ConfigError(
            f"{what} would move every train image of class {classes[c]!r} ({counts[c]}) to validation: "
            "lower prepare.val"
        )
    return k


def stratified_split(
    labels: np.ndarray, val: float | int, seed: int, classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), both sorted: `validation_counts` images of each class drawn
    uniformly at random (seeded), the rest stay in train. A pure function of (labels, val, seed)."""
    k = validation_counts(labels, val, classes)
    rng = np.random.default_rng([int(seed), _TAG_VAL])
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.flatnonzero(k):
        members = np.flatnonzero(labels == c)
        is_val[rng.choice(members, size=int(k[c]), replace=False)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _labels(data: SplitData | StreamedSplit) -> np.ndarray:
    return data.labels.astype(np.int64) if isinstance(data, SplitData) else data.split_labels()


def _shuffled(data: SplitData | StreamedSplit, seed: int | None) -> Samples:
    """Shards must mix classes for the loader's shard-level + buffer shuffle to give well-mixed batches;
    sources like ImageFolder come sorted by class. A fixed seed keeps it reproducible."""
    if not isinstance(data, SplitData):
        if seed is not None:
            data.permute(seed)
        return data
    images, labels = data.images, data.labels.astype("int64")
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(labels))
        images, labels = images[perm], labels[perm]
    return images, labels


def prepare(cfg: PrepareConfig, out: str | Path) -> Manifest:
    """Write every split of `cfg`'s source as shards into `out` (atomically), with a validation split
    carved out of train when `prepare.val` asks for one; returns the manifest."""
    if cfg.val and "val" in cfg.splits:
        raise ConfigError(
            "prepare.splits lists a 'val' split of the source and prepare.val asks to carve one out of train: "
            "set prepare.val: 0 to use the source's, or drop 'val' from prepare.splits"
        )
    if cfg.val and "train" not in cfg.splits:
        raise ConfigError("prepare.val carves the validation split out of train: add 'train' to prepare.splits")
    opened: dict[str, SplitData | StreamedSplit] = {}
    classes: list[str] | None = None
    for split in cfg.splits:
        data = open_split(cfg, split)
        if classes is not None and list(data.classes) != list(classes):
            raise InputError(
                f"split {split} has classes {data.classes}, other splits have {classes}: every split needs the "
                "same classes (an ImageFolder: the same class folders)"
            )
        classes = list(data.classes)
        opened[split] = data
    assert classes is not None
    if cfg.val:
        train_idx, val_idx = stratified_split(_labels(opened["train"]), cfg.val, cfg.val_seed, classes)
        source = opened.pop("train")
        order = {"train": source.subset(train_idx), "val": source.subset(val_idx)}
        opened = {**order, **opened}
        log.info("validation split: %d of %d train images (seed %d)", len(val_idx), len(train_idx) + len(val_idx),
                 cfg.val_seed)  # fmt: skip
    splits: dict[str, Samples] = {}
    for split, data in opened.items():
        seed = cfg.shuffle_seed if split in ("train", "val") else None
        splits[split] = _shuffled(data, seed)
        where = f"shape {data.images.shape[1:]}" if isinstance(data, SplitData) else data.location
        log.info("%s/%s: %d images (%s)", cfg.source, split, len(_labels(data)), where)
    return write_dataset(out, cfg.name, splits, classes, cfg.shard_size, limit=cfg.limit)
