"""The queried pool: budget runs train on the few sample-views the teacher answered, held in memory.

Under a teacher-call budget (CKD's few-teacher-inference setting, arXiv 2311.02253) the usable data
is small by construction: n sample-views. Streaming all shards to find them every epoch would cost a
full pass for a handful of rows, so the pool decodes them once (each with its cached view already
applied) and every epoch draws `epoch_samples` rows from it, seeded by `(seed, epoch)` (back-to-back
permutations). The number of optimizer steps therefore does not shrink with the budget: every
budget trains for the same schedule (as in the paper), and CKD's groups, drawn from batches that are
fresh random draws from the whole pool, cover all O(n^2) pairs over training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.loader import EpochPlan
from pipeline.shards import Manifest, iter_shard
from pipeline.store import LogitStore
from pipeline.views import ViewRecipe, hash_u64

log = logging.getLogger(__name__)

_TAG_POOL = 0x504F_4F4C  # "POOL"


class QueriedPool(IterableDataset):
    """In-memory (image, logits) pairs of every allowed sample-view; yields DistillDataset-style dicts.

    allowed: (N, V) bool of usable sample-views (a subset of the store's `queried`).
    epoch_samples: rows per epoch (back-to-back permutations of the pool); default N of the split.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        store_path: str | Path,
        allowed: np.ndarray,
        *,
        seed: int = 0,
        epoch_samples: int | None = None,
    ) -> None:
        super().__init__()
        store = LogitStore(store_path, split=split, manifest=manifest)
        if allowed.shape != (store.n, store.views):
            raise ValueError(f"allowed mask shape {allowed.shape} != store rows/views {(store.n, store.views)}")
        if (allowed & ~store.queried()).any():
            raise ValueError(f"allowed sample-views include some the teacher never answered in {store_path}")
        recipe = ViewRecipe.from_dict(store.view_recipe)
        rows, views = np.nonzero(allowed)  # (P,) each, sorted by row
        if len(rows) == 0:
            raise ValueError("the queried pool is empty: budget 0 or no queried sample-views in the store")
        self.manifest = manifest
        self.split = split
        self.seed = seed
        self.epoch = 0
        self.num_classes = store.num_classes
        self.index = rows.astype(np.int64)
        self.view = views.astype(np.int64)
        self.logits = store.read_rows(rows)[np.arange(len(rows)), views]  # (P, C)
        self.teacher_features: Any = None  # as DistillDataset.teacher_features: the loader adds them per batch
        shape = manifest.image_shape
        self.images = np.empty((len(rows), *shape), dtype=np.uint8)  # (P, H, W, C), views applied
        self.labels = np.empty(len(rows), dtype=np.int64)
        wanted = set(rows.tolist())
        pos = {}
        for p, r in enumerate(rows.tolist()):
            pos.setdefault(r, []).append(p)
        for shard in manifest.split(split).shards:
            if not any(shard.start <= r < shard.stop for r in wanted):
                continue
            for key, img, label in iter_shard(manifest.root / shard.path):
                i = int(key)
                for p in pos.get(i, ()):
                    self.images[p] = recipe.apply(img[None], np.array([i]), np.array([self.view[p]]))[0]
                    self.labels[p] = label
        self.epoch_samples = int(epoch_samples or manifest.split(split).n)
        self.shuffle = True  # an epoch is a random draw (predict_split must not use a pool)
        self.recipe = recipe
        log.info("queried pool: %d sample-views of %d rows in memory", len(rows), len(wanted))

    def __len__(self) -> int:
        return self.epoch_samples

    # -- the interface `pipeline.train.train` and `pipeline.loader.make_loader` use ----------------

    urls: tuple[str, ...] = ()  # nothing to stream: make_loader then runs in-process (workers=0)

    def pool_size(self) -> int:
        return len(self.index)

    def num_samples(self) -> int:
        return self.epoch_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def world(self) -> int:
        return self._node()[1]

    @staticmethod
    def _node() -> tuple[int, int]:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)

    def draws(self, epoch: int) -> np.ndarray:
        """Pool positions drawn in `epoch` (all ranks together): back-to-back seeded permutations of the
        pool, so every sample-view is used equally often and a batch repeats one only when the pool is
        smaller than the batch."""
        seed = int(hash_u64(self.seed, _TAG_POOL, epoch)[()])
        rng = np.random.default_rng(seed)
        p = len(self.index)
        passes = -(-self.epoch_samples // p)  # ceil
        return np.concatenate([rng.permutation(p) for _ in range(passes)])[: self.epoch_samples]

    def plan(self, batch_size: int, workers: int, drop_last: bool = False, epoch: int | None = None) -> EpochPlan:
        """Samples and batches per rank: rank r takes draws r, r + world, ..."""
        world = self.world()
        n = self.epoch_samples
        samples = tuple(len(range(r, n, world)) for r in range(world))
        rnd = math.floor if drop_last else math.ceil
        return EpochPlan(samples, tuple(rnd(k / batch_size) for k in samples))

    def _np_batches(self, batch_size: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
        rank, world = self._node()
        picks = self.draws(self.epoch)[rank::world]
        stop = len(picks) - len(picks) % batch_size if drop_last else len(picks)
        for k in range(0, stop, batch_size):
            p = picks[k : k + batch_size]
            yield {
                "image": self.images[p],  # (B, H, W, C) uint8, view already applied
                "label": self.labels[p],
                "index": self.index[p],
                "view": self.view[p],
                "logits": self.logits[p],  # (B, C) float32
                "has_teacher": np.ones(len(p), dtype=bool),
                "pool_id": p.astype(np.int64),  # sample-view identity, for counting CKD comparisons
            }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise TypeError("QueriedPool yields whole batches: use pipeline.loader.make_loader(pool, batch_size)")
