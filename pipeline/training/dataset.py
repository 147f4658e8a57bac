"""The student data path: WebDataset shards joined with cached teacher logits.

Per epoch `e`, a `webdataset.DataPipeline` lists the split's shards, shuffles them with a seeded
permutation of `(seed, e)`, splits them by node (DDP rank) and by DataLoader worker, and streams
each shard. When a shard starts, its logits are read from the store as **one contiguous block**
(shards and store shards cover the same rows); every sample's key is checked against the expected
row, the view `v(seed, e, i)` is picked and the identical augmentation the teacher saw is applied.
A seeded shuffle buffer then mixes samples across shards, and each DataLoader worker collates its
own batches with numpy (`numpy_batches`), so per-sample Python work stays small next to a student's
training step (tar headers and PNGs are parsed by fast paths with webdataset/PIL fallbacks).

Every sample is seen exactly once per epoch over all ranks and workers: shards are partitioned,
never resampled, so webdataset's `with_epoch` pitfall (epochs of a fixed nominal length drawn
from resampled shards) does not arise. A given `(seed, epoch, world size, workers)` gives the same
stream. Because the partition is a pure function of the manifest, `DistillDataset.plan` can tell
every rank, before the epoch starts, how many batches each rank will get: the training loop uses
that to keep DDP ranks in lockstep (equal optimizer steps) when shards do not divide evenly.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from pipeline.cache.store import LogitStore
from pipeline.data.shards import Manifest, ShardError, ShardInfo, iter_shard
from pipeline.data.views import (
    MIX_WINDOW,
    PadCropFlip,
    ViewRecipe,
    hash_u64,
    mix_pixels,
    pick_allowed_view,
    pick_view,
)
from pipeline.runtime import rank_world
from pipeline.training.source import EpochPlan, TeacherFeatures

log = logging.getLogger(__name__)

_TAG_SHUFFLE = 0x5348_5546

# One sample between the shard reader and the batcher: a tuple is ~5x cheaper to build and shuffle
# than a dict of tensors. (index, image (H, W, C) decoded, label, view, the recipe's row params, logits (C,) | None,
# has_teacher, members (M, C) | None, mix (label2, lam) | None). A mixing recipe renders before the shuffle
# buffer (the partner is at hand only then): its items carry the finished view and params None.
_Item = tuple[int, np.ndarray, int, int, Any, "np.ndarray | None", bool, "np.ndarray | None", Any]


class _ShardJoin:
    """One shard's samples joined with its logits: one block read, vectorised view parameters, key checks."""

    def __init__(self, ds: DistillDataset, epoch: int, url: str, info: ShardInfo) -> None:
        self.url = url
        self.info = info
        n = info.count
        index = np.arange(info.start, info.stop)
        store = ds.store()
        self.block: np.ndarray | None = None  # (n, V, C) in the store's dtype (float16 by default)
        self.members: np.ndarray | None = None  # (n, V, M, C) an ensemble's member logits, when the loss reads them
        if store is not None:
            # One contiguous read per shard, kept in the stored dtype: only the batched (B, C) rows get converted.
            self.block = store.read_block(info.start, info.stop, dtype=None)
            if ds.members:
                self.members = store.read_members(info.start, info.stop, dtype=None)
            view = pick_allowed_view(ds.seed, epoch, index, ds.allowed[info.start : info.stop])
            self.has_teacher = view >= 0  # (n,)
            if ds.unqueried == "ce":  # rows without teacher logits still train with CE on view 0
                view = np.where(view < 0, 0, view)
        else:
            view = pick_view(ds.seed, epoch, index, ds.recipe.views) if ds.augment else np.zeros(n, dtype=np.int64)
            self.has_teacher = np.zeros(n, dtype=bool)
        # View parameters for the whole shard at once (vectorised hash, no pixels); view 0 is the eval transform.
        self.params = ds.recipe.row_params(index, np.maximum(view, 0))  # n python values
        self.view = view  # (n,) -1 = skip the row (budget mode: the teacher never saw it)
        self.view_list = view.tolist()
        self.has_list = self.has_teacher.tolist()
        self.recipe = ds.recipe
        self.mix = None  # a mixing recipe's plan for the shard: partners, weights, boxes (pure functions)
        if ds.recipe.mix is not None:
            hw = ds.recipe.out_shape(ds.manifest.image_shape)[:2]
            n_split = ds.manifest.split(ds.split).n
            self.mix = ds.recipe.mix.plan(
                ds.recipe.seed, index, np.maximum(view, 0), ds.manifest.shard_size, n_split, hw
            )

    def items(self) -> Iterator[_Item]:
        """The shard's samples in file order, each checked against the manifest's row range."""
        if self.mix is not None:
            yield from self._mixed_items()
            return
        info, block, members = self.info, self.block, self.members
        wanted = self.view >= 0
        for i, img, label in iter_shard(self.url, expect=range(info.start, info.stop), wanted=wanted):
            r = i - info.start
            v = self.view_list[r]
            logits = block[r, v] if block is not None else None  # (C,)
            member = members[r, v] if members is not None else None  # (M, C)
            yield (i, img, label, v, self.params[r], logits, self.has_list[r], member, None)

    def _mixed_items(self) -> Iterator[_Item]:
        """A mixing recipe's items: rows decoded window by window (`views.MIX_WINDOW`: every partner is in its
        row's window), each view rendered and mixed with its partner's view here, as `shard_logits` does."""
        info, block, members, plan = self.info, self.block, self.members, self.mix
        assert plan is not None
        images: dict[int, np.ndarray] = {}
        labels: dict[int, int] = {}
        for i, img, label in iter_shard(self.url, expect=range(info.start, info.stop)):  # partners: decode all
            images[i], labels[i] = img, label
            r = i - info.start
            if r + 1 < info.count and (r + 1) % MIX_WINDOW:  # the window is complete at its last row
                continue
            rows = [k for k in sorted(images) if self.view_list[k - info.start] >= 0]
            if rows:
                pos = np.array(rows) - info.start  # (k,) rows of the shard
                v = self.view[pos]
                out = self.recipe.render([images[k] for k in rows], [self.params[p] for p in pos], v)
                part = plan.partner[pos]
                sel = np.flatnonzero(part >= 0)
                if len(sel):
                    j = part[sel]
                    other = self.recipe.render(
                        [images[k] for k in j.tolist()], self.recipe.row_params(j, v[sel]), v[sel]
                    )  # each partner through its own view (j, v)
                    out[sel] = mix_pixels(out[sel], other, plan.lam[pos[sel]], plan.box[pos[sel]])
                for k, p, x in zip(rows, pos.tolist(), out, strict=True):
                    vv = self.view_list[p]
                    logits = block[p, vv] if block is not None else None  # (C,)
                    member = members[p, vv] if members is not None else None  # (M, C)
                    j = int(plan.partner[p])
                    mix = (labels[j], float(plan.lam[p])) if j >= 0 else (labels[k], 1.0)
                    yield (k, x, labels[k], vv, None, logits, self.has_list[p], member, mix)
            images.clear()
            labels.clear()


