"""The `prepare` stage's library side: a source data set -> WebDataset shards + manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, PrepareConfig
from pipeline.data.shards import Manifest, Samples, write_dataset
from pipeline.data.sources import STREAMED, SplitData, StreamedSplit, check_options, load_split

log = logging.getLogger(__name__)


def open_split(cfg: PrepareConfig, split: str) -> SplitData | StreamedSplit:
    """One split of the source: in memory (IDX, CIFAR pickles, synthetic) or streamed (ImageFolder, hf)."""
    if cfg.source in STREAMED:
        # Streamed: indexed now, decoded while the shards are written (memory: one image or window, any size).
        if cfg.root is None:
            raise ConfigError(f"source {cfg.source!r} needs a root: set `prepare.root` to where the data set is")
        check_options(cfg.source, cfg.options)
        return STREAMED[cfg.source](Path(cfg.root), split, **cfg.options)
    return load_split(cfg.source, cfg.root, split, **cfg.options)


def prepare(cfg: PrepareConfig, out: str | Path) -> Manifest:
    """Write every split of `cfg`'s source as shards into `out` (atomically); returns the manifest."""
    splits: dict[str, Samples] = {}
    classes: list[str] | None = None
    for split in cfg.splits:
        data = open_split(cfg, split)
        if classes is not None and list(data.classes) != list(classes):
            raise ValueError(f"split {split} has classes {data.classes}, other splits have {classes}")
        classes = list(data.classes)
        shuffle = split == "train" and cfg.shuffle_seed is not None
        # Sources like ImageFolder come sorted by class; shards must mix classes for the loader's shard-level
        # + buffer shuffle to give well-mixed batches. A fixed seed keeps it reproducible.
        if not isinstance(data, SplitData):
            if shuffle:
                data.permute(cfg.shuffle_seed)
            splits[split] = data
            log.info("%s/%s: streaming %d images from %s", cfg.source, split, len(data), data.location)
        else:
            images, labels = data.images, data.labels.astype("int64")
            if shuffle:
                perm = np.random.default_rng(cfg.shuffle_seed).permutation(len(labels))
                images, labels = images[perm], labels[perm]
            splits[split] = (images, labels)
            log.info("%s/%s: %d images of shape %s", cfg.source, split, len(labels), images.shape[1:])
    assert classes is not None
    return write_dataset(out, cfg.name, splits, classes, cfg.shard_size, limit=cfg.limit)
