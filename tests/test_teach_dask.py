"""Teacher caching on dask: same store bit for bit as one process, failures resume exactly the missing shards.

The cluster tests use real worker processes (LocalCluster, processes=True). Faults are injected by
patching `pipeline.cache.teach.shard_logits` (one call per store shard) inside the workers with
`client.run`, which also counts the shards each worker computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.store import LogitStore, StoreWriter, partial_path
from pipeline.cache.teach import PreviousCalls, build_spec, run_teach
from pipeline.cache.teach_dask import (
    TeachClusterError,
    check_cluster,
    local_cluster,
    plan_tasks,
    run_teach_dask,
    worker_threads,
)
from pipeline.data.shards import Manifest, sha256_file
from pipeline.data.views import PadCropFlip, ViewRecipe
from pipeline.lock import lock_path
from pipeline.models import load_model, save_model
from tests.conftest import assert_same_files, linear_teacher

distributed = pytest.importorskip("distributed")

# Worker-side helpers below are defined in this test module, which workers cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}
BATCH = 50  # < shard size 64: every shard is two batches, as in real runs


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def teacher(tiny_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny teacher saved as a kdcache checkpoint (workers load it from disk) and its store identity."""
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    save_model(path, linear_teacher(tiny_manifest), "cnn_tiny")
    return path, {"name": "t", "arch": "cnn_tiny", "weights_sha256": sha256_file(path)}


def spec_for(m: Manifest, teacher: dict, recipes: dict[str, ViewRecipe] = RECIPES, budget: BudgetSpec | None = None):
    return build_spec(
        m,
        teacher,
        recipes,
        dtype="float16",
        topk=0,
        compressor="blosc-zstd",
        chunk_rows=32,
        budget=budget,
    )


def single_process(m: Manifest, teacher: tuple[Path, dict], out: Path, **kw) -> Path:
    """The reference: plain run_teach in this process (1 torch thread, like each worker)."""
    model, _ = load_model(teacher[0], data=m)
    recipes = kw.pop("recipes", RECIPES)
    run_teach(m, model, out, spec_for(m, teacher[1], recipes, **kw), recipes, batch_size=BATCH)
    return out


