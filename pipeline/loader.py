"""The student data path: WebDataset shards joined with cached teacher logits.

Per epoch `e`, a `webdataset.DataPipeline` lists the split's shards, shuffles them with a seeded
permutation of `(seed, e)`, splits them by node (DDP rank) and by DataLoader worker, and streams
samples. When a sample from a new shard arrives, the joiner reads that shard's logits as **one
contiguous block** from the store (shards and store shards cover the same rows), verifies that
the sample's key is the expected row, picks the view `v(seed, e, i)`, and applies the identical
augmentation the teacher saw. A seeded shuffle buffer then mixes samples across shards.

Every sample is seen exactly once per epoch over all ranks and workers (shards are partitioned,
never resampled, so webdataset's `with_epoch` pitfall does not arise), and a given
`(seed, epoch, world size, workers)` gives the same stream.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.shards import Manifest, decode_png
from pipeline.store import LogitStore
from pipeline.views import ViewRecipe, crop_flip, hash_u64, pick_view

log = logging.getLogger(__name__)

_TAG_SHUFFLE = 0x5348_5546


def batch_to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]; the same ops as `views.to_tensor`."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def pick_allowed_view(seed: int, epoch: int, index: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Like `views.pick_view`, restricted to the views the teacher answered for each row.

    allowed: (n, V) bool -> (n,) int64 view per row, -1 where no view is allowed. With every view
    allowed it equals `pick_view`, so budget runs and full runs agree on shared rows.
    """
    n, v = allowed.shape
    if allowed.all():
        return pick_view(seed, epoch, index, v)
    count = allowed.sum(1)
    h = hash_u64(seed, 0x5049_434B, epoch, index)  # same stream as pick_view
    r = (h % np.maximum(count, 1).astype(np.uint64)).astype(np.int64)  # r-th allowed view
    rank = np.cumsum(allowed, 1) - 1  # (n, V)
    view = np.argmax(allowed & (rank == r[:, None]), 1)
    return np.where(count > 0, view, -1)


class _Joiner:
    """Stateful map: attach logits + view to each sample, loading one store block per shard."""

    def __init__(self, ds: DistillDataset, epoch: int) -> None:
        self.ds = ds
        self.epoch = epoch
        self.url: str | None = None
        self.shard_start = 0
        self.block: np.ndarray | None = None  # (n, V, C) or None (no store)
        self.view: np.ndarray | None = None  # (n,) chosen view, -1 = skip
        self.has_teacher: np.ndarray | None = None  # (n,) bool
        self.shift: np.ndarray | None = None  # (n, 3): crop shift y, x and flip of each row's view
        self.expect = 0

    def _load(self, url: str) -> None:
        info = self.ds.shard_info.get(url)
        if info is None:
            raise ValueError(f"shard {url} is not in the manifest {self.ds.manifest.root}")
        n = info.stop - info.start
        index = np.arange(info.start, info.stop)
        self.url, self.shard_start, self.expect = url, info.start, info.start
        store = self.ds.store()
        allowed = self.ds.allowed[info.start : info.stop] if self.ds.allowed is not None else None
        if store is not None:
            self.block = store.read_block(info.start, info.stop)  # one contiguous read per shard
            view = pick_allowed_view(self.ds.seed, self.epoch, index, allowed)
            self.has_teacher = view >= 0
            if self.ds.unqueried == "ce":  # rows without teacher logits still train with CE on view 0
                view = np.where(view < 0, 0, view)
            self.view = view
        else:
            self.block = None
            self.view = (
                pick_view(self.ds.seed, self.epoch, index, self.ds.recipe.views)
                if self.ds.augment
                else np.zeros(n, dtype=np.int64)
            )
            self.has_teacher = np.zeros(n, dtype=bool)
        # View parameters for the whole shard at once (vectorised hash), applied per sample below.
        dy, dx, flip = self.ds.recipe.params(index, np.maximum(self.view, 0))
        pad = self.ds.recipe.pad
        self.shift = np.stack([dy - pad, dx - pad, flip.astype(np.int64)], 1)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        url = sample["__url__"]
        if url != self.url:
            self._load(url)
        key = sample["__key__"]
        i = int(key)
        if i != self.expect:
            raise ValueError(
                f"shard {url}: sample key {key} where row {self.expect} was expected; "
                "shards and manifest disagree: re-run `dvc repro prepare`"
            )
        self.expect += 1
        r = i - self.shard_start
        v = int(self.view[r])
        if v < 0:
            return None  # budget mode: the teacher never saw this sample
        try:
            img = decode_png(sample["png"])
        except Exception as e:
            raise ValueError(f"shard {url}: cannot decode sample {key}: {e}") from e
        if v > 0:
            sy, sx, flip = self.shift[r]
            img = crop_flip(img, int(sy), int(sx), bool(flip))
        out = {"image": torch.from_numpy(np.ascontiguousarray(img)), "label": int(sample["cls"]), "index": i, "view": v}
        if self.block is not None:
            out["logits"] = torch.from_numpy(self.block[r, v])
            out["has_teacher"] = bool(self.has_teacher[r])
        return out


