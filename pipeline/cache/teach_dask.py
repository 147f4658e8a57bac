"""Teacher caching on a dask.distributed cluster: one task per contiguous range of whole store shards.

The driver (this process) creates the partial store and its attributes, splits the still-pending
(split, shard) pairs into tasks, submits them with dask retries and finalizes the store only when
every task succeeded. Each worker process loads the teacher once (a per-process cache keyed by
checkpoint path + sha256) and runs the ordinary single-process `run_teach` over its task's shards
with `finalize=False`, so the math, views and budget masks are exactly those of the local path and
the store comes out bit for bit the same.

Safety rests on two store properties (pipeline/cache/store.py): a store shard is written by one writer
only (tasks never share a shard: zarr loses data when two writers touch one shard file), and a
shard's `done` flag is set after its data. So a worker killed mid-task leaves its unfinished shards
un-`done`; dask reruns the task elsewhere (or a later run picks them up) and only those shards are
recomputed: a task skips shards that are already done.

`cluster` is "local" (a `distributed.LocalCluster` on this machine, closed at the end) or a
scheduler address (`tcp://host:8786`) of a running cluster; the code path is the same. On a real
cluster, the shards, the checkpoint and the store's folder must be visible to every worker at the
same absolute paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.store import StoreError, StoreSpec, StoreWriter
from pipeline.cache.teach import PreviousCalls, finalize_store, run_teach
from pipeline.config import ConfigError
from pipeline.data.shards import Manifest, sha256_file
from pipeline.data.views import ViewRecipe
from pipeline.lock import StoreLockedError, exclusive, holder
from pipeline.runtime import pick_device

log = logging.getLogger(__name__)

TASKS_PER_WORKER = 4  # default granularity: enough tasks to balance load and lose little to a dead worker
_ADDRESS = re.compile(r"^([a-z][a-z0-9+.-]*://.+|[\w.\-]+:\d+)$")


class TeachClusterError(RuntimeError):
    """Some teach tasks failed; the partial store keeps every shard that was finished."""


# ---------------------------------------------------------------------------------------------
# planning (driver side, pure)


def plan_tasks(pending: Sequence[tuple[str, int]], shards_per_task: int) -> list[list[tuple[str, int]]]:
    """Split pending (split, shard) pairs into tasks of at most `shards_per_task` contiguous shards of one split.

    Every pair lands in exactly one task, so no two writers ever share a store shard. Runs are cut at
    gaps (already-done shards) and split boundaries, so each task reads one contiguous row range.
    """
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task must be >= 1, got {shards_per_task}")
    tasks: list[list[tuple[str, int]]] = []
    run: list[tuple[str, int]] = []
    for split, j in pending:
        contiguous = run and run[-1][0] == split and run[-1][1] + 1 == j
        if not contiguous or len(run) == shards_per_task:
            if run:
                tasks.append(run)
            run = []
        run.append((split, j))
    if run:
        tasks.append(run)
    return tasks


def default_shards_per_task(num_pending: int, num_workers: int) -> int:
    """About TASKS_PER_WORKER tasks per worker: balances uneven shards, bounds the work a killed worker loses."""
    return max(1, num_pending // (TASKS_PER_WORKER * max(1, num_workers)))


def worker_threads(cluster: str, workers: int, threads: int | None) -> int:
    """Torch intra-op threads per worker from `teach.threads`.

    On a LocalCluster the workers share this machine, so `threads` (default: all cores) is split
    among them: oversubscribed cores make every worker slower. A remote worker owns its machine's
    share, so it gets `threads` (default 1: start one dask worker per core group, or set it).
    """
    if cluster == "local":
        return max(1, (threads or os.cpu_count() or 1) // max(1, workers))
    return max(1, threads or 1)


# ---------------------------------------------------------------------------------------------
# worker side

_TEACHER_LOCK = threading.Lock()
_TEACHER_CACHE: dict[tuple[str, str], Any] = {}


def cached_teacher(checkpoint: str, sha256: str, manifest: Manifest) -> Any:
    """The teacher of `checkpoint`, loaded once per worker process and reused by every later task.

    Keyed by (path, sha256) so a new checkpoint at the same path is reloaded; only the latest
    teacher is kept, so a long-lived cluster serving several teach runs does not pile up models
    (or GPU memory). The file's hash is checked on load: on a cluster, a worker seeing a different
    file at the same path would otherwise fill the store with another teacher's logits.
    """
    from pipeline.models.checkpoint import load_model

    key = (checkpoint, sha256)
    with _TEACHER_LOCK:  # workers with several threads: load once, not once per thread
        model = _TEACHER_CACHE.get(key)
        if model is None:
            found = sha256_file(checkpoint)
            if found != sha256:
                raise StoreError(
                    f"worker {os.uname().nodename} sees checkpoint {checkpoint} with sha256 {found[:12]}, the driver "
                    f"saw {sha256[:12]}: the workers need the same file at the same path (shared filesystem)"
                )
            model, _ = load_model(checkpoint, data=manifest)
            _TEACHER_CACHE.clear()
            _TEACHER_CACHE[key] = model
            log.info("worker pid %d loaded teacher %s", os.getpid(), checkpoint)
    return model


def teach_shards(
    manifest: Manifest,
    checkpoint: str,
    sha256: str,
    out: str,
    spec: StoreSpec,
    recipes: dict[str, ViewRecipe],
    shards: list[tuple[str, int]],
    *,
    batch_size: int,
    threads: int,
    previous: str | None = None,
    owner: dict[str, Any] | None = None,
) -> list[tuple[str, int]]:
    """One dask task: fill store shards `shards` of the partial store `out`; returns the shards computed.

    Shards already marked done are skipped, so a retried or rescheduled task (its first attempt
    died after finishing some shards) recomputes only what is missing. `previous`: path of an
    earlier store whose teacher calls are reused (`PreviousCalls`, a raised budget). `owner`: the
    driver's lock record; before each shard the task checks the store is still the driver's, so a task
    orphaned by a killed driver stops once another run has taken the store over.
    """

    def driver_holds_lock() -> None:
        if owner is not None and holder(out) != owner:
            raise StoreLockedError(
                f"the teach driver {owner.get('pid')}@{owner.get('host')} no longer holds the lock of {out} "
                f"(now: {holder(out) or 'nobody'}); this task stops"
            )

    driver_holds_lock()
    # Per task, not per process: set_num_threads binds the OpenMP pool of the calling thread, and
    # dask may run tasks on different executor threads.
    torch.set_num_threads(threads)
    model = cached_teacher(checkpoint, sha256, manifest)
    writer = StoreWriter(out, spec, create=False)  # also checks the partial store is this run's
    pending = {split: set(writer.pending(split)) for split in {s for s, _ in shards}}
    todo = [(s, j) for s, j in shards if j in pending[s]]
    if todo:
        run_teach(
            manifest,
            model,
            out,
            spec,
            recipes,
            batch_size=batch_size,
            device=pick_device(),
            shards=todo,
            finalize=False,
            previous=PreviousCalls(Path(previous)) if previous else None,
            guard=driver_holds_lock,
        )
    return todo


# ---------------------------------------------------------------------------------------------
# driver


def check_cluster(cluster: str) -> None:
    """Accept "local" or a scheduler address; anything else is a clear error listing the options."""
    if cluster != "local" and not _ADDRESS.match(cluster):
        raise ConfigError(
            f"teach.cluster must be 'none', 'local' or a scheduler address like 'tcp://host:8786'; got '{cluster}'"
        )


def local_cluster(workers: int) -> Any:
    """A LocalCluster of `workers` processes with one dask thread each, set up for teacher inference.

    Parallelism comes from processes (no GIL contention between decode, compress and forward),
    each running torch with its own thread budget. Dask's nannies export MALLOC_TRIM_THRESHOLD_
    to workers so memory is returned to the OS early; setting it also switches off glibc's dynamic
    mmap threshold, so every activation-sized tensor is a fresh mmap + page faults: the teacher's
    forward ran 2x slower in such a worker (resnet8, 28x28, batch 1000). It is dropped here (the
    nanny skips pre-spawn variables set to None); OMP/MKL/OPENBLAS_NUM_THREADS=1 stay, torch's
    thread count is set per task. dashboard ":0": any free port, so concurrent runs don't clash.
    """
    import dask
    from distributed import LocalCluster

    if workers < 1:
        raise ConfigError(f"teach.workers must be >= 1 for a local cluster, got {workers}")
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        # the nannies read the variables now and reuse them when they restart a dead worker
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")


@contextlib.contextmanager
def connect(cluster: str, workers: int) -> Iterator[Any]:
    """A `distributed.Client` for `cluster` ("local" or a scheduler address), closed (with its LocalCluster) on exit."""
    from distributed import Client

    check_cluster(cluster)
    if cluster == "local":
        with local_cluster(workers) as lc, Client(lc) as client:
            log.info("started LocalCluster: %d worker processes (%s)", workers, lc.scheduler_address)
            yield client
    else:
        with Client(cluster) as client:
            log.info("connected to dask scheduler %s", cluster)
            yield client


def _gpu_resources(client: Any) -> dict[str, float] | None:
    """{"GPU": 1} when every worker advertises a GPU resource (`dask worker --resources GPU=1`), else None.

    Then a worker never runs two teacher tasks on its one GPU at once, whatever its thread count.
    """
    infos = client.scheduler_info().get("workers", {})
    if infos and all("GPU" in (w.get("resources") or {}) for w in infos.values()):
        return {"GPU": 1}
    return None


def run_teach_dask(
    manifest: Manifest,
    checkpoint_path: str | Path,
    out: str | Path,
    spec: StoreSpec,
    recipes: dict[str, ViewRecipe],
    *,
    cluster: str = "local",
    workers: int = 2,
    threads_per_worker: int = 1,
    batch_size: int = 512,
    force: bool = False,
    retries: int = 2,
    shards_per_task: int | None = None,
    resources: dict[str, float] | None = None,
    previous: PreviousCalls | None = None,
) -> StoreWriter:
    """Fill and finalize the store at `out` with the teacher of `checkpoint_path`, on a dask cluster.

    cluster: "local" (LocalCluster with `workers` processes) or a scheduler address.
    threads_per_worker: torch intra-op threads in each worker (see `worker_threads`).
    retries: dask retries of a task that raised (a killed worker's task is rescheduled by dask anyway).
    shards_per_task: store shards per task (default: ~TASKS_PER_WORKER tasks per worker).
    resources: dask resources per task (default: {"GPU": 1} if every worker has a GPU resource).
    previous: an earlier store's teacher calls to reuse (as in `run_teach`); discarded once this store is final.

    Raises TeachClusterError if any task failed: the partial store keeps every finished shard, and
    re-running computes exactly the missing ones. The driver holds the store's writer lock for the
    whole run; the workers write their disjoint shards under it (and stop if it changes hands).
    """
    with exclusive(out, f"logit store {out}"):
        from distributed import as_completed
        from tqdm.auto import tqdm

        owner = holder(out)  # this process's lock record: every task checks it before each shard
        check_cluster(cluster)  # a typo fails before anything is created
        name = spec.teacher.get("name", "teacher")
        checkpoint = Path(checkpoint_path).resolve()  # workers may run elsewhere: no cwd-relative paths
        out = Path(out).resolve()
        manifest = dataclasses.replace(manifest, root=Path(manifest.root).resolve())
        previous_path = str(Path(previous.path).resolve()) if previous else None
        sha = sha256_file(checkpoint)
        claimed = spec.teacher.get("weights_sha256")
        if claimed and claimed != sha:
            raise StoreError(
                f"store spec names teacher weights {claimed[:12]} but {checkpoint} has sha256 {sha[:12]}: "
                "the store would mislabel its teacher"
            )
        writer = StoreWriter(out, spec, force=force, create=True)  # skeleton + attrs, or resume a partial one
        pending = [(s, j) for s in spec.splits for j in writer.pending(s)]
        total = sum(s.num_shards for s in spec.splits.values())
        if pending:
            run_id = uuid.uuid4().hex[:8]  # fresh task keys: a long-lived scheduler may remember a failed run's keys
            with connect(cluster, workers) as client:
                n_workers = len(client.scheduler_info().get("workers", {})) or workers
                tasks = plan_tasks(pending, shards_per_task or default_shards_per_task(len(pending), n_workers))
                res = resources if resources is not None else _gpu_resources(client)
                log.info(
                    "teach %s: %d of %d shards pending -> %d tasks on %d workers (%d torch threads each%s)",
                    name,
                    len(pending),
                    total,
                    len(tasks),
                    n_workers,
                    threads_per_worker,
                    f", resources {res}" if res else "",
                )
                futures = {
                    client.submit(
                        teach_shards,
                        manifest,
                        str(checkpoint),
                        sha,
                        str(out),
                        spec,
                        recipes,
                        task,
                        batch_size=batch_size,
                        threads=threads_per_worker,
                        previous=previous_path,
                        owner=owner,
                        key=f"teach-{name}-{task[0][0]}-{task[0][1]}-{task[-1][1]}-{run_id}",
                        retries=retries,
                        pure=False,
                        resources=res,
                    ): task
                    for task in tasks
                }
                failed: list[tuple[list[tuple[str, int]], BaseException | str]] = []
                computed = 0
                bar = tqdm(total=len(futures), desc=f"teach {name} (dask)", unit="task", disable=None)
                # Wait for every task even after a failure: each finished shard is work a re-run keeps.
                for fut in as_completed(list(futures)):
                    task = futures[fut]
                    if fut.status == "finished":
                        computed += len(fut.result())
                    else:
                        err = fut.exception() if fut.status == "error" else fut.status
                        log.error("teach task %s..%s failed: %r", task[0], task[-1], err)
                        failed.append((task, err))
                    bar.update(1)
                bar.close()
            if failed:
                missing = sum(len(writer.pending(s)) for s in spec.splits)
                (first, *_), err = failed[0]
                raise TeachClusterError(
                    f"{len(failed)} of {len(tasks)} teach tasks failed (first: shards from {first}: {err!r}); "
                    f"{missing} of {total} shards are missing in {writer.partial}. "
                    "Re-run teach: finished shards are kept and only the missing ones are computed."
                )
            log.info("computed %d shards on the cluster (%d were already done)", computed, total - len(pending))
        else:
            log.info("all %d shards already cached in %s", total, writer.partial)
        finalize_store(writer, manifest, previous)  # the same attrs as run_teach writes: identical stores
        return writer