@pytest.fixture(scope="module")
def reference(tiny_manifest: Manifest, teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return single_process(tiny_manifest, teacher, tmp_path_factory.mktemp("ref") / "ref.zarr")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A 2-worker LocalCluster shared by the fault tests, reached by address (the remote-cluster code path)."""
    with local_cluster(2) as lc:
        yield lc.scheduler_address


@pytest.fixture
def client(cluster: str) -> Iterator[distributed.Client]:
    with distributed.Client(cluster) as c:
        yield c
        c.run(_unpatch)  # restarted workers have nothing to undo; _unpatch copes


def assert_same_store(a: Path, b: Path) -> None:
    """Bit for bit: the same files with the same bytes, attributes included (a store holds no timestamps)."""
    assert_same_files(a, b)


# ---------------------------------------------------------------------------------------------
# worker-side patches (run in the workers via client.run)


def _patch(fail_on: int | None = None, sleep: float = 0.0, marks: str | None = None) -> None:
    """Count shard_logits calls (one per store shard); raise on call `fail_on`; sleep per shard (a slow teacher).

    `marks`: a folder where each call leaves a file `<split>-<shard start>` holding the worker's pid.
    """
    import pipeline.cache.teach as t
    import pipeline.models.checkpoint as mio

    orig = getattr(t, "_test_orig", t.shard_logits)
    orig_load = getattr(mio, "_test_orig_load", mio.load_model)
    t._test_orig, t._test_calls, mio._test_orig_load, mio._test_loads = orig, 0, orig_load, 0

    def shard_logits(model, batch, *args, **kwargs):
        t._test_calls += 1
        if marks:
            Path(marks, f"{batch.split}-{batch.start}").write_text(str(os.getpid()))
        if t._test_calls == fail_on:
            raise RuntimeError("injected teacher failure")
        time.sleep(sleep)
        return orig(model, batch, *args, **kwargs)

    def load(*args, **kwargs):
        mio._test_loads += 1
        return orig_load(*args, **kwargs)

    t.shard_logits, mio.load_model = shard_logits, load


def _counts() -> tuple[int, int]:
    import pipeline.cache.teach as t
    import pipeline.models.checkpoint as mio

    return getattr(t, "_test_calls", 0), getattr(mio, "_test_loads", 0)


def _unpatch() -> None:
    import pipeline.cache.teach as t
    import pipeline.models.checkpoint as mio

    if hasattr(t, "_test_orig"):
        t.shard_logits = t._test_orig
        del t._test_orig
    if hasattr(mio, "_test_orig_load"):
        mio.load_model = mio._test_orig_load
        del mio._test_orig_load


def _drop_teacher_cache() -> None:
    import pipeline.cache.teach_dask as td

    td._TEACHER_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# planning (no cluster)


def test_plan_tasks_are_contiguous_disjoint_whole_shards():
    pending = [("train", 0), ("train", 1), ("train", 2), ("train", 4), ("train", 5), ("test", 0), ("test", 1)]
    tasks = plan_tasks(pending, 2)
    assert tasks == [
        [("train", 0), ("train", 1)],
        [("train", 2)],
        [("train", 4), ("train", 5)],
        [("test", 0), ("test", 1)],
    ]
    assert sorted(p for t in plan_tasks(pending, 100) for p in t) == sorted(pending)  # each shard in one task
    assert plan_tasks([], 3) == []


def test_threads_and_cluster_option_checks():
    assert worker_threads("local", 2, 2) == 1 and worker_threads("local", 2, 8) == 4
    assert worker_threads("local", 4, 2) == 1  # never 0
    assert worker_threads("tcp://host:8786", 2, 8) == 8
    check_cluster("tcp://10.0.0.1:8786")
    check_cluster("host:8786")
    with pytest.raises(ValueError, match="'none', 'local' or a scheduler address"):
        check_cluster("lcoal")


# ---------------------------------------------------------------------------------------------
# cluster runs


def test_local_cluster_store_is_bit_identical(tiny_manifest, teacher, reference, tmp_path):
    out = tmp_path / "d.zarr"
    spec = spec_for(tiny_manifest, teacher[1])
    run_teach_dask(tiny_manifest, teacher[0], out, spec, RECIPES, cluster="local", workers=2, batch_size=BATCH)
    assert_same_store(out, reference)
    assert not partial_path(out).exists()


def test_failed_tasks_then_rerun_fills_exactly_the_missing_shards(
    tiny_manifest, teacher, reference, cluster, client, tmp_path
):
    m, out = tiny_manifest, tmp_path / "d.zarr"
    spec = spec_for(m, teacher[1])
    client.run(_drop_teacher_cache)
    client.run(_patch, fail_on=2)  # each worker's 2nd shard raises: its task dies after writing one shard
    with pytest.raises(TeachClusterError, match="Re-run teach"):
        run_teach_dask(
            m, teacher[0], out, spec, RECIPES, cluster=cluster, batch_size=BATCH, retries=0, shards_per_task=2
        )
    assert not out.exists() and partial_path(out).exists()
    w = StoreWriter(out, spec, create=False)
    missing = sum(len(w.pending(s)) for s in spec.splits)
    assert 0 < missing < 6  # some shards finished, some not
    loads_first = sum(n for _, n in client.run(_counts).values())

    client.run(_patch)  # healthy teacher, counting
    run_teach_dask(m, teacher[0], out, spec, RECIPES, cluster=cluster, batch_size=BATCH, shards_per_task=2)
    counts = client.run(_counts)
    assert sum(c for c, _ in counts.values()) == missing  # only the unfinished shards were recomputed
    assert loads_first <= 2 and all(n == 0 for _, n in counts.values())  # teacher loaded once per worker
    assert_same_store(out, reference)


def test_worker_killed_mid_run_is_rescheduled_and_redoes_only_its_unfinished_shard(
    tiny_manifest, teacher, reference, cluster, client, tmp_path, caplog
):
    m, out, marks = tiny_manifest, tmp_path / "d.zarr", tmp_path / "marks"
    marks.mkdir()
    spec = spec_for(m, teacher[1])
    client.run(_patch, sleep=0.4, marks=str(marks))  # a slow teacher, so the kill lands mid-task
    done = partial_path(out) / "train" / "done" / "c"
    victim: dict[str, int] = {}

    def kill_after_first_shard_of_a_task() -> None:
        # Tasks are [train 0, 1], [train 2, 3], [test 0, 1]: kill the worker that finished the first
        # shard of a train task while it is busy with the second, so exactly one shard of it is done.
        deadline = time.time() + 30
        while time.time() < deadline and not victim:
            for j in (0, 2):
                if (done / str(j)).exists() and not (done / str(j + 1)).exists():
                    victim.update(shard=j, pid=int((marks / f"train-{j * 64}").read_text()))
                    os.kill(victim["pid"], signal.SIGKILL)
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_first_shard_of_a_task)
    killer.start()
    with caplog.at_level(logging.INFO, logger="pipeline.cache.teach_dask"):
        run_teach_dask(m, teacher[0], out, spec, RECIPES, cluster=cluster, batch_size=BATCH, shards_per_task=2)
    killer.join()
    assert victim and victim["pid"] not in client.run(os.getpid).values()  # that worker really died mid-run
    # The rescheduled task skipped its finished shard: 5 of the 6 shards computed by the surviving attempts.
    assert "computed 5 shards on the cluster" in caplog.text
    assert_same_store(out, reference)


DRIVER = """
import json, sys
from pipeline.cache.teach_dask import run_teach_dask
from pipeline.data.shards import load_manifest
from tests.test_teach_dask import BATCH, RECIPES, spec_for
shards, checkpoint, identity, out, cluster = sys.argv[1:]
m = load_manifest(shards)
run_teach_dask(m, checkpoint, out, spec_for(m, json.loads(identity)), RECIPES, cluster=cluster, batch_size=BATCH,
               shards_per_task=2)
"""


def test_driver_killed_mid_run_then_rerun_takes_over_and_equals_single_process(
    tiny_manifest, teacher, reference, cluster, client, tmp_path, caplog
):
    """SIGKILL of the driver: its lock and partial store stay; the next driver takes the stale lock over (the
    killed driver's orphaned tasks stop at their next shard: the lock changed hands) and finishes the store."""
    m, out = tiny_manifest, tmp_path / "d.zarr"
    client.run(_patch, sleep=0.4)  # a slow teacher, so the kill lands mid-run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(m.root), str(teacher[0]), json.dumps(teacher[1]), str(out), cluster]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env)
    done = partial_path(out) / "train" / "done" / "c"
    deadline = time.time() + 60
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_path(out).exists()
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid
    client.run(_patch)  # a healthy teacher for the rerun
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"):
        run_teach_dask(m, teacher[0], out, spec_for(m, teacher[1]), RECIPES, cluster=cluster, batch_size=BATCH)
    assert f"taking over the stale lock {lock_path(out)} of pid {proc.pid}" in caplog.text
    assert_same_store(out, reference)
    assert not lock_path(out).exists()


def test_a_task_stops_when_its_driver_no_longer_holds_the_lock(tiny_manifest, teacher, tmp_path):
    """An orphaned task (its driver was killed, another run took the store over) writes no further shard."""
    from pipeline.cache.teach_dask import teach_shards
    from pipeline.lock import StoreLockedError

    m, out = tiny_manifest, tmp_path / "d.zarr"
    spec = spec_for(m, teacher[1])
    StoreWriter(out, spec)  # the partial store a driver created
    killed = {"host": "h", "pid": 1, "since": "then", "command": "teach"}
    lock_path(out).write_text(json.dumps({**killed, "pid": 2}))  # the lock is another driver's now
    kw = dict(batch_size=BATCH, threads=1, owner=killed)
    with pytest.raises(StoreLockedError, match="no longer holds the lock"):
        teach_shards(m, str(teacher[0]), teacher[1]["weights_sha256"], str(out), spec, RECIPES, [("train", 0)], **kw)
    assert StoreWriter(out, spec, create=False).pending("train") == [0, 1, 2, 3]


def test_budget_and_views_equal_single_process(tiny_manifest, teacher, cluster, tmp_path):
    m = tiny_manifest
    recipes = {"train": PadCropFlip(3, 7, 2, True), "test": PadCropFlip(2, 7, 2, True)}
    budget = BudgetSpec(300, "class_balanced", 1)
    ref = single_process(m, teacher, tmp_path / "ref.zarr", recipes=recipes, budget=budget)
    out = tmp_path / "d.zarr"
    run_teach_dask(
        m,
        teacher[0],
        out,
        spec_for(m, teacher[1], recipes, budget),
        recipes,
        cluster=cluster,
        batch_size=BATCH,
        shards_per_task=1,
    )
    assert_same_store(out, ref)
    store = LogitStore(out, "train", m)
    assert store.teacher_calls == 300 and store.queried().sum() == 300 and store.views == 3
    assert np.isnan(store.read_all()[~store.queried()]).all()

    # Raising the budget reuses the earlier calls (PreviousCalls) the same way on both paths.
    bigger = dataclasses.replace(budget, n=450)
    spec = spec_for(m, teacher[1], recipes, bigger)
    model, _ = load_model(teacher[0], data=m)
    run_teach(m, model, ref, spec, recipes, batch_size=BATCH, previous=PreviousCalls.find(ref, spec))
    run_teach_dask(
        m, teacher[0], out, spec, recipes, cluster=cluster, batch_size=BATCH, previous=PreviousCalls.find(out, spec)
    )
    assert_same_store(out, ref)
    assert LogitStore(out, "train", m).attrs["calls_reused"] == 300 + 96 * 2  # train 300 + test split in full
    assert not Path(f"{out}.previous").exists()


def test_stage_runs_on_the_cluster_when_configured(tiny_manifest, teacher, reference, cluster, tmp_path):
    import yaml

    from stages import teach as stage
    from tests.conftest import tiny_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(teach={"cluster": cluster, "batch_size": BATCH})))
    out = tmp_path / "t.zarr"
    stage.main(
        [
            "--name",
            "t",
            "--params",
            str(params),
            "--shards",
            str(tiny_manifest.root),
            "--checkpoint",
            str(teacher[0]),
            "--out",
            str(out),
        ]
    )
    for split in ("train", "test"):
        np.testing.assert_array_equal(LogitStore(out, split).read_all(), LogitStore(reference, split).read_all())
