"""The student data path: WebDataset shards joined with cached teacher logits.

Per epoch `e`, a `webdataset.DataPipeline` lists the split's shards, shuffles them with a seeded
permutation of `(seed, e)`, splits them by node (DDP rank) and by DataLoader worker, and streams
each shard. When a shard starts, its logits are read from the store as **one contiguous block**
(shards and store shards cover the same rows); every sample's key is checked against the expected
row, the view `v(seed, e, i)` is picked and the identical augmentation the teacher saw is applied.
A seeded shuffle buffer then mixes samples across shards, and each DataLoader worker collates its
own batches with numpy (`iter_batches`), so per-sample Python work stays small next to a student's
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.shards import Manifest, ShardInfo, decode_png_fast, tar_samples
from pipeline.store import LogitStore
from pipeline.views import ViewRecipe, crop_flip, hash_u64, pick_view

log = logging.getLogger(__name__)

_TAG_SHUFFLE = 0x5348_5546


class ShardError(ValueError):
    """A tar shard that does not hold what the manifest says (corrupt, truncated, reordered)."""


def batch_to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]; the same ops as `views.to_tensor`."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def node_info() -> tuple[int, int]:
    """(rank, world size) exactly as `webdataset.split_by_node` sees them (torchrun's env, then torch.distributed)."""
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


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


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch delivers to each DDP rank: samples and DataLoader batches (per-worker partial batches count)."""

    samples: tuple[int, ...]  # per rank
    batches: tuple[int, ...]  # per rank

    @property
    def steps(self) -> int:
        """Optimizer steps every rank runs this epoch (ranks with fewer batches pad with zero-weight steps)."""
        return max(self.batches, default=0)

    def active(self, step: int) -> int:
        """How many ranks hold a real batch at `step`."""
        return sum(b > step for b in self.batches)


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


# One sample between the shard reader and the batcher: a tuple is ~5x cheaper to build and shuffle
# than a dict of tensors. (index, image (H, W, C), label, view, sy, sx, flip, logits (C,) | None, has_teacher)
_Item = tuple[int, np.ndarray, int, int, int, int, int, "np.ndarray | None", bool]


class _ShardJoin:
    """One shard's samples joined with its logits: one block read, vectorised view parameters, key checks."""

    def __init__(self, ds: DistillDataset, epoch: int, url: str, info: ShardInfo) -> None:
        self.url = url
        self.info = info
        n = info.count
        index = np.arange(info.start, info.stop)
        store = ds.store()
        self.block: np.ndarray | None = None  # (n, V, C) in the store's dtype (float16 by default)
        if store is not None:
            # One contiguous read per shard, kept in the stored dtype: only the batched (B, C) rows get converted.
            self.block = store.read_block(info.start, info.stop, dtype=None)
            view = pick_allowed_view(ds.seed, epoch, index, ds.allowed[info.start : info.stop])
            self.has_teacher = view >= 0  # (n,)
            if ds.unqueried == "ce":  # rows without teacher logits still train with CE on view 0
                view = np.where(view < 0, 0, view)
        else:
            view = pick_view(ds.seed, epoch, index, ds.recipe.views) if ds.augment else np.zeros(n, dtype=np.int64)
            self.has_teacher = np.zeros(n, dtype=bool)
        # View parameters for the whole shard at once (vectorised hash); view 0 is the identity (0, 0, no flip).
        dy, dx, flip = ds.recipe.params(index, np.maximum(view, 0))
        pad = ds.recipe.pad
        self.shift = np.stack([dy - pad, dx - pad, flip.astype(np.int64)], 1).tolist()  # (n, 3) python ints
        self.view_list = view.tolist()  # -1 = skip the row
        self.has_list = self.has_teacher.tolist()

    def items(self) -> Iterator[_Item]:
        """The shard's samples in file order, each checked against the manifest's row range."""
        url, info = self.url, self.info
        expect = info.start
        last: str | None = None
        it = tar_samples(url)
        block = self.block
        while True:
            try:
                sample = next(it)
            except StopIteration:
                break
            except FileNotFoundError as e:
                raise ShardError(
                    f"shard {url} is listed in the manifest {self.info.path!r} but missing ({e}); "
                    "re-run `dvc repro prepare` (or `dvc pull`)"
                ) from e
            except Exception as e:  # EOFError, tarfile.ReadError, OSError...: name the shard and the last good sample
                raise ShardError(
                    f"corrupt or truncated shard {url} after sample {last!r}: {e}; re-run `dvc repro prepare`"
                ) from e
            key = sample["__key__"]
            try:
                i = int(key)
            except ValueError:
                i = -1
            if i != expect:
                raise ShardError(
                    f"shard {url}: sample key {key!r} where row {expect} was expected (after sample {last!r}); "
                    "shards and manifest disagree: re-run `dvc repro prepare`"
                )
            if "png" not in sample or "cls" not in sample:
                has = sorted(k for k in sample if k[0] != "_")
                raise ShardError(
                    f"corrupt or truncated shard {url} after sample {last!r}: sample {key} lacks png/cls (has {has}); "
                    "re-run `dvc repro prepare`"
                )
            expect += 1
            r = i - info.start
            v = self.view_list[r]
            last = key
            if v < 0:
                continue  # budget mode: the teacher never saw this sample
            try:
                img = decode_png_fast(sample["png"])
                label = int(sample["cls"])
            except Exception as e:
                raise ShardError(f"shard {url}: cannot decode sample {key}: {e}") from e
            sy, sx, flip = self.shift[r]
            logits = block[r, v] if block is not None else None  # (C,)
            yield (i, img, label, v, sy, sx, flip, logits, self.has_list[r])
        if expect != info.stop:  # a tar cut at a member boundary reads cleanly but short
            raise ShardError(
                f"corrupt or truncated shard {url} after sample {last!r}: the shard ends there, but the manifest "
                f"says rows [{info.start}, {info.stop}); re-run `dvc repro prepare`"
            )


def _item_to_sample(item: _Item, pad: int) -> dict[str, Any]:
    """One item as the per-sample dict of `DistillDataset.__iter__` (augmentation applied)."""
    i, img, label, v, sy, sx, flip, logits, has = item
    img = np.ascontiguousarray(crop_flip(img, sy, sx, bool(flip))) if v > 0 else np.array(img)  # writable, for torch
    out = {"image": torch.from_numpy(img), "label": label, "index": i, "view": v}
    if logits is not None:
        out["logits"] = torch.from_numpy(logits.astype(np.float32))  # (C,)
        out["has_teacher"] = has
    return out


def _collate(items: list[_Item], pad: int) -> dict[str, np.ndarray]:
    """A batch of items -> numpy arrays laid out as `default_collate` of their samples would be, built at once."""
    idx, imgs, labels, views, sy, sx, flip, logits, has = zip(*items, strict=True)
    images = np.stack(imgs)  # (B, H, W, C) uint8
    v = np.array(views, dtype=np.int64)
    aug = v > 0
    if aug.any():  # view 0 is the plain image; the others get their crop + flip in one gather
        images[aug] = crop_flip_batch(
            images[aug], np.array(sy)[aug], np.array(sx)[aug], np.array(flip, dtype=bool)[aug], pad
        )
    out = {
        "image": images,
        "label": np.array(labels, dtype=np.int64),
        "index": np.array(idx, dtype=np.int64),
        "view": v,
    }
    if logits[0] is not None:
        out["logits"] = np.stack(logits).astype(np.float32, copy=False)  # (B, C) float32
        out["has_teacher"] = np.array(has, dtype=bool)
    return out


def _to_tensors(batch: dict[str, Any], pin: bool = False) -> dict[str, torch.Tensor]:
    """numpy arrays -> tensors sharing their memory (pinned for CUDA copies when asked)."""
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


class DistillDataset(IterableDataset):
    """Iterable over one split: dicts with image (H, W, C) uint8, label, index, view[, logits (C,), has_teacher].

    store_path: a logit store to join (None: images and labels only, e.g. teacher training/eval).
    allowed: optional (N, V) bool of usable sample-views (budget); default = the store's `queried`.
    augment: without a store, draw views from `recipe` (teacher training); with one, the store's
    recipe is used, always.
    split_nodes: split shards across DDP ranks (default: when shuffling, i.e. for training; an
    unshuffled data set is for evaluation in index order, where every rank sees the whole split).
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
        else:
            self.recipe = recipe or ViewRecipe()
            self.num_classes = manifest.num_classes
            self.allowed = None
        self.augment = augment
        # The loss's teacher side (`DistillationLoss.teacher_features`), computed per batch in the loader's
        # worker and shipped as "tf/<name>" arrays; set by the distill stage for losses that have one.
        self.teacher_features: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
        # Rank/world are fixed in the main process (and shipped to DataLoader workers with the
        # pickled dataset), so workers split exactly as `plan` predicts even where they cannot see
        # the process group (spawned workers).
        self.node = node_info()

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
        self.node = node_info()

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
            self.node = node_info()
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
        pad = self.recipe.pad
        return (_item_to_sample(item, pad) for item in self._items())

    def iter_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this process's stream, collated with numpy at once (what `make_loader` uses).

        Same batches as `DataLoader(self, batch_size)` would make per worker (a partial batch last
        unless `drop_last`), with ~10x less per-sample overhead than collating tensor dicts.
        """
        return (_to_tensors(b) for b in with_teacher_features(self, self._np_batches(batch_size, drop_last)))

    def _np_batches(self, batch_size: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
        pad = self.recipe.pad
        buf: list[_Item] = []
        for item in self._items():
            buf.append(item)
            if len(buf) == batch_size:
                yield _collate(buf, pad)
                buf = []
        if buf and not drop_last:
            yield _collate(buf, pad)


# Moving batches from DataLoader workers (profiled on a 2-core machine, cnn_tiny student):
# - a tensor travels as a shared-memory segment whose file descriptor the main process fetches over a
#   Unix socket from the worker: ~0.5 ms per tensor, ~3 ms for a 6-tensor batch (~10% of the step);
# - pickled numpy arrays through the worker's pipe avoid that, but a 64 KB pipe holds less than one
#   28x28 batch, so every read waits for the worker to be scheduled again to write the rest;
# - and every message costs the DataLoader machinery ~0.5 ms (poll, locks, index-queue feeder).
# So workers send numpy "messages" of several batches (up to _MESSAGE_BYTES), the result pipe is
# enlarged to hold a few of them (Linux), and the main process splits them and makes tensors
# (zero-copy `torch.from_numpy`). Large batches (big images) use shared memory, as usual.
_MESSAGE_BYTES = 960 << 10  # batches per message: as many as fit (at least one), so one message fits the pipe
_MAX_PER_MESSAGE = 8
_WIRE_NUMPY_MAX = 4 << 20  # bytes per batch; above this, tensors in shared memory cost less than copies
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl command (Linux)


def _identity(batch: Any) -> Any:
    return batch


def _nbytes(batch: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in batch.values())


#: batch keys of the loss's teacher features precomputed by the loader: "tf/<name>" (see `with_teacher_features`)
FEATURE_PREFIX = "tf/"


def with_teacher_features(dataset: Any, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Add `dataset.teacher_features(logits)` to each numpy batch as "tf/<name>" arrays.

    The teacher side of a loss (CMKD: z-score, softmax, soft ranks, entropy of the teacher logits) is a
    function of the cached logits alone, so the loader's worker computes it next to the batch, off the
    training step. Rows without a teacher answer (NaN logits, budget `unqueried: ce`) get the features
    of a zero row; the training loop drops them with the logits.
    """
    fn = getattr(dataset, "teacher_features", None)
    for batch in batches:
        logits = batch.get("logits")
        if fn is not None and logits is not None:
            t = torch.from_numpy(logits)  # (B, C) float32
            has = batch.get("has_teacher")
            if has is not None and not has.all():
                t = torch.where(torch.from_numpy(has)[:, None], t, torch.zeros(()))
            for k, v in fn(t).items():
                batch[FEATURE_PREFIX + k] = v.numpy()
        yield batch


class _Batches(IterableDataset):
    """`dataset.iter_batches(...)` as an iterable data set, so DataLoader workers each batch their share.

    In a worker, yields lists of numpy batches (messages, see above); in the main process, tensor batches.
    """

    def __init__(self, dataset: DistillDataset, batch_size: int, drop_last: bool) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[Any]:
        batches = with_teacher_features(self.dataset, self.dataset._np_batches(self.batch_size, self.drop_last))
        if torch.utils.data.get_worker_info() is None:
            yield from (_to_tensors(b) for b in batches)
            return
        message: list[dict[str, np.ndarray]] = []
        size = 0
        most = 1  # the epoch's first message holds one batch, so training starts without waiting for a full one
        for batch in batches:
            n = _nbytes(batch)
            if n > _WIRE_NUMPY_MAX:
                if message:
                    yield message
                    message, size = [], 0
                yield _to_tensors(batch)  # big: shared memory
                continue
            if message and (size + n > _MESSAGE_BYTES or len(message) == most):
                yield message
                message, size, most = [], 0, min(2 * most, _MAX_PER_MESSAGE)  # ramp up: 1, 2, 4, 8 batches
            message.append(batch)
            size += n
        if message:
            yield message


def _enlarge_result_pipe(it: Any) -> None:
    """Best effort: a bigger pipe for the workers' results, so messages are written without waiting for reads."""
    queue = getattr(it, "_worker_result_queue", None)
    writer = getattr(queue, "_writer", None)
    if writer is None:
        return
    try:
        import fcntl

        fcntl.fcntl(writer.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError, ValueError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


class _Loader(DataLoader):
    """A DataLoader whose items are always single batches, dicts of tensors (worker messages split here)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        pin = bool(self.pin_memory)
        it = super().__iter__()
        _enlarge_result_pipe(it)
        for msg in it:
            for batch in msg if isinstance(msg, list) else [msg]:
                numpy = any(isinstance(v, np.ndarray) for v in batch.values())
                yield _to_tensors(batch, pin=pin and numpy)


def make_loader(dataset: DistillDataset, batch_size: int, workers: int = 1, drop_last: bool = False) -> DataLoader:
    """A DataLoader of batches (dicts of tensors) over the data set; workers split a rank's shards.

    Batches are made inside each worker (`DistillDataset.iter_batches`), so the DataLoader passes
    them through (`batch_size=None`); the batch layout is what default collation of the
    per-sample dicts would give.
    """
    n_shards = math.ceil(len(dataset.urls) / dataset.world())  # the most shards any rank gets
    if workers > n_shards:
        log.info("workers %d > shards per rank %d: using %d workers", workers, n_shards, n_shards)
        workers = n_shards
    return _Loader(
        _Batches(dataset, batch_size, drop_last),
        batch_size=None,
        collate_fn=_identity,  # keep numpy messages numpy inside the worker (see _MESSAGE_BYTES)
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # the dataset (and its epoch) is re-sent to workers every epoch
        # Worker base seeds from a private generator: starting an epoch's workers never draws from the
        # global torch RNG, so a resumed run's RNG stream matches an uninterrupted one whenever the
        # loader starts (all randomness of the data stream is explicit and seeded anyway).
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if workers else None,  # messages of several batches each
    )
