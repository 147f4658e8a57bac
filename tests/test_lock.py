"""One writer per store: the lock itself, then two real `python -m stages.teach` processes on one store.

The concurrent runs are made deterministic without sleeps: the first writer (a teach process with a patched
StoreWriter) stops itself with SIGSTOP at a chosen point of its run (right after taking the lock, after k
shards, before finalizing); the test waits for the stop (`waitpid(WUNTRACED)`), runs the second writer to
completion, then lets the first one continue. Whatever the offset, the second fails at once naming the
holder, and the first one's store equals a single-process store byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lock import StoreLockedError, exclusive, lock_path
from pipeline.models import save_model
from stages import teach
from tests.conftest import assert_same_files, linear_teacher, tiny_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_LOG": "WARNING"}

HOLD = """
import sys
from pipeline.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(StoreLockedError) as err, exclusive(out, "logit store s"):
            pass
        msg = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and str(lock_path(out)) in msg
        assert msg.startswith("logit store s is being written by another process")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with exclusive(out) as lock:  # released: free again, and the file names this process now
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()  # removed on release


def test_reentrant_within_a_process(tmp_path):
    out = tmp_path / "s.zarr"
    with exclusive(out), exclusive(out):  # teach_store holds it while run_teach takes it again
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "s.zarr"
    dead = _dead_pid()
    record = {"host": socket.gethostname(), "pid": dead, "since": "2024-01-01T00:00:00+00:00", "command": "teach"}
    lock_path(out).write_text(json.dumps(record))  # what a SIGKILLed writer leaves behind
    with exclusive(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {lock_path(out)} of pid {dead}" in caplog.text
    assert "no longer running" in caplog.text


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "s.zarr"
    record = {"host": "elsewhere", "pid": 1, "since": "2024-01-01T00:00:00+00:00", "command": "teach"}
    lock_path(out).write_text(json.dumps(record))
    with pytest.raises(StoreLockedError, match="pid 1 on host elsewhere.*delete the lock file"), exclusive(out):
        pass
    assert json.loads(lock_path(out).read_text())["host"] == "elsewhere"  # left as it was


# ---------------------------------------------------------------------------------------------
# two teach processes on one store

# A teach process that stops itself (SIGSTOP) at `K`: 0 = lock taken and partial store created, k > 0 = after
# k shards written, -1 = every shard written, before finalize.
PAUSED_TEACH = """
import os, signal, sys
from pipeline.cache import store
from pipeline.stage import run_main
from stages.teach import main
K, argv = int(sys.argv[1]), sys.argv[2:]
init, write, finalize = store.StoreWriter.__init__, store.StoreWriter.write_shard, store.StoreWriter.finalize
written = []
def stop():
    os.kill(os.getpid(), signal.SIGSTOP)
def patched_init(self, *a, **k):
    init(self, *a, **k)
    if K == 0:
        stop()
def patched_write(self, *a, **k):
    write(self, *a, **k)
    written.append(1)
    if len(written) == K:
        stop()
def patched_finalize(self, *a, **k):
    if K == -1:
        stop()
    return finalize(self, *a, **k)
store.StoreWriter.__init__, store.StoreWriter.write_shard = patched_init, patched_write
store.StoreWriter.finalize = patched_finalize
run_main(main, argv)
"""


@pytest.fixture(scope="module")
def setup(tiny_manifest, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """teach argv (without --out), the folder for stores, and a single-process reference store."""
    root = tmp_path_factory.mktemp("lock")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    ckpt = root / "t.pt"
    save_model(ckpt, linear_teacher(tiny_manifest), "cnn_tiny")
    argv = ["--name", "t", "--params", str(params), "--shards", str(tiny_manifest.root), "--checkpoint", str(ckpt)]
    teach.main([*argv, "--out", str(root / "ref.zarr")])
    return argv, root, root / "ref.zarr"


def test_two_teach_processes_at_several_offsets_one_store_and_a_clear_loser(setup, monkeypatch, capsys):
    """Offsets: 2 of 6 shards written, every shard written but not finalized (started together: the next test).
    The second writer is a real `python -m stages.teach` at the first offset, this test process at the other."""
    from pipeline.cli import main as kdcache

    argv, root, ref = setup
    offsets = [2, -1]  # of 6 shards (4 train + 2 test)
    first = {}
    for k in offsets:
        out = root / f"k{k}.zarr"
        first[k] = subprocess.Popen([sys.executable, "-c", PAUSED_TEACH, str(k), *argv, "--out", str(out)], env=ENV)
    for k, proc in first.items():
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"offset {k}: the first writer ended before its stop point ({status})"
    for k in offsets:
        out = root / f"k{k}.zarr"
        if k == offsets[0]:
            cmd = [sys.executable, "-m", "stages.teach", *argv, "--out", str(out)]
            res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
            code, err, prog = res.returncode, res.stderr, "python -m stages.teach"
        else:
            capsys.readouterr()
            code, err, prog = kdcache(["teach", *argv, "--out", str(out)]), capsys.readouterr().err, "kdcache teach"
        assert code == 2, (k, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"{prog}: error: logit store {out} is being written by another process: "), line
        assert f"pid {first[k].pid} on host {socket.gethostname()}" in line and f"lock file {out}.lock" in line, line
    for proc in first.values():
        os.kill(proc.pid, signal.SIGCONT)
    for k, proc in first.items():
        assert proc.wait(timeout=120) == 0, k
        assert_same_files(root / f"k{k}.zarr", ref)  # the loser never touched it
        assert not (root / f"k{k}.zarr.lock").exists()


def test_two_teach_processes_started_together(setup):
    """No pause: whichever writes first wins; the other is refused (lock held, or the store already exists)."""
    argv, root, ref = setup
    out = root / "race.zarr"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "stages.teach", *argv, "--out", str(out)], env=ENV, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip().splitlines()[-1]
    assert ("is being written by another process" in loser) or ("already exists; pass --force" in loser), loser
    assert_same_files(out, ref)
