"""DVC stage `prepare`: read the source data set and write WebDataset shards + manifest.

python -m stages.prepare [--params params.yaml] [--out data/shards/<name>]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig, load_section
from pipeline.runtime import setup_logging
from pipeline.shards import Samples, write_dataset
from pipeline.sources import SplitData, SplitStream, check_options, load_split, open_imagefolder

log = logging.getLogger("stages.prepare")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (section `prepare`)")
    ap.add_argument("--out", default=None, help="output folder (default: data/shards/<prepare.name>)")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = load_section(PrepareConfig, "prepare", args.params)
    out = args.out or f"data/shards/{cfg.name}"
    splits: dict[str, Samples] = {}
    classes: list[str] | None = None
    for split in cfg.splits:
        if cfg.source == "imagefolder":
            # Streamed: indexed now, decoded while the shards are written (memory: one image, any folder size).
            if cfg.root is None:
                raise ValueError("source 'imagefolder' needs a root: set `prepare.root` to the folder or archive")
            check_options(cfg.source, cfg.options)
            data: SplitData | SplitStream = open_imagefolder(Path(cfg.root), split, **cfg.options)
        else:
            data = load_split(cfg.source, cfg.root, split, **cfg.options)
        if classes is not None and list(data.classes) != list(classes):
            raise ValueError(f"split {split} has classes {data.classes}, other splits have {classes}")
        classes = list(data.classes)
        shuffle = split == "train" and cfg.shuffle_seed is not None
        # Sources like ImageFolder come sorted by class; shards must mix classes for the loader's shard-level
        # + buffer shuffle to give well-mixed batches. A fixed seed keeps it reproducible.
        if isinstance(data, SplitStream):
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
    write_dataset(out, cfg.name, splits, classes, cfg.shard_size, limit=cfg.limit)


if __name__ == "__main__":
    main()
