"""DVC stage `prepare`: read the source data set and write WebDataset shards + manifest.

python -m stages.prepare [--params params.yaml] [--out data/shards/<name>]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from pipeline.config import PrepareConfig, load_section
from pipeline.runtime import setup_logging
from pipeline.shards import write_dataset
from pipeline.sources import load_split

log = logging.getLogger("stages.prepare")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (section `prepare`)")
    ap.add_argument("--out", default=None, help="output folder (default: data/shards/<prepare.name>)")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = load_section(PrepareConfig, "prepare", args.params)
    out = args.out or f"data/shards/{cfg.name}"
    splits, classes = {}, None
    for split in cfg.splits:
        data = load_split(cfg.source, cfg.root, split, **cfg.options)
        if classes is not None and list(data.classes) != list(classes):
            raise ValueError(f"split {split} has classes {data.classes}, other splits have {classes}")
        classes = data.classes
        images, labels = data.images, data.labels.astype("int64")
        if split == "train" and cfg.shuffle_seed is not None:
            # Sources like ImageFolder come sorted by class; shards must mix classes for the loader's
            # shard-level + buffer shuffle to give well-mixed batches. A fixed seed keeps it reproducible.
            perm = np.random.default_rng(cfg.shuffle_seed).permutation(len(labels))
            images, labels = images[perm], labels[perm]
        n = len(labels) if cfg.limit is None else min(cfg.limit, len(labels))
        splits[split] = (images[:n], labels[:n])
        log.info("%s/%s: %d images of shape %s", cfg.source, split, n, data.images.shape[1:])
    write_dataset(out, cfg.name, splits, list(classes), cfg.shard_size)


if __name__ == "__main__":
    main()