class DistillDataset(IterableDataset):
    """Iterable over one split: dicts with image (H, W, C) uint8, label, index, view[, logits (C,)].

    store_path: a logit store to join (None: images and labels only, e.g. teacher training/eval).
    allowed: optional (N, V) bool of usable sample-views (budget); default = the store's `queried`.
    augment: without a store, draw views from `recipe` (teacher training); with one, the store's
    recipe is used, always.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        store_path: str | Path | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        recipe: ViewRecipe | None = None,
        augment: bool = False,
        allowed: np.ndarray | None = None,
        unqueried: str = "drop",
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.split = split
        self.urls = manifest.shard_urls(split)
        self.shard_info = manifest.shard_for_url(split)
        self.store_path = str(store_path) if store_path else None
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.unqueried = unqueried
        self._store: LogitStore | None = None
        if self.store_path:
            store = LogitStore(self.store_path, split=split, manifest=manifest)  # verify once, up front
            self.recipe = ViewRecipe.from_dict(store.view_recipe)
            self.num_classes = store.num_classes
            self.allowed = allowed if allowed is not None else store.queried()
            if self.allowed.shape != (store.n, store.views):
                raise ValueError(f"allowed mask shape {self.allowed.shape} != store rows/views {(store.n, store.views)}")
        else:
            self.recipe = recipe or ViewRecipe()
            self.num_classes = manifest.num_classes
            self.allowed = None
        self.augment = augment
        if unqueried not in ("drop", "ce"):
            raise ValueError(f"unqueried must be 'drop' or 'ce', got '{unqueried}'")

    def store(self) -> LogitStore | None:
        """The store, opened lazily once per worker process (zarr handles are not shared across forks)."""
        if self.store_path and self._store is None:
            self._store = LogitStore(self.store_path, split=self.split)
        return self._store

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        """Samples one epoch yields over all ranks/workers."""
        if self.allowed is None or self.unqueried == "ce":
            return self.manifest.split(self.split).n
        return int(self.allowed.any(1).sum())

    def _shard_order(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shards = list(src)
        if self.shuffle:
            seed = int(hash_u64(self.seed, _TAG_SHUFFLE, self.epoch)[()])
            random.Random(seed).shuffle(shards)
        yield from shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        stages: list[Any] = [
            wds.SimpleShardList(self.urls),
            self._shard_order,
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.map(_Joiner(self, self.epoch)),
            wds.select(lambda s: s is not None),
        ]
        if self.shuffle and self.shuffle_buffer > 1:
            worker = info.id if info else 0
            rng = random.Random(int(hash_u64(self.seed, self.epoch, rank, worker)[()]))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 500), rng=rng))
        return iter(wds.DataPipeline(*stages))


def make_loader(dataset: DistillDataset, batch_size: int, workers: int = 1, drop_last: bool = False) -> DataLoader:
    """A DataLoader over the iterable dataset (workers split shards; batches are made per worker)."""
    n_shards = len(dataset.urls)
    if workers > n_shards:
        log.info("workers %d > shards %d: using %d workers", workers, n_shards, n_shards)
        workers = n_shards
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # the dataset (and its epoch) is re-sent to workers every epoch
        prefetch_factor=4 if workers else None,
    )
