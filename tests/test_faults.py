"""Fault injection: a full disk mid-shard, a killed writer's stray temp file, a SIGKILLed distill rerun as DVC would,
no orphaned worker process after a SIGKILL.

(SIGKILL of teach: tests/test_store.py; of the dask driver and of a dask worker: tests/test_teach_dask.py;
two writers on one store: tests/test_lock.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from zarr.storage import LocalStore

from pipeline.cache.store import LogitStore, StoreWriter, partial_path
from pipeline.cache.teach import build_spec, run_teach
from pipeline.data.shards import load_manifest
from pipeline.data.views import PadCropFlip
from pipeline.errors import is_user_error, user_message
from pipeline.lock import lock_path
from pipeline.models import save_model
from stages import distill, prepare, teach
from tests.conftest import assert_same_files, linear_teacher, make_project, tiny_params

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}


def _spec(m):
    return build_spec(
        m, {"name": "t", "arch": "cnn_tiny", "weights_sha256": "0"}, RECIPES, dtype="float16", chunk_rows=32
    )


@pytest.fixture(scope="module")
def reference(tiny_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_teach(tiny_manifest, linear_teacher(tiny_manifest), out, _spec(tiny_manifest), RECIPES, batch_size=50)
    return out


@pytest.mark.parametrize("fails", ["train/logits/c/2/0/0", "train/queried/c/2/0", "train/done/c/2", "zarr.json"])
def test_disk_full_mid_shard_leaves_a_partial_store_that_resumes_to_the_identical_result(
    tiny_manifest, reference, tmp_path, monkeypatch, fails
):
    """ENOSPC on one file of train shard 2 (its logits, its query mask, its done flag) or on finalizing."""
    m, out = tiny_manifest, tmp_path / "t.zarr"
    real_set = LocalStore.set
    state = {"armed": True, "seen": set()}
    all_done = {"train/done/c/3", "test/done/c/1"}  # after these, the next root zarr.json write is finalize's

    async def full_disk(self, key, value):
        if state["armed"] and key == fails and (key != "zarr.json" or all_done <= state["seen"]):
            state["armed"] = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        state["seen"].add(key)
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    with pytest.raises(OSError) as err:
        run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50)
    assert err.value.errno == errno.ENOSPC and not state["armed"]
    assert is_user_error(err.value) and user_message(err.value) == "No space left on device"
    assert not out.exists() and partial_path(out).exists() and not lock_path(out).exists()
    writer = StoreWriter(out, _spec(m), create=False)
    if fails != "zarr.json":
        assert 2 in writer.pending("train")  # the half-written shard is not marked done
    ref = LogitStore(reference, "train", m)
    part = writer.group["train"]
    for j in np.flatnonzero(part["done"][:]):  # every shard marked done holds exactly its final data
        np.testing.assert_array_equal(part["logits"][j * 64 : (j + 1) * 64], ref.read_block(j * 64, (j + 1) * 64, None))
    monkeypatch.setattr(LocalStore, "set", real_set)
    run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50)  # the next run resumes
    assert_same_files(out, reference)


def test_disk_full_is_one_clean_line_at_the_command_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main as kdcache

    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    save_model("data/teachers/small.safetensors", linear_teacher(load_manifest("data/shards/tiny")), "cnn_tiny")
    real_set = LocalStore.set

    async def full_disk(self, key, value):
        if key.startswith("train/logits/c/1/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    capsys.readouterr()
    assert kdcache(["teach", "--name", "small"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "kdcache teach: error: No space left on device"


def test_stray_temp_file_of_a_killed_write_is_not_part_of_the_finished_store(tiny_manifest, reference, tmp_path):
    """zarr writes `<file>.<uuid hex>.partial` then renames it: a writer killed in between leaves the temp file."""
    m, out = tiny_manifest, tmp_path / "t.zarr"
    run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50, finalize=False)
    stray = partial_path(out) / "train" / "logits" / "c" / "1" / "0" / f"0.{'ab' * 16}.partial"
    stray.write_bytes(b"half a shard")
    run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50)  # nothing pending: finalize
    assert_same_files(out, reference)


# ---------------------------------------------------------------------------------------------
# SIGKILL of distill, then --resume

# `python -m stages.distill` that stops itself (SIGSTOP) at its `K`-th training step, so the test can kill
# it at a known point: mid-epoch, after the epoch checkpoints before it.
PAUSED_DISTILL = """
import os, signal, sys
import pipeline.training.loop as loop
from pipeline.stage import run_main
from stages.distill import main
K, argv, real, steps = int(sys.argv[1]), sys.argv[2:], loop._batch_loss, []
def batch_loss(*a, **k):
    steps.append(1)
    if len(steps) == K:
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(*a, **k)
loop._batch_loss = batch_loss
run_main(main, argv)
"""


def _distill_project(tmp_path: Path, monkeypatch, **train) -> tuple[Path, list[str]]:
    """cwd = a tiny project with shards, a fixed teacher and its store; returns (project, distill argv)."""
    p = tiny_params()
    p["distill"]["train"].update({"epochs": 3, **train})
    proj = make_project(tmp_path / "proj", p)
    monkeypatch.chdir(proj)
    prepare.main([])
    save_model("data/teachers/small.safetensors", linear_teacher(load_manifest("data/shards/tiny")), "cnn_tiny")
    teach.main(["--name", "small"])
    return proj, ["--teacher", "small", "--loss", "kd"]


def test_sigkill_of_distill_mid_epoch_then_a_plain_rerun_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """What `dvc repro` does after a kill: the same command again, no flag. It continues from the epoch state
    (kept outside the student folder, which DVC deletes) and ends byte-identical to an uninterrupted run."""
    proj, argv = _distill_project(tmp_path, monkeypatch)
    sid = "small-kd-full-0"
    distill.main([*argv, "--out-dir", "ref", "--curves", "ref.json"])  # uninterrupted

    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_DISTILL, "12", *argv], env=env)  # 8 steps an epoch
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    os.kill(proc.pid, signal.SIGKILL)  # mid epoch 2
    proc.wait(timeout=60)
    student, state = Path(f"data/students/{sid}"), Path(f"checkpoints/distill/{sid}")
    assert not (student / "model.safetensors").exists() and not Path(f"plots/curves/{sid}.json").exists()
    assert json.loads((state / "resume.json").read_text())["epoch"] == 0  # epoch 1's state, outside the outputs
    shutil.rmtree(student)  # as DVC does with a stage's outputs before it runs the stage again

    distill.main(argv)  # no --resume: the stages continue their own killed run by default
    assert (student / "model.safetensors").is_file()
    assert_same_files(student, Path("ref"))  # model.safetensors and history.json, byte for byte
    assert Path(f"plots/curves/{sid}.json").read_bytes() == Path("ref.json").read_bytes()
    assert not state.exists()  # finished: its resume state is gone
    timings = json.loads(Path(f"logs/distill/{sid}.json").read_text())  # run times: beside, not inside, outputs
    assert [t["epoch"] for t in timings] == [1, 2, 3]


def _alive(procs: list) -> list:
    import psutil

    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["distill", "teach"])
def test_sigkill_of_a_stage_leaves_no_worker_process_alive(tmp_path, monkeypatch, stage):
    """distill with a loader worker (forkserver, resource tracker, worker) and teach on a dask LocalCluster: SIGKILL
    the stage's process, and 10 s later none of the processes it started is alive."""
    import psutil

    proj, argv = _distill_project(tmp_path, monkeypatch, workers=1, epochs=50)
    cmd = [sys.executable, "-m", "stages.distill", *argv]
    if stage == "teach":
        p = yaml.safe_load(Path("params.yaml").read_text())
        p["teach"].update({"cluster": "local", "workers": 2})
        p["prepare"]["options"]["n"] = 2048  # enough shards to still be caching when the kill comes
        Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        prepare.main([])
        cmd = [sys.executable, "-m", "stages.teach", "--name", "small", "--force"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_LOG": "WARNING"}
    proc = subprocess.Popen(cmd, env=env, cwd=proj)
    main = psutil.Process(proc.pid)
    want = 3 if stage == "distill" else 2  # tracker + forkserver + loader worker | the two dask worker processes
    deadline = time.monotonic() + 120
    while len(main.children(recursive=True)) < want:
        assert proc.poll() is None, f"{stage} ended before its workers started"
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.2)
    time.sleep(1.0)
    children = main.children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(children)]
    for p in _alive(children):
        p.kill()
    assert not left, f"processes of the killed {stage} still alive 10 s later: {left}"
