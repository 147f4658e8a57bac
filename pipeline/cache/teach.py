"""Run a teacher once over the shards and cache its raw logits (the `teach` stage's library side).

Work is organised by store shard (== WebDataset shard): read + decode a tar, run the teacher on each
cached view of the selected sample-views, write the block, mark it done. Decoding the next shard
and compressing/writing the previous one run in background threads, so the teacher's forward pass
is the only thing on the critical path (torch, zlib and blosc release the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.store import LogitStore, SplitSpec, StoreError, StoreSpec, StoreWriter, same_content
from pipeline.config import ConfigError, TeachConfig, TeacherSpec, naming
from pipeline.data.shards import Manifest, read_shard, sample_key, sha256_file, take_images
from pipeline.data.views import MixSource, ViewRecipe, build_recipe, check_recipe, view_manifest
from pipeline.lock import exclusive
from pipeline.models.checkpoint import check_sees, load_model
from pipeline.models.predict import predict_arrays
from pipeline.runtime import pick_device, set_threads, utc_now, write_run_log

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardBatch:
    split: str
    index: int  # store shard index
    start: int
    images: np.ndarray | list[np.ndarray]  # (n, H, W, C) uint8, or n arrays of their own sizes (kept JPEGs)
    keys: list[str]


def load_shard(manifest: Manifest, split: str, j: int) -> ShardBatch:
    """Decode tar shard `j` of `split` (keys checked against its manifest row range)."""
    info = manifest.split(split).shards[j]
    images = read_shard(manifest, split, j)
    return ShardBatch(split, j, info.start, images, [sample_key(i) for i in range(info.start, info.stop)])


class Remote(Protocol):
    """A teacher called with the sample-views' ids (`pipeline.cache.endpoint.EndpointTeacher`): it may answer rows
    it has seen from a journal, and never needs the device."""

    def answer(self, images: np.ndarray, split: str, index: np.ndarray, view: np.ndarray) -> np.ndarray: ...


#: what the teach loop calls: a module, any callable (B, H, W, C) uint8 -> (B, C) logits, or a remote teacher
Teacher = nn.Module | Callable[[np.ndarray], np.ndarray] | Remote


def teacher_logits(
    model: Teacher, images: np.ndarray, split: str, index: np.ndarray, view: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Logits (k, C) of `model` on k sample-views: images (k, H', W', C) uint8, rows `index` of `split`, view `view`."""
    if isinstance(model, nn.Module):
        return predict_arrays(model, images, batch_size, device)
    if hasattr(model, "answer"):
        return model.answer(images, split, index, np.full(len(index), view, dtype=np.int64))
    return model(images)


def shard_logits(
    model: Teacher,
    batch: ShardBatch,
    recipe: ViewRecipe,
    queried: np.ndarray,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    layout: tuple[int, int] | None = None,
) -> np.ndarray:
    """Logits (n, V, C) for one shard: view v of each queried row, NaN elsewhere.

    layout: the split's (shard_rows, N), which a mixing recipe's partner windows need (`views.Mix`).
    """
    n = len(batch.images)
    partners = None
    if recipe.mix is not None:  # every partner lies in the row's window of this shard
        if layout is None:
            raise ValueError("shard_logits: a mixing recipe needs the split's layout (shard_rows, N)")
        partners = MixSource(lambda rows: take_images(batch.images, rows - batch.start), *layout)
    out = np.full((n, recipe.views, num_classes), np.nan, dtype=np.float32)
    index = np.arange(batch.start, batch.start + n)
    for v in range(recipe.views):
        sel = np.flatnonzero(queried[:, v])
        if len(sel) == 0:
            continue
        # (k, H', W', C): view v of the selected rows (mixed with their partners' for a mixing recipe)
        imgs = recipe.apply(take_images(batch.images, sel), index[sel], np.full(len(sel), v), partners)
        logits = teacher_logits(model, imgs, batch.split, index[sel], v, batch_size, device)
        if logits.shape != (len(sel), num_classes):
            raise ValueError(
                f"teacher returned logits of shape {logits.shape}, expected {(len(sel), num_classes)}: "
                "does its number of classes match the data set's?"
            )
        out[sel, v] = logits
    return out


