"""The committed dvc.lock matches the committed code and params (`scripts/check_lock.py`, also run by .ci/run).

The real check clones HEAD (what a new user gets) and asks DVC: any code or params dependency, command or
git-kept output that differs from dvc.lock fails it; the DVC-cached data a fresh clone lacks does not.
When it fails: `dvc repro`, then commit dvc.lock with the outputs.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)

OUTS = {"data/shards/ds", "data/teachers/t.pt", "metrics/s.json", "metrics/details/s.json", "reports"}
GIT_OUTS = {"metrics/s.json", "metrics/details/s.json", "reports"}


def test_absent_data_is_expected_but_code_params_and_git_outputs_are_not():
    fresh_clone = {
        "prepare": [{"changed outs": {"data/shards/ds": "not in cache"}}],
        "train": [{"changed deps": {"data/shards/ds": "deleted"}}, {"changed outs": {"data/teachers/t.pt": "deleted"}}],
        "report": [{"changed deps": {"metrics/details": "deleted", "data/shards/ds/manifest.json": "deleted"}}],
        "always": ["always changed"],
    }
    assert check_lock.lock_problems(fresh_clone, OUTS, GIT_OUTS) == []
    stale = {
        "train": [{"changed deps": {"data/shards/ds": "deleted", "pipeline/training": "modified"}}],
        "evaluate": [
            {"changed deps": {"params.yaml": {"evaluate.topk": "modified"}, "stages/evaluate.py": "new"}},
            {"changed outs": {"metrics/s.json": "modified", "data/teachers/t.pt": "not in cache"}},
        ],
        "report": ["changed command"],
    }
    assert check_lock.lock_problems(stale, OUTS, GIT_OUTS) == [
        "evaluate: param evaluate.topk modified (params.yaml)",
        "evaluate: code dependency stages/evaluate.py new",
        "evaluate: output kept in git metrics/s.json modified",
        "report: changed command",
        "train: code dependency pipeline/training modified",
    ]


def test_a_stage_the_lock_never_saw_is_one_problem():
    status = {
        "new": [{"changed deps": {"stages/new.py": "modified", "params.yaml": "new"}}, {"changed outs": {"x": "new"}}],
        "report": [{"changed deps": {"stages/report.py": "modified"}}],
    }
    assert check_lock.lock_problems(status, OUTS, GIT_OUTS, locked={"report"}) == [
        "new: not in dvc.lock (a new stage, never run)",
        "report: code dependency stages/report.py modified",
    ]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_committed_lock_matches_committed_code_and_params(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=120)
    problems = check_lock.check(clone)
    assert not problems, (
        "dvc.lock is stale: `dvc repro`, then commit dvc.lock and the outputs it rewrote:\n" + "\n".join(problems[:40])
    )