def _item_to_sample(item: _Item, recipe: ViewRecipe) -> dict[str, Any]:
    """One item as the per-sample dict of `DistillDataset.__iter__` (augmentation applied)."""
    i, img, label, v, params, logits, has, member, mix = item
    # (H', W', C) a fresh, writable array (for torch); a mixing recipe's item holds its finished view
    img = recipe.render([img], [params], np.array([v]))[0] if params is not None else np.array(img)
    out = {"image": torch.from_numpy(img), "label": label, "index": i, "view": v}
    if mix is not None:
        out["mix_label"], out["mix_lam"] = mix
    if logits is not None:
        out["logits"] = torch.from_numpy(logits.astype(np.float32))  # (C,)
        out["has_teacher"] = has
    if member is not None:
        out["members"] = torch.from_numpy(member.astype(np.float32))  # (M, C)
    return out


def _collate(items: list[_Item], recipe: ViewRecipe) -> dict[str, np.ndarray]:
    """A batch of items -> numpy arrays laid out as `default_collate` of their samples would be, built at once."""
    idx, imgs, labels, views, params, logits, has, members, mix = zip(*items, strict=True)
    v = np.array(views, dtype=np.int64)
    # (B, H', W', C) uint8: each row's view, as the teacher saw it (a mixing recipe's items hold their finished view)
    images = recipe.render(imgs, params, v) if mix[0] is None else np.stack(imgs)
    out = {
        "image": images,
        "label": np.array(labels, dtype=np.int64),
        "index": np.array(idx, dtype=np.int64),
        "view": v,
    }
    if mix[0] is not None:
        out["mix_label"] = np.array([m[0] for m in mix], dtype=np.int64)  # (B,) the partner's label
        out["mix_lam"] = np.array([m[1] for m in mix], dtype=np.float32)  # (B,) the row's own weight
    if logits[0] is not None:
        out["logits"] = np.stack(logits).astype(np.float32, copy=False)  # (B, C) float32
        out["has_teacher"] = np.array(has, dtype=bool)
    if members[0] is not None:
        out["members"] = np.stack(members).astype(np.float32, copy=False)  # (B, M, C) float32
    return out


