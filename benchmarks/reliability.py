"""Reliability probes: the integrity issue's hostile-tester table, rerun on the current code (BENCHMARKS.md).

    python -m benchmarks.reliability [--keep DIR]

Builds one tiny synthetic project (512 images of 16x16, 4 classes; a cnn_tiny teacher, its store and a kd
student, through the real stages), then runs every probe on a fresh copy of it, as a user would at the command
line (`python -m stages.<name>`, `kdcache ...`, `dvc repro`), and prints one markdown row per probe: what was
done, the exit code and the last line the command printed, and what was checked afterwards (a model written?
a file touched? a process alive?). Takes ~4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SID = "small-kd-full-0"
STORE = Path("data/logits/small.zarr")
PY = sys.executable
ENV = {
    **os.environ,
    "KDCACHE_LOG": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "PATH": f"{Path(PY).parent}:{os.environ['PATH']}",
}

PARAMS = {
    "runtime": {"reproducible": True},
    "prepare": {
        "name": "tiny", "source": "synthetic", "root": "unused", "shard_size": 64, "splits": ["train", "test"],
        "options": {"n": 512, "size": 16, "channels": 1, "num_classes": 4, "seed": 0}, "limit": None,
        "shuffle_seed": 0,
    },
    "teachers": {"small": {"arch": "cnn_tiny", "epochs": 4, "lr": 0.1, "batch_size": 32}},
    "ensembles": {},
    "query": {},
    "train_teacher": {"train": {"workers": 0, "shuffle_buffer": 64, "seed": 0, "threads": 1}},
    "teach": {
        "views": 2, "test_views": 1, "view_seed": 0, "augment": {"pad": 2, "flip": True}, "dtype": "float16",
        "batch_size": 64, "chunk_rows": 32, "compressor": "blosc-zstd", "topk": 0, "budget": None,
        "strategy": "random", "budget_seed": 0, "threads": 1, "cluster": "none", "workers": 2,
    },
    "distill": {
        "teachers": ["small"], "losses": ["kd"], "budgets": ["full"], "seeds": [0], "student": "cnn_tiny",
        "student_preprocess": "data", "unqueried": "drop", "pool_epoch_samples": None, "teacher_source": "cache",
        "train": {"epochs": 3, "batch_size": 32, "workers": 0, "shuffle_buffer": 64, "threads": 1},
        "loss_params": {"kd": {"T": 4.0, "a": 0.1, "b": 0.9}, "ce": {}},
    },
    "corrupt": {"corruptions": ["gaussian_noise"], "severities": [1], "seed": 0, "limit": 32},
    "evaluate": {"batch_size": 128, "topk": [1, 2]},
    "report": {"title": None},
}  # fmt: skip


def sh(cwd: Path, *cmd: str, timeout: int = 600) -> tuple[int, str]:
    """Run a command in `cwd`; (exit code, its last non-empty stderr/stdout line)."""
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ": error:" in ln), lines[-1] if lines else "").strip()
    last = last.replace("`", "'")  # the row puts it in a code span
    return res.returncode, last if len(last) <= 240 else last[:240] + "…"


def stage(cwd: Path, name: str, *args: str) -> tuple[int, str]:
    return sh(cwd, PY, "-m", f"stages.{name}", *args)


def kdcache(cwd: Path, *args: str) -> tuple[int, str]:
    return sh(cwd, PY, "-m", "pipeline.cli", *args)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def set_params(cwd: Path, edit: Callable[[dict], None]) -> None:
    p = yaml.safe_load((cwd / "params.yaml").read_text())
    edit(p)
    (cwd / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def shard(array: str, j: int = 1) -> Path:
    return STORE / array / "c" / str(j) / ("0/0" if array.endswith("logits") else "0")


def model_written(cwd: Path) -> str:
    return "model written" if (cwd / f"data/students/{SID}/model.safetensors").exists() else "no model written"


def build(base: Path) -> None:
    base.mkdir(parents=True)
    for code in ("pipeline", "stages", "weights"):
        shutil.copytree(ROOT / code, base / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", base / "dvc.yaml")
    (base / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    for cmd in (("prepare",), ("train_teacher", "--name", "small"), ("teach", "--name", "small"), ("corrupt",)):
        code, line = stage(base, *cmd)
        assert code == 0, (cmd, line)
    code, line = stage(base, "distill", "--teacher", "small", "--loss", "kd")
    assert code == 0, line


# ---------------------------------------------------------------------------------------------
# the probes: each gets a fresh copy of the project and returns (what happened, checked afterwards)


def p_delete_logits(cwd: Path) -> str:
    (cwd / shard("train/logits")).unlink()
    code_i, line_i = kdcache(cwd, "inspect", str(STORE))
    shutil.rmtree(cwd / f"data/students/{SID}")
    code_d, line_d = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    return f"inspect: exit {code_i}; distill: exit {code_d}, `{line_d}`; {model_written(cwd)}"


def p_delete_queried(cwd: Path) -> str:
    (cwd / shard("train/queried")).unlink()
    shutil.rmtree(cwd / f"data/students/{SID}")
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    return f"distill: exit {code}, `{line}`; {model_written(cwd)}"


def p_flip_byte(cwd: Path) -> str:
    f = cwd / shard("train/logits")
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0x01
    f.write_bytes(bytes(raw))
    code_i, _ = kdcache(cwd, "inspect", str(STORE))
    code_v, _ = kdcache(cwd, "verify", str(STORE))
    shutil.rmtree(cwd / f"data/students/{SID}")
    code_d, line_d = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    return f"inspect: exit {code_i}; verify: exit {code_v}; distill: exit {code_d}, `{line_d}`; {model_written(cwd)}"


def p_truncate(cwd: Path) -> str:
    f = cwd / shard("train/logits", 2)
    f.write_bytes(f.read_bytes()[:-7])
    shutil.rmtree(cwd / f"data/students/{SID}")
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    return f"distill: exit {code}, `{line}`; {model_written(cwd)}"


def p_delete_test_then_evaluate(cwd: Path) -> str:
    (cwd / shard("test/logits", 0)).unlink()
    code, line = stage(cwd, "evaluate", "--student", SID)
    written = (cwd / f"metrics/{SID}.json").exists()
    return f"evaluate: exit {code}, `{line}`; metrics written: {written}"


def p_import_reversed(cwd: Path) -> str:
    code = "from pipeline.cache.store import LogitStore; import numpy as np, sys\n"
    code += "for s in ('train', 'test'):\n"
    code += "    np.save(f'{s}.npy', LogitStore('data/logits/small.zarr', s).read_all()[:, 0, ::-1].copy())\n"
    subprocess.run([PY, "-c", code], cwd=cwd, env=ENV, check=True)
    rc, line = kdcache(
        cwd, "import-logits", "--shards", "data/shards/tiny", "--name", "api",
        "--logits", "train=train.npy", "--logits", "test=test.npy",
    )  # fmt: skip
    return f"import-logits: exit {rc}, `{line}`; store written: {(cwd / 'data/logits/api.zarr').exists()}"


class _Planted:
    def __reduce__(self):  # what a crafted pickle would run on load
        return (Path("PWNED").touch, ())


def p_crafted_state(cwd: Path) -> str:
    state = cwd / "checkpoints" / "distill" / SID
    state.mkdir(parents=True)
    (state / "resume.json").write_bytes(pickle.dumps(_Planted()))
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd", "--resume")
    return f"distill --resume: exit {code}, `{line}`; code ran: {(cwd / 'PWNED').exists()}"


def _killed_after_epoch_1(cwd: Path, state: Path, *args: str) -> None:
    """Start `python -m stages.distill ARGS`, SIGKILL it once `state` holds a resume state."""
    proc = subprocess.Popen([PY, "-m", "stages.distill", *args], cwd=cwd, env=ENV, stderr=subprocess.DEVNULL)
    while not (state / "resume.json").exists():
        assert proc.poll() is None, "distill ended before its first epoch state"
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def p_resume_other_run(cwd: Path) -> str:
    set_params(cwd, lambda p: p["distill"]["train"].update({"epochs": 30}))
    _killed_after_epoch_1(cwd, cwd / "x" / "resume", "--teacher", "small", "--loss", "kd", "--out-dir", "x")
    set_params(cwd, lambda p: p["distill"]["train"].setdefault("optim", {}).update({"lr": 0.2}))
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "ce", "--out-dir", "x", "--resume")
    return f"distill --loss ce --resume (lr 0.2): exit {code}, `{line}`"


def p_disk_full(cwd: Path) -> str:
    folder = cwd / "checkpoints"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        return "skipped: mounting a 64 KB tmpfs needs root here"
    try:
        shutil.rmtree(cwd / f"data/students/{SID}")
        code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
        return f"distill, its resume state on a full 64 KB file system: exit {code}, `{line}`; {model_written(cwd)}"
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def p_truncated_parquet(cwd: Path) -> str:
    (cwd / "t.parquet").write_bytes(b"PAR1" + bytes(100))
    code, line = kdcache(
        cwd, "import-logits", "--shards", "data/shards/tiny", "--name", "p", "--logits", "train=t.parquet",
        "--without-test",
    )  # fmt: skip
    return f"import-logits: exit {code}, `{line}`"


def p_worker_error(cwd: Path) -> str:
    set_params(cwd, lambda p: p["distill"]["train"].update({"workers": 1}))
    f = cwd / shard("train/logits")
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    shutil.rmtree(cwd / f"data/students/{SID}")
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    return f"distill (damage met in a loader worker): exit {code}, `{line}` ({len(line)} characters)"


def p_sigkill_orphans(cwd: Path) -> str:
    import psutil

    set_params(cwd, lambda p: p["distill"]["train"].update({"workers": 1, "epochs": 50}))
    proc = subprocess.Popen([PY, "-m", "stages.distill", "--teacher", "small", "--loss", "kd", "--restart"], cwd=cwd,
                            env=ENV, stderr=subprocess.DEVNULL)  # fmt: skip
    main = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    while len(seen) < 3:  # the tracker, the forkserver and a loader worker (each epoch starts new workers)
        seen.update({c.pid: c for c in main.children(recursive=True)})
        time.sleep(0.05)
    children = [c for c in main.children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(10)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    started = f"{len(children)} processes of its own at the kill (resource tracker, forkserver, loader worker)"
    return f"{started}; alive 10 s later: {len(alive)}"


def p_two_distills(cwd: Path) -> str:
    set_params(cwd, lambda p: p["distill"]["train"].update({"epochs": 50}))
    first = subprocess.Popen([PY, "-m", "stages.distill", "--teacher", "small", "--loss", "kd", "--restart"],
                             cwd=cwd, env=ENV, stderr=subprocess.DEVNULL)  # fmt: skip
    while not (cwd / f"data/students/{SID}.lock").exists():
        time.sleep(0.05)
    code, line = stage(cwd, "distill", "--teacher", "small", "--loss", "kd")
    first.kill()
    first.wait()
    return f"second distill: exit {code}, `{line}`"


def p_teach_force_while_read(cwd: Path) -> str:
    set_params(cwd, lambda p: p["distill"]["train"].update({"epochs": 50}))
    before = digest(cwd / STORE)
    reader = subprocess.Popen([PY, "-m", "stages.distill", "--teacher", "small", "--loss", "kd", "--restart"],
                              cwd=cwd, env=ENV, stderr=subprocess.DEVNULL)  # fmt: skip
    while not (cwd / f"data/students/{SID}.lock").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    code, line = stage(cwd, "teach", "--name", "small", "--force")
    reader.kill()
    reader.wait()
    return f"teach --force: exit {code}, `{line}`; store unchanged: {digest(cwd / STORE) == before}"


def p_dvc_repro_kill(cwd: Path) -> str:
    ref = digest(cwd / f"data/students/{SID}/model.safetensors")  # the uninterrupted run of the same params
    for built in ("data", "metrics", "plots", "logs"):
        shutil.rmtree(cwd / built, ignore_errors=True)
    assert sh(cwd, "dvc", "init", "--no-scm", "-q")[0] == 0
    state = cwd / "checkpoints" / "distill" / SID
    proc = subprocess.Popen(["dvc", "repro", f"distill@{SID}"], cwd=cwd, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not (state / "resume.json").exists():
        assert proc.poll() is None, "dvc repro ended before the student's first epoch state"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch = json.loads((state / "resume.json").read_text())["epoch"] + 1
    code, _ = sh(cwd, "dvc", "repro", f"distill@{SID}")
    same = digest(cwd / f"data/students/{SID}/model.safetensors") == ref
    return f"killed after epoch {epoch} of 3; next `dvc repro`: exit {code}, continued, model identical: {same}"


PROBES: list[tuple[str, str, Callable[[Path], str]]] = [
    ("delete one `train/logits` shard file of a finished store", "inspect, distill", p_delete_logits),
    ("delete one `train/queried` file", "distill", p_delete_queried),
    ("flip one byte inside a logits shard file", "inspect, verify, distill", p_flip_byte),
    ("truncate a logits shard file", "distill", p_truncate),
    ("delete one `test/logits` file, then `evaluate`", "evaluate", p_delete_test_then_evaluate),
    ("`kdcache import-logits` with the class order reversed", "import-logits", p_import_reversed),
    ("a crafted pickle as the resume state, then `distill --resume`", "distill --resume", p_crafted_state),
    ("`--resume` from a kd run with `--loss ce` and another lr", "distill --resume", p_resume_other_run),
    ("disk full while distill saves its epoch state", "distill", p_disk_full),
    ("truncated Parquet import", "import-logits", p_truncated_parquet),
    ("an error inside a loader worker", "distill", p_worker_error),
    ("SIGKILL a distill (one loader worker)", "distill", p_sigkill_orphans),
    ("two distills writing one student folder", "distill x2", p_two_distills),
    ("`teach --force` while a distill reads the store", "teach --force", p_teach_force_while_read),
    ("kill a distill under `dvc repro`", "dvc repro", p_dvc_repro_kill),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="build the projects here and keep them (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=None, help="probe numbers to run (1-based; default: all)")
    args = ap.parse_args(argv)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kdcache-reliability-"))
    base = tmp / "base"
    if not base.exists():
        build(base)
    print("| # | what was done | what happens now |\n|---|---|---|")
    for k, (what, _, probe) in enumerate(PROBES, 1):
        if args.only and str(k) not in args.only:
            continue
        cwd = tmp / f"probe-{k}"
        shutil.rmtree(cwd, ignore_errors=True)
        shutil.copytree(base, cwd)
        t0 = time.perf_counter()
        try:
            result = probe(cwd)
        except Exception as e:  # a probe that breaks is a result too
            result = f"PROBE FAILED: {type(e).__name__}: {e}"
        print(f"| {k} | {what} | {result.replace('|', '/')} ({time.perf_counter() - t0:.0f} s) |", flush=True)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
