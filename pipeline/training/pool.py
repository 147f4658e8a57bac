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
from torch import nn

from pipeline.cache.store import LogitStore
from pipeline.data.shards import Manifest, read_rows
from pipeline.data.views import MixSource, ViewRecipe, hash_u64
from pipeline.runtime import rank_world
from pipeline.training.source import EpochPlan, TeacherFeatures

log = logging.getLogger(__name__)

_TAG_POOL = 0x504F_4F4C  # "POOL"


class QueriedPool:
    """In-memory (image, logits) pairs of every allowed sample-view: a `BatchSource` of DistillDataset-style batches.

    store: the store's path, or an open `LogitStore` (an active query round reads the store it is writing).
    allowed: (N, V) bool of usable sample-views (a subset of the store's `queried`).
    epoch_samples: rows per epoch (back-to-back permutations of the pool); default N of the split.
    teacher_features: as `DistillDataset`'s, added to each batch by the loader.
    members: also hold an ensemble store's member logits and batch them as `members (B, M, C)`.
    Batches are made in the training process (`max_workers` 0): the pool is already decoded.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        store: str | Path | LogitStore,
        allowed: np.ndarray,
        *,
        seed: int = 0,
        epoch_samples: int | None = None,
        teacher_features: TeacherFeatures | None = None,
        members: bool = False,
    ) -> None:
        if not isinstance(store, LogitStore):
            store = LogitStore(store, split=split, manifest=manifest)
        if allowed.shape != (store.n, store.views):
            raise ValueError(f"allowed mask shape {allowed.shape} != store rows/views {(store.n, store.views)}")
        if (allowed & ~store.queried()).any():
            raise ValueError(f"allowed sample-views include some the teacher never answered in {store.path}")
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
        self.members = store.read_member_rows(rows)[np.arange(len(rows)), views] if members else None  # (P, M, C)
        self.teacher_features = teacher_features
        images, self.labels = read_rows(manifest, split, self.index)  # (P, H, W, C) uint8, (P,)
        partners = None
        if recipe.mix is not None:  # a mixing recipe's partners: read once, by row
            partners = MixSource(lambda rows: read_rows(manifest, split, rows)[0], store.shard_rows, store.n)
        # each sample-view with its cached view applied
        self.images = recipe.apply(images, self.index, self.view, partners)
        self.mix = None  # (label2 (P,), lam (P,)): the CE's mixed target of each pooled view
        if recipe.mix is not None:
            hw = self.images.shape[1:3]
            plan = recipe.mix.plan(recipe.seed, self.index, self.view, store.shard_rows, store.n, hw)
            mixed = plan.partner >= 0
            label2 = self.labels.copy()
            if mixed.any():
                label2[mixed] = read_rows(manifest, split, plan.partner[mixed])[1]
            self.mix = (label2, plan.lam.astype(np.float32))
        self.epoch_samples = int(epoch_samples or manifest.split(split).n)
        self.recipe = recipe
        log.info("queried pool: %d sample-views of %d rows in memory", len(rows), len(np.unique(rows)))

    def __len__(self) -> int:
        return self.epoch_samples

    # -- BatchSource ------------------------------------------------------------------------------

    max_workers = 0  # decoded already: batching is a gather, cheaper than shipping batches from a worker

    def pool_size(self) -> int:
        return len(self.index)

    def num_samples(self) -> int:
        return self.epoch_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def world(self) -> int:
        return rank_world()[1]

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

    def numpy_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        rank, world = rank_world()
        picks = self.draws(self.epoch)[rank::world]
        stop = len(picks) - len(picks) % batch_size if drop_last else len(picks)
        for k in range(0, stop, batch_size):
            p = picks[k : k + batch_size]
            batch = {
                "image": self.images[p],  # (B, H, W, C) uint8, view already applied
                "label": self.labels[p],
                "index": self.index[p],
                "view": self.view[p],
                "logits": self.logits[p],  # (B, C) float32
                "has_teacher": np.ones(len(p), dtype=bool),
                "pool_id": p.astype(np.int64),  # sample-view identity, for counting CKD comparisons
            }
            if self.members is not None:
                batch["members"] = self.members[p]  # (B, M, C) float32
            if self.mix is not None:
                batch["mix_label"], batch["mix_lam"] = self.mix[0][p], self.mix[1][p]
            yield batch


class ComparisonTracker:
    """Counts the distinct comparisons a CKD student sees over training (budget runs, issue 6).

    With a queried pool (batches carry `pool_id`, the sample-view's identity), the loop draws CKD's
    groups from the loss's own seeded sampler, the same draw the loss would make itself, so the stream
    and resume state are unchanged, drops groups that hold one sample-view twice, and records each
    group as its tuple of pool ids (A first, then B: an ordered comparison). Inactive for losses
    without comparisons or without a pool.
    """

    def __init__(self, loss_fn: Any) -> None:
        mods = loss_fn.modules() if isinstance(loss_fn, nn.Module) else []
        samplers = (m for m in mods if "groups" in getattr(m, "reads", ()) and hasattr(m, "sample_groups"))
        self.sampler = next(samplers, None)
        self.seen: set[tuple[int, ...]] = set()
        self.active = False

    def draw(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.sampler is None or "pool_id" not in batch:
            return None
        self.active = True
        groups = self.sampler.sample_groups(len(batch["label"]))  # (G, k) row indices
        ids = batch["pool_id"][groups.cpu()]  # (G, k) pool sample-view ids
        # A small pool repeats a sample-view within a batch; a group holding one twice compares a sample
        # with itself (zero difference, no signal): drop those, count the rest.
        ok = (ids.sort(dim=1).values.diff(dim=1) != 0).all(dim=1)  # (G,)
        groups, ids = groups[ok.to(groups.device)], ids[ok]
        self.seen.update(map(tuple, ids.tolist()))
        return groups

    @property
    def distinct(self) -> int:
        return len(self.seen)