class DistillDataset(IterableDataset):
    """One split's shards, optionally joined with a logit store: a `BatchSource` (and per-sample iterable).

    Samples: image (H, W, C) uint8, label, index, view[, logits (C,), has_teacher].

    store_path: a logit store to join (None: images and labels only, e.g. teacher training/eval).
    allowed: optional (N, V) bool of usable sample-views (budget); default = the store's `queried`.
    augment: without a store, draw views from `recipe` (teacher training); with one, the store's
    recipe is used, always.
    split_nodes: split shards across DDP ranks (default: when shuffling, i.e. for training; an
    unshuffled data set is for evaluation in index order, where every rank sees the whole split).
    teacher_features: the loss's teacher side (`DistillationLoss.teacher_features`), computed per batch
    by the loader next to the batch (cached logits only).
    members: also join an ensemble store's member logits (`members (B, M, C)` per batch, one block read
    per shard like the logits), for a loss that reads them (`mtkd`).
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
        split_nodes: bool | None = None,
        teacher_features: TeacherFeatures | None = None,
        members: bool = False,
    ) -> None:
        super().__init__()
        if unqueried not in ("drop", "ce"):
            raise ValueError(f"unqueried must be 'drop' or 'ce', got '{unqueried}'")
        self.manifest = manifest
        self.split = split
        self.urls = manifest.shard_urls(split)
        self.shard_info = manifest.shard_for_url(split)
        self.store_path = str(store_path) if store_path else None
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.split_nodes = shuffle if split_nodes is None else split_nodes
        self.epoch = 0
        self.unqueried = unqueried
        self._store: LogitStore | None = None
        if self.store_path:
            store = LogitStore(self.store_path, split=split, manifest=manifest)  # verify once, up front
            self.recipe = ViewRecipe.from_dict(store.view_recipe)
            self.num_classes = store.num_classes
            self.allowed = allowed if allowed is not None else store.queried()
            if self.allowed.shape != (store.n, store.views):
                raise ValueError(
                    f"allowed mask shape {self.allowed.shape} != store rows/views {(store.n, store.views)}"
                )
            if members and not store.member_names:
                raise ValueError(f"members=True, but {self.store_path} holds no member logits (not an ensemble store)")
        else:
            self.recipe = recipe or PadCropFlip()
            self.num_classes = manifest.num_classes
            self.allowed = None
        self.augment = augment
        self.teacher_features = teacher_features if self.store_path else None
        self.members = members
        # Rank/world are fixed in the main process (and shipped to DataLoader workers with the
        # pickled dataset), so workers split exactly as `plan` predicts even where they cannot see
        # the process group (spawned workers).
        self.node = rank_world()

    def store(self) -> LogitStore | None:
        """The store, opened lazily once per worker process (zarr handles are not shared across forks)."""
        if self.store_path and self._store is None:
            self._store = LogitStore(self.store_path, split=self.split)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # each worker opens its own handle
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- epoch geometry (pure functions of the manifest; no data read) -------------------------

    def row_counts(self) -> dict[str, int]:
        """Samples each shard yields (all rows, or the rows with an allowed view in budget `drop` mode)."""
        if self.allowed is None or self.unqueried == "ce":
            return {u: self.shard_info[u].count for u in self.urls}
        keep = self.allowed.any(1)
        return {u: int(keep[self.shard_info[u].start : self.shard_info[u].stop].sum()) for u in self.urls}

    def num_samples(self) -> int:
        """Samples one epoch yields over all ranks/workers."""
        return sum(self.row_counts().values())

    def shard_order(self, epoch: int | None = None) -> list[str]:
        """The epoch's shard order before node/worker splitting: a seeded permutation of `(seed, epoch)`."""
        urls = list(self.urls)
        if self.shuffle:
            seed = int(hash_u64(self.seed, _TAG_SHUFFLE, self.epoch if epoch is None else epoch)[()])
            random.Random(seed).shuffle(urls)
        return urls

    def world(self) -> int:
        return self.node[1] if self.split_nodes else 1

    @property
    def max_workers(self) -> int:
        """Workers split a rank's shards: more workers than the most shards any rank gets would idle."""
        return math.ceil(len(self.urls) / self.world())

    def rank_shards(self, rank: int, epoch: int | None = None) -> list[str]:
        """Shards rank `rank` streams at `epoch` (what `split_by_node` keeps)."""
        return self.shard_order(epoch)[rank :: self.world()]

    def plan(self, batch_size: int, workers: int, drop_last: bool = False, epoch: int | None = None) -> EpochPlan:
        """Samples and DataLoader batches per rank for an epoch, from the manifest alone.

        A DataLoader over an iterable data set batches per worker, so each worker ends with its own
        partial batch: batches = sum over workers of ceil(samples_w / batch_size).
        """
        counts = self.row_counts()
        w = max(1, workers)
        samples, batches = [], []
        for r in range(self.world()):
            mine = self.rank_shards(r, epoch)
            per_worker = [sum(counts[u] for u in mine[k::w]) for k in range(w)]
            samples.append(sum(per_worker))
            rnd = math.floor if drop_last else math.ceil
            batches.append(sum(rnd(n / batch_size) for n in per_worker))
        return EpochPlan(tuple(samples), tuple(batches))

    # -- the stream ---------------------------------------------------------------------------

    def _shard_order(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        by_url = {s["url"]: s for s in src}
        for url in self.shard_order():
            yield by_url[url]

    def _split_by_node(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`wds.split_by_node` with the rank/world recorded in the main process (see `__init__`)."""
        rank, world = self.node
        if self.split_nodes and world > 1:
            yield from islice(src, rank, None, world)
        else:
            yield from src

    def _join(self, src: Iterator[dict[str, Any]]) -> Iterator[_Item]:
        """Tar shards -> joined items; shard by shard, so each shard's logits are one block read."""
        for shard in src:
            url = shard["url"]
            info = self.shard_info.get(url)
            if info is None:
                raise ShardError(f"shard {url} is not in the manifest {self.manifest.root}")
            yield from _ShardJoin(self, self.epoch, url, info).items()

    def _items(self) -> Iterator[_Item]:
        """This rank's and worker's share of the epoch, joined and shuffled."""
        info = torch.utils.data.get_worker_info()
        if info is None:  # main process: the live process group is authoritative
            self.node = rank_world()
        stages: list[Any] = [
            wds.SimpleShardList(self.urls),
            self._shard_order,
            self._split_by_node,
            wds.split_by_worker,
            self._join,
        ]
        if self.shuffle and self.shuffle_buffer > 1:
            worker = info.id if info else 0
            rng = random.Random(int(hash_u64(self.seed, self.epoch, self.node[0], worker)[()]))
            # A small initial fill: the first batch of an epoch comes sooner; the buffer then grows to full size.
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), rng=rng))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Per-sample dicts (what a DataLoader with `batch_size` would collate)."""
        return (_item_to_sample(item, self.recipe) for item in self._items())

    def numpy_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches of this process's stream, collated with numpy at once (what `make_loader` uses).

        Same batches as `DataLoader(self, batch_size)` would make per worker (a partial batch last
        unless `drop_last`), with ~10x less per-sample overhead than collating tensor dicts.
        """
        buf: list[_Item] = []
        for item in self._items():
            buf.append(item)
            if len(buf) == batch_size:
                yield _collate(buf, self.recipe)
                buf = []
        if buf and not drop_last:
            yield _collate(buf, self.recipe)
