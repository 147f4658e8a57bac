"""A damaged, foreign or mismatched cache never trains a student silently (the integrity issue's table, row by row).

Each fault is injected into a copy of one finished tiny store (files deleted, truncated, bytes flipped, values
rewritten behind the writer's back); every reader (`LogitStore`, `kdcache inspect`, `kdcache verify`, `distill`,
`evaluate`) must then fail with one line naming the store, the file and the rows, exit 2, and write no model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.store import LogitStore, StoreError, StoreWriter, partial_path
from pipeline.cache.teach import run_teach
from pipeline.cache.verify import verify_store
from pipeline.cli import main as kdcache
from pipeline.data.shards import load_manifest
from stages import prepare
from tests.conftest import assert_same_files, linear_teacher, make_project, taught_project, tiny_params

SID = "small-kd-full-0"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny project with shards, a trained teacher (far above chance) and its finished store (4 train shards of
    64 rows)."""
    return taught_project(tmp_path_factory.mktemp("integrity") / "proj", tiny_params())


@pytest.fixture
def proj(finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished project, cwd inside it."""
    dst = tmp_path / "p"
    shutil.copytree(finished, dst)
    monkeypatch.chdir(dst)
    return dst


STORE = Path("data/logits/small.zarr")


def _file(array: str, j: int = 1) -> Path:
    """Store shard `j`'s file of `array` ('train/logits', 'train/queried', 'test/logits')."""
    return STORE / array / "c" / str(j) / ("0/0" if array.endswith("logits") else "0")


def _one_line_error(capsys, code: int, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    line = err[-1]
    assert line.startswith(f"{prog}: error: "), line
    assert "Traceback" not in "\n".join(err)
    return line


def _distill(capsys) -> str:
    code = kdcache(["distill", "--teacher", "small", "--loss", "kd"])
    line = _one_line_error(capsys, code, "kdcache distill")
    assert not Path(f"data/students/{SID}/model.safetensors").exists()  # no model written
    assert not Path(f"plots/curves/{SID}.json").exists()
    return line


# ---------------------------------------------------------------------------------------------
# the table's store rows


@pytest.mark.parametrize("array", ["train/logits", "train/queried"])
def test_a_deleted_shard_file_fails_every_reader_naming_the_file(proj, capsys, array):
    _file(array).unlink()
    line = _distill(capsys)
    assert str(_file(array)) in line and "missing" in line and "dvc repro -f teach@small" in line
    line = _one_line_error(capsys, kdcache(["inspect", str(STORE)]), "kdcache inspect")
    assert str(_file(array)) in line
    assert kdcache(["verify", str(STORE)]) == 2
    out = capsys.readouterr().out
    assert f"missing file {array}/c/1" in out and "DAMAGED" in out


def test_a_flipped_byte_in_a_logits_chunk_fails_its_checksum(proj, capsys):
    f = _file("train/logits")
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0x01
    f.write_bytes(bytes(raw))
    line = _distill(capsys)
    assert str(f) in line and "rows [64, 128) of train/logits" in line and "checksum" in line


def test_a_truncated_shard_file_is_one_line_naming_it(proj, capsys):
    f = _file("train/logits", 2)
    f.write_bytes(f.read_bytes()[:-7])
    line = _distill(capsys)
    assert str(f) in line and "rows [128, 192)" in line and "damaged" in line


def test_evaluate_refuses_a_store_missing_test_rows(proj, capsys):
    from stages import distill

    distill.main(["--teacher", "small", "--loss", "kd"])
    _file("test/logits", 0).unlink()
    line = _one_line_error(capsys, kdcache(["evaluate", "--student", SID]), "kdcache evaluate")
    assert str(_file("test/logits", 0)) in line
    assert not Path(f"metrics/{SID}.json").exists()


def test_rows_of_a_store_rewritten_behind_the_writer_are_caught_by_the_value_rule(proj):
    """A queried row set to NaN (a lost value) and an unqueried flag on a row with logits (flags and values disagree),
    each written through zarr with valid checksums: only the value rule can see them."""
    g = zarr.open_group(str(STORE / "train"), mode="r+")
    block = g["logits"][64:128]
    block[5, 1] = np.nan
    g["logits"][64:128] = block
    with pytest.raises(StoreError, match=r"1 queried sample-view\(s\) hold NaN/Inf in train/logits, rows \[69\]"):
        LogitStore(STORE, "train").read_block(64, 128)
    block[5, 1] = 0.5
    g["logits"][64:128] = block
    q = g["queried"][:]
    q[200, 0] = False
    g["queried"][:] = q
    # A full store's reader takes every row as queried (its recorded calls = N x V) and reads no flags: the row has
    # its logits, so nothing wrong is read; `verify` reads the flags and names the disagreement.
    LogitStore(STORE, "train").read_all()
    report = verify_store(STORE, load_manifest("data/shards/tiny"), progress=False)
    assert not report.ok and any("not marked queried hold logits" in p and "rows [200]" in p for p in report.problems)
    assert any("463 sample-views are marked queried, the store records 464" in p for p in report.problems)
    # A budget store's reader does read the flags, and refuses the disagreement itself.
    g.attrs["teacher_calls"] = 463
    with pytest.raises(StoreError, match=r"1 sample-view\(s\) not marked queried hold logits .* rows \[200\]"):
        LogitStore(STORE, "train").read_all()


def test_a_complete_store_with_a_lost_done_flag_is_damaged(proj):
    (STORE / "train" / "done" / "c" / "2").unlink()
    with pytest.raises(StoreError, match=r"marked complete, but train store shards \[2\] are not marked done"):
        LogitStore(STORE, "train")


def test_every_byte_of_a_shard_file_is_covered_by_a_checksum(proj):
    """Flip each byte of one shard file in turn (chunk bodies, their CRC32C trailers, the shard index and its CRC):
    every single flip is an error naming the file, never other values."""
    f = _file("train/logits", 3)
    good = f.read_bytes()
    store = LogitStore(STORE, "train")  # zarr reads the file again on every read: one reader for every flip
    missed = []
    for pos in range(len(good)):
        raw = bytearray(good)
        raw[pos] ^= 0x40
        f.write_bytes(bytes(raw))
        try:
            store.read_block(192, 232)
        except StoreError as e:
            assert str(f) in str(e)
        else:
            missed.append(pos)
    f.write_bytes(good)
    assert not missed, f"byte positions {missed} of {len(good)} changed without an error"
    LogitStore(STORE, "train").read_block(192, 232)  # the restored file reads again


def test_verify_a_sound_store(proj, capsys):
    assert kdcache(["verify", str(STORE)]) == 0
    out = capsys.readouterr().out
    assert "problem" not in out and out.strip().splitlines()[-1].startswith("ok (")
    assert kdcache(["verify", str(STORE), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    train = next(s for s in r["splits"] if s["split"] == "train")
    assert r["ok"] and r["fingerprints"] == "match the shards" and train["calls"] == 2 * 232 == train["calls_recorded"]
    assert train["files"] == 4 * 2 and 0 <= train["teacher_top1"] <= 1  # logits + queried per shard


def test_verify_names_a_store_of_another_data_set(proj, tmp_path, capsys):
    p = tiny_params()
    p["prepare"]["options"] = {**p["prepare"]["options"], "seed": 1}  # other images, same shapes
    other = make_project(tmp_path / "other", p)
    import os

    cwd = os.getcwd()
    os.chdir(other)
    try:
        prepare.main([])
    finally:
        os.chdir(cwd)
    assert kdcache(["verify", str(STORE), "--shards", str(other / "data/shards/tiny")]) == 2
    out = capsys.readouterr().out
    assert "fingerprints DIFFER" in out and "manifest sha256" in out


def test_a_partial_store_with_a_lost_file_of_a_done_shard_is_repaired_on_resume(tmp_path, tiny_manifest):
    """A resumed teach writes a done shard again when one of its files is gone, and ends byte-identical."""
    from tests.test_faults import RECIPES, _spec

    m = tiny_manifest
    ref, out = tmp_path / "ref.zarr", tmp_path / "t.zarr"
    run_teach(m, linear_teacher(m), ref, _spec(m), RECIPES, batch_size=50)
    run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50, finalize=False)
    (partial_path(out) / "train" / "queried" / "c" / "1" / "0").unlink()
    assert 1 in StoreWriter(out, _spec(m), create=False).pending("train")
    run_teach(m, linear_teacher(m), out, _spec(m), RECIPES, batch_size=50)
    assert_same_files(out, ref)


def test_a_damaged_store_read_in_a_loader_worker_is_the_workers_message(proj, capsys):
    """The loader's worker process meets the damage: the command still prints one line, the worker's message (torch
    re-raises it with the worker's whole traceback inside)."""
    import yaml

    p = yaml.safe_load(Path("params.yaml").read_text())
    p["distill"]["train"]["workers"] = 1
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    f = _file("train/logits")
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01  # the shard index's checksum
    f.write_bytes(bytes(raw))
    line = _distill(capsys)
    assert "DataLoader worker" not in line and "Traceback" not in line and str(f) in line and len(line) < 600


# ---------------------------------------------------------------------------------------------
# the training guard


def _set_lr(lr: float) -> None:
    import yaml

    p = yaml.safe_load(Path("params.yaml").read_text())
    p["distill"]["train"]["optim"] = {**(p["distill"]["train"].get("optim") or {}), "lr": lr}
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def test_a_non_finite_loss_stops_the_run_naming_epoch_step_and_samples(proj, capsys):
    _set_lr(1e30)  # diverges within a few steps
    line = _distill(capsys)
    assert "the loss is not finite at epoch 1, step " in line and "the batch's samples ['000" in line
    assert "no model is written" in line
    assert not Path(f"checkpoints/distill/{SID}/resume.json").exists()  # nothing of the epoch saved


def test_the_guard_names_the_first_bad_step_and_saves_nothing_of_that_epoch(proj):
    """The flag stays on the device during the epoch (no per-step sync) and is read at its end: the error still names
    the first step whose loss was not finite, and that epoch leaves no resume state and no model."""
    from pipeline.training import loop
    from stages import distill

    _set_lr(1e30)
    with pytest.raises(loop.NonFiniteLossError) as err:
        distill.main(["--teacher", "small", "--loss", "kd"])
    step = int(str(err.value).split("step ")[1].split(",")[0])
    assert 1 <= step <= 8  # 232 rows at batch 32: the first epoch's 8 steps, the first bad one named
    assert not Path(f"data/students/{SID}/model.safetensors").exists()
    assert not Path(f"checkpoints/distill/{SID}/resume.json").exists()


# ---------------------------------------------------------------------------------------------
# one writer per output, readers protected

HOLD = """
import sys
from pipeline.lock import exclusive, reading
with (exclusive if sys.argv[1] == "write" else reading)(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
"""


def _hold(mode: str, path: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, mode, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout.readline() == b"held\n"
    return proc


def _release(proc) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)


def test_two_distills_of_one_student_folder_one_is_refused(proj, capsys):
    holder = _hold("write", Path(f"data/students/{SID}"))
    try:
        line = _one_line_error(capsys, kdcache(["distill", "--teacher", "small", "--loss", "kd"]), "kdcache distill")
        assert f"student folder data/students/{SID} is being written by another process: pid {holder.pid}" in line
    finally:
        _release(holder)
    assert kdcache(["distill", "--teacher", "small", "--loss", "kd"]) == 0  # free again


def test_teach_force_on_a_store_being_read_is_refused_and_the_store_kept(proj, capsys):
    from tests.conftest import file_digests

    before = file_digests(STORE)
    reader = _hold("read", STORE)  # what a running distill or evaluate holds
    try:
        line = _one_line_error(capsys, kdcache(["teach", "--name", "small", "--force"]), "kdcache teach")
        assert "is in use: another process is reading it" in line and f"{STORE}.readers" in line
    finally:
        _release(reader)
    assert file_digests(STORE) == before  # not a byte touched
    writer = _hold("write", STORE)  # and a reader never starts on a store being rewritten
    try:
        line = _distill(capsys)
        assert line.startswith(f"kdcache distill: error: logit store {STORE} is being written by another process")
    finally:
        _release(writer)


def test_a_full_disk_while_saving_the_epoch_state_is_one_line(proj, capsys, monkeypatch):
    """ENOSPC from the file system (here: at fsync, where delayed allocation reports it) while distill writes its
    resume state: one line, exit 2, no model; the next run starts clean."""
    import errno
    import os

    from pipeline.models import checkpoint

    real = os.fsync

    def full(fd: int) -> None:
        if "resume" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    line = _distill(capsys)
    assert line == "kdcache distill: error: No space left on device"
    monkeypatch.setattr(checkpoint.os, "fsync", real)
    assert not [p for p in Path("checkpoints").rglob("*.tmp")]  # no half-written file left behind
    assert kdcache(["distill", "--teacher", "small", "--loss", "kd"]) == 0
