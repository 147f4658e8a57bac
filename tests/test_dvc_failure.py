"""What a failed stage does to its git-kept metrics, on the installed DVC: README "When something goes wrong" says it.

DVC deletes a stage's outputs before running it, `cache: false` ones (metrics, plots, reports kept in git) included,
so a failed run leaves ` D metrics/...` in `git status` (issue 32). kdcache keeps DVC's behaviour rather than mark
those outputs `persist: true`: persistent outputs would survive the failure, but DVC never restores a stage with a
persistent output from its run-cache, so every `dvc exp run` back to settings already run would recompute (retrain)
instead of restoring. The files come back with `git checkout`, or by undoing the change and `dvc repro`, which
restores them from the run-cache without running anything. A toy pipeline checks each claim.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline_e2e import _dvc

STEP = """\
import json, sys
import yaml
x = yaml.safe_load(open("params.yaml"))["x"]
if x == "fail":
    sys.exit("a stage that fails")
json.dump({"x": x}, open(sys.argv[1], "w"))
"""

DVC_YAML = {
    "stages": {
        # as kdcache's metrics: kept in git, deleted by DVC before the stage runs
        "plain": {
            "cmd": "python step.py m.json",
            "deps": ["step.py"],
            "params": ["x"],
            "metrics": [{"m.json": {"cache": False}}],
        },
        # the alternative kdcache does not take
        "kept": {
            "cmd": "python step.py k.json",
            "deps": ["step.py"],
            "params": ["x"],
            "metrics": [{"k.json": {"cache": False, "persist": True}}],
        },
    }
}


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    return subprocess.run([*git, *args], cwd=cwd, capture_output=True, text=True, check=True)


def _set_x(proj: Path, x: object) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump({"x": x}))


def _x(path: Path) -> object:
    return json.loads(path.read_text())["x"]


@pytest.mark.slow
def test_a_failed_stage_removes_its_git_kept_metrics_and_how_they_come_back(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "step.py").write_text(STEP)
    (proj / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    _set_x(proj, 1)
    _git(proj, "init", "-q")
    assert _dvc(proj, "init", "-q").returncode == 0
    assert _dvc(proj, "repro", "-q").returncode == 0
    _git(proj, "add", "-A")
    _git(proj, "commit", "-qm", "a good run")

    # a change that makes both stages fail: DVC removed the plain stage's metrics before running it
    _set_x(proj, "fail")
    res = _dvc(proj, "repro", "--keep-going")
    assert res.returncode != 0 and "a stage that fails" in res.stdout + res.stderr
    assert not (proj / "m.json").exists() and "D m.json" in _git(proj, "status", "--short").stdout
    assert _x(proj / "k.json") == 1  # persist: true would keep it ...

    # back: git checkout gives the committed file; or undo the change and `dvc repro` restores from the run-cache
    _git(proj, "checkout", "--", "m.json")
    assert _x(proj / "m.json") == 1
    (proj / "m.json").unlink()
    _set_x(proj, 1)
    res = _dvc(proj, "repro")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Stage 'plain' is cached - skipping run" in res.stdout and _x(proj / "m.json") == 1

    # ... but a stage with a persistent output is never restored from the run-cache: back to settings already run,
    # the plain stage is restored, the persistent one runs again (a kdcache student would retrain)
    _set_x(proj, 2)
    assert _dvc(proj, "repro", "-q").returncode == 0
    _set_x(proj, 1)
    res = _dvc(proj, "repro")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Stage 'plain' is cached - skipping run" in res.stdout
    assert "Running stage 'kept'" in res.stdout and "Stage 'kept' is cached" not in res.stdout