def build_spec(
    manifest: Manifest,
    teacher: dict[str, Any],
    splits: dict[str, ViewRecipe],
    *,
    dtype: str = "float16",
    topk: int = 0,
    compressor: str = "blosc-zstd",
    chunk_rows: int = 1000,
    budget: BudgetSpec | None = None,
) -> StoreSpec:
    """The store's identity for this teacher x data set x view recipe x budget (defaults: params.yaml's)."""
    budget = budget or BudgetSpec()
    return StoreSpec(
        teacher=teacher,
        dataset={"name": manifest.dataset, "manifest_sha256": manifest.sha256},
        splits={
            name: SplitSpec(
                n=manifest.split(name).n,
                num_classes=manifest.num_classes,
                views=recipe.views,
                shard_rows=manifest.shard_size,
                view_recipe=recipe.to_dict(),
            )
            for name, recipe in splits.items()
        },
        dtype=dtype,
        topk=topk,
        compressor=compressor,
        chunk_rows=min(chunk_rows, manifest.shard_size),
        extra={"budget": budget.to_attrs()},
    )


def query_masks(manifest: Manifest, spec: StoreSpec, splits: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """(N, V) query mask per split (of `splits`, default all). The budget applies to the train split; other splits
    are fully queried."""
    budget = BudgetSpec.from_attrs(spec.extra.get("budget"))
    masks = {}
    for split, s in spec.splits.items():
        if splits is not None and split not in splits:
            continue
        if split == "train" and not budget.is_full:
            masks[split] = budget.mask(manifest.iter_labels(split), s.views)
        else:
            masks[split] = np.ones((s.n, s.views), dtype=bool)
    return masks


def view_recipes(cfg: TeachConfig, manifest: Manifest) -> dict[str, ViewRecipe]:
    """The views each split caches: `teach.views` for train (the student trains on them), `teach.test_views` else."""
    recipes = {
        split: build_recipe(
            cfg.augment.spec(), views=cfg.views if split == "train" else cfg.test_views, seed=cfg.view_seed
        )
        for split in manifest.splits
    }
    check_recipe(recipes["train" if "train" in recipes else next(iter(recipes))], manifest, "teach.augment")
    return recipes


def teacher_identity(name: str, checkpoint: Path, model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The store's fingerprint of the teacher `load_model(checkpoint)` returned: name, architecture, weights hash and
    preprocessing (data statistics, or a timm model's input size / mean / std: part of what the logits mean, so a
    store made with other inputs is another store)."""
    identity = {
        "name": name,
        "arch": meta["arch"],
        "weights_sha256": sha256_file(checkpoint),
        "preprocess": model.preprocess.to_dict(),
    }
    if meta.get("code"):  # `py:` model code: module, callable, file and its sha256 (also inside the weights' hash)
        identity["code"] = meta["code"]
    return identity


def teach_store(
    manifest: Manifest,
    checkpoint: str | Path,
    out: str | Path,
    cfg: TeachConfig,
    name: str,
    *,
    force: bool = False,
    reuse: bool = False,
    run_log: str | Path | None = None,
    endpoint: TeacherSpec | None = None,
) -> Path:
    """The `teach` stage: cache teacher `name`'s logits over every split into the store at `out`.

    Builds the store's identity from `cfg` (views, dtype, layout, budget) and the checkpoint's sha256;
    with `reuse`, an existing store whose budget was raised lends its teacher calls (`PreviousCalls`);
    then fills the store in this process (`run_teach`) or on a dask cluster (`teach.cluster`,
    `pipeline.cache.teach_dask`), which write the same store bit for bit. The whole run holds the
    store's writer lock (a second teach on `out` fails at once, naming this one); its wall-clock times
    go to `run_log` (the store itself carries none, so equal inputs give a byte-identical store).
    `endpoint`: the teacher's params entry when it is a live endpoint (`teachers.<name>.endpoint`): the checkpoint
    is then its record (`pipeline.cache.endpoint`), and the run log adds what the calls cost.
    """
    with exclusive(out, f"logit store {out}"):
        started, t0 = utc_now(), time.perf_counter()
        record: dict[str, Any] = {}
        path = _teach_store(
            manifest, Path(checkpoint), out, cfg, name, force=force, reuse=reuse, endpoint=endpoint, log=record
        )
        executor = "this process" if cfg.cluster == "none" else f"dask {cfg.cluster}"
        record = {"store": str(path), "executor": executor, **record}
        record.update(started=started, finished=utc_now(), seconds=round(time.perf_counter() - t0, 3))
        write_run_log(run_log, record)
    return path


def journal_path(out: str | Path) -> Path:
    """Where an endpoint teacher's answers wait for their store shard: `<store>.answers/` (not an output)."""
    return Path(f"{out}.answers")


def open_teacher(
    checkpoint: Path, manifest: Manifest, name: str, endpoint: TeacherSpec | None, out: str | Path, recipe: ViewRecipe
) -> tuple[Teacher, dict[str, Any]]:
    """The teacher a stage calls and its identity in the store, checked against the data set before any work: the
    model of `checkpoint`, or for an endpoint teacher (its record at `checkpoint`, its params entry `endpoint`) the
    client, checked against the server (classes, the model fingerprint the record names), with its journal."""
    from pipeline.cache.endpoint import Journal, client_for, endpoint_record

    record = endpoint_record(checkpoint)
    if record is None:
        model, meta = load_model(checkpoint, data=manifest)
        check_sees(model, view_manifest(manifest, recipe), f"checkpoint {checkpoint}")
        return model, teacher_identity(name, checkpoint, model, meta)
    if endpoint is None or endpoint.endpoint is None:
        raise ConfigError(f"{checkpoint} is an endpoint teacher's record, but teachers.{name} has no endpoint URL")
    if int(record["in_channels"]) != manifest.image_shape[2]:
        raise ConfigError(
            f"{checkpoint} records a model of {record['in_channels']}-channel images, the data set has "
            f"{manifest.image_shape[2]}: rerun train_teacher for this data set"
        )
    fingerprint = str(record["fingerprint"])
    journal = Journal(journal_path(out), fingerprint)
    client = client_for(endpoint, name, manifest.num_classes, fingerprint=fingerprint, journal=journal)
    client.info()  # the same model still behind the URL, before anything is written
    identity = {
        "name": name,
        "arch": record["arch"],
        "weights_sha256": sha256_file(checkpoint),
        "fingerprint": fingerprint,
    }
    return client, identity


def _teach_store(
    manifest: Manifest,
    checkpoint: Path,
    out: str | Path,
    cfg: TeachConfig,
    name: str,
    *,
    force: bool,
    reuse: bool,
    endpoint: TeacherSpec | None,
    log: dict[str, Any],
) -> Path:
    if cfg.cluster == "none":
        set_threads(cfg.threads)  # before the teacher loads: an ONNX teacher sizes its thread pool then
    if force:
        shutil.rmtree(journal_path(out), ignore_errors=True)  # answers of a run --force starts over from
    with naming(f"teachers.{name}"):
        recipes = view_recipes(cfg, manifest)
        model, teacher = open_teacher(checkpoint, manifest, name, endpoint, out, next(iter(recipes.values())))
        if cfg.cluster != "none" and not isinstance(model, nn.Module):
            raise ConfigError(
                "teach.cluster: an endpoint teacher is called from this process (the server is the cluster): set "
                f"teach.cluster: none, and teachers.{name}.concurrency for more requests in flight"
            )
    spec = build_spec(
        manifest,
        teacher,
        recipes,
        dtype=cfg.dtype,
        topk=cfg.topk,
        compressor=cfg.compressor,
        chunk_rows=cfg.chunk_rows,
        budget=BudgetSpec(cfg.budget, cfg.strategy, cfg.budget_seed),
    )
    previous = PreviousCalls.find(out, spec) if reuse else None
    if cfg.cluster != "none":  # the same store, computed by dask workers
        from pipeline.cache.teach_dask import run_teach_dask, worker_threads  # dask is imported only here

        writer = run_teach_dask(
            manifest,
            checkpoint,
            out,
            spec,
            recipes,
            cluster=cfg.cluster,
            workers=cfg.workers,
            threads_per_worker=worker_threads(cfg.cluster, cfg.workers, cfg.threads),
            batch_size=cfg.batch_size,
            force=force,
            previous=previous,
        )
    else:
        journal = getattr(model, "journal", None)
        writer = run_teach(
            manifest,
            model,
            out,
            spec,
            recipes,
            batch_size=cfg.batch_size,
            device=pick_device(),
            force=force,
            previous=previous,
            written=journal.forget if journal is not None else None,
        )
        if journal is not None:  # every answer is in the store now
            journal.discard()
            log["endpoint"] = {"url": endpoint.endpoint, **model.stats.record(endpoint.cost_per_call)}  # type: ignore
    return writer.path


def finalize_store(writer: StoreWriter, manifest: Manifest, previous: PreviousCalls | None) -> Path:
    """Finalize a filled store (the same attrs from every executor), then drop the store it reused calls of."""
    reused = previous.reused(query_masks(manifest, writer.spec)) if previous else 0
    path = writer.finalize({"calls_reused": reused})
    if previous:
        previous.discard()
    return path


def run_teach(
    manifest: Manifest,
    model: nn.Module | Callable[[np.ndarray], np.ndarray],
    out: str | Path,
    spec: StoreSpec,
    recipes: dict[str, ViewRecipe],
    *,
    batch_size: int = 512,
    device: torch.device | None = None,
    force: bool = False,
    shards: Iterable[tuple[str, int]] | None = None,
    finalize: bool = True,
    previous: PreviousCalls | None = None,
    guard: Callable[[], None] | None = None,
    written: Callable[[str, int, int], None] | None = None,
) -> StoreWriter:
    """Fill the store at `out` (resuming a partial one) and finalize it.

    `shards` restricts the work to given (split, shard) pairs (dask tasks); `finalize=False` leaves
    the partial store for a driver that finalizes after all tasks are done. `previous` supplies
    teacher calls an earlier store already made (a smaller budget): only the new ones are computed.
    Without `shards` this call owns the store and holds its writer lock; a dask task (`shards` given)
    writes its disjoint shards under the driver's lock, and `guard()` (called before each shard) raises
    when that lock has changed hands. `written(split, start, stop)` is called once a shard's rows are in the store
    (an endpoint teacher's journal forgets them).
    """
    owner = exclusive(out, f"logit store {out}") if shards is None else contextlib.nullcontext()
    with owner:
        device = device or torch.device("cpu")
        if isinstance(model, nn.Module):
            model.eval().to(device, memory_format=torch.channels_last)  # inputs are channels_last already
        writer = StoreWriter(out, spec, force=force, create=shards is None)
        todo = list(shards) if shards is not None else [(s, j) for s in spec.splits for j in writer.pending(s)]
        masks = query_masks(manifest, spec, {s for s, _ in todo})
        total = sum(spec.splits[s].num_shards for s in spec.splits)
        if not todo:
            log.info("all %d shards already cached in %s", total, writer.partial)
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as reader, ThreadPoolExecutor(1) as wpool:
            nxt: Future | None = reader.submit(load_shard, manifest, *todo[0]) if todo else None
            pending_write: Future | None = None
            last = ("", 0, 0)  # the (split, start, stop) of the write in flight
            bar = tqdm(total=len(todo), desc=f"teach {spec.teacher.get('name', '')}", unit="shard", disable=None)
            for k, (split, j) in enumerate(todo):
                if guard is not None:
                    guard()
                batch = nxt.result()
                nxt = reader.submit(load_shard, manifest, *todo[k + 1]) if k + 1 < len(todo) else None
                s = spec.splits[split]
                start, stop = s.shard_range(j)
                need = masks[split][start:stop]  # (n, V) sample-views this store must hold
                old_logits, old_q = previous.block(split, start, stop) if previous else (None, None)
                if old_q is not None:
                    need = need & ~old_q  # only calls the earlier budget did not make
                logits = shard_logits(
                    model, batch, recipes[split], need, s.num_classes, batch_size, device, (s.shard_rows, s.n)
                )
                if old_q is not None:
                    keep = old_q & masks[split][start:stop]
                    logits[keep] = old_logits[keep]
                if pending_write is not None:
                    pending_write.result()  # surface write errors; keep at most one write in flight
                    if written is not None:
                        written(*last)
                pending_write = wpool.submit(writer.write_shard, split, j, logits, masks[split][start:stop], batch.keys)
                last = (split, start, stop)
                bar.update(1)
            if pending_write is not None:
                pending_write.result()
                if written is not None:
                    written(*last)
            bar.close()
        if finalize:
            finalize_store(writer, manifest, previous)
        return writer


class PreviousCalls:
    """Teacher calls of an existing store that a new store with a larger budget can reuse.

    Reusable only if the budget grew and everything else is identical (teacher weights, data set,
    views, dtype, layout, selection strategy and seed): then the earlier selection is a prefix of the
    new one and its logits are exactly what the teacher would return again. The old store is moved to
    `<out>.previous` first (so a crash mid-run loses nothing) and deleted after the new one is final.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        root = zarr.open_group(str(path), mode="r")
        # checked reads: a damaged old store is an error naming its file, never logits copied into the new one
        self.stores = {name: LogitStore(path, name) for name, _ in root.groups()}

    @classmethod
    def find(cls, out: str | Path, spec: StoreSpec) -> PreviousCalls | None:
        out = Path(out)
        prev = out.with_name(out.name + ".previous")
        if out.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(out, prev)
        if not prev.exists():
            return None
        try:
            attrs = dict(zarr.open_group(str(prev), mode="r").attrs)
        except Exception:  # not a store: nothing to reuse
            shutil.rmtree(prev)
            return None
        ob = BudgetSpec.from_attrs(attrs.get("budget"))
        nb = BudgetSpec.from_attrs(spec.extra.get("budget"))
        same = bool(attrs.get("complete")) and same_content(attrs, spec, ignore=("extra",))
        same = same and (ob.strategy, ob.seed) == (nb.strategy, nb.seed)
        # Only a *raised* budget reuses calls. Any other rerun (DVC reruns teach when its code or inputs
        # change) recomputes everything, so a fix to the teach code path is never masked by old logits.
        grew = isinstance(ob.n, int) and (nb.is_full or int(nb.n) > ob.n)
        if not (same and grew):
            log.info("existing store %s is not reusable (not a raised budget of the same teacher/data/recipe)", out)
            shutil.rmtree(prev)
            return None
        try:
            found = cls(prev)
        except StoreError as e:
            log.warning("existing store %s is not reusable: %s", out, e)
            shutil.rmtree(prev)
            return None
        log.info("reusing the teacher calls of the existing store %s", out)
        return found

    def block(self, split: str, start: int, stop: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        store = self.stores.get(split)
        if store is None or store.topk:  # top-k layout: reuse is exact only for dense stores
            return None, None
        return store.read_block(start, stop), store.queried(start, stop)

    def reused(self, masks: dict[str, np.ndarray]) -> int:
        return int(sum((self.stores[s].queried() & m).sum() for s, m in masks.items() if s in self.stores))

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
