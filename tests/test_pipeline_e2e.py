"""End to end: every stage on a tiny synthetic data set, then DVC's view of what a change reruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.cache.store import LogitStore
from pipeline.config import ConfigError
from pipeline.layout import Layout
from stages import corrupt, distill, evaluate, prepare, report, teach, train_teacher
from tests.conftest import make_project, tiny_params

ALL_LOSSES = ["ce", "kd", "dkd", "dist", "cmkd", "ckd"]
TINY_TEACHER = {"arch": "cnn_tiny", "epochs": 1, "lr": 0.1, "batch_size": 32}


def test_every_stage_on_tiny_data(tmp_path, monkeypatch):
    params = tiny_params(distill={"losses": ALL_LOSSES})
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    manifest = json.loads(Path("data/shards/tiny/manifest.json").read_text())
    assert manifest["splits"]["train"]["n"] == 256 and len(manifest["splits"]["train"]["shards"]) == 4
    train_teacher.main(["--name", "small"])
    t = json.loads(Path("data/teachers/small.json").read_text())
    assert t["test_top1"] > 0.5  # 4 learnable classes: well above chance (0.25) after one epoch
    teach.main(["--name", "small"])
    store = LogitStore("data/logits/small.zarr", "train")
    assert store.views == 2 and np.isfinite(store.read_all()).all()
    corrupt.main([])
    for loss in ALL_LOSSES:
        distill.main(["--teacher", "small", "--loss", loss])
        sid = f"small-{loss}-full-0"
        evaluate.main(["--student", sid])
        m = json.loads(Path(f"metrics/{sid}.json").read_text())
        assert 0.0 <= m["top1"] <= 1.0 and m["top1"] <= m["top2"]
        assert m["teacher_calls"] == 512 and 0 <= m["agreement"] <= 1
        assert -1 <= m["spearman"] <= 1 and len(m["reliability"]["student"]["count"]) == 15
        assert 0 <= m["corrupt_mean"] <= 1 and len(m["corrupt_severity"]["jpeg"]) == 5
        assert len(Path(f"plots/confusion/{sid}.csv").read_text().splitlines()) == 1 + 256
        assert m["teacher_top1"] == pytest.approx(t["test_top1"], abs=0.02)  # fp16 cache vs fp32 eval
        curves = json.loads(Path(f"plots/curves/{sid}.json").read_text())
        assert curves[-1]["epoch"] == 1 and "test_acc" in curves[-1] and np.isfinite(curves[-1]["train_loss"])
    report.main([])
    md = Path("reports/report.md").read_text()
    for loss in ALL_LOSSES:
        assert f"| small | {loss} |" in md
    with Image.open("reports/accuracy.png") as im:
        assert im.size[0] > 100 and im.format == "PNG"


def test_evaluate_compares_a_student_with_the_store_it_was_trained_on(tmp_path, monkeypatch):
    """A student trained with --store on another teacher's cache is evaluated against that cache, not the default
    store of its --teacher name (which would be a silently wrong agreement); a store of another teacher is refused."""
    from pipeline.evaluation.metrics import expected_calibration_error
    from pipeline.models import save_model
    from tests.conftest import linear_teacher

    make_project(tmp_path, tiny_params(teachers={"small": TINY_TEACHER, "other": TINY_TEACHER}))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    manifest = json.loads(Path("data/shards/tiny/manifest.json").read_text())
    assert manifest["splits"]["train"]["n"] == 256
    from pipeline.data.shards import load_manifest

    m = load_manifest("data/shards/tiny")
    for name, seed in (("small", 0), ("other", 1)):  # two different (untrained) teachers
        save_model(Layout("tiny").teacher_checkpoint(name), linear_teacher(m, seed=seed), "cnn_tiny")
        teach.main(["--name", name])
    distill.main(["--teacher", "small", "--loss", "kd", "--store", "data/logits/other.zarr"])
    evaluate.main(["--student", "small-kd-full-0"])
    got = json.loads(Path("metrics/small-kd-full-0.json").read_text())
    other = LogitStore("data/logits/other.zarr", "test").read_all()[:, 0]
    small = LogitStore("data/logits/small.zarr", "test").read_all()[:, 0]
    labels = m.iter_labels("test")
    assert got["teacher_top1"] == pytest.approx(float((other.argmax(1) == labels).mean()))
    # ECE is continuous: the two untrained teachers' values differ, so this tells which cache was used.
    assert got["teacher_ece"] == pytest.approx(expected_calibration_error(other, labels))
    assert got["teacher_ece"] != pytest.approx(expected_calibration_error(small, labels))
    with pytest.raises(ConfigError, match=r"trained on the logits of teacher .*other.* holds teacher .*small"):
        evaluate.main(["--student", "small-kd-full-0", "--store", "data/logits/small.zarr"])


def test_distill_errors_name_the_fix(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        distill.main(["--teacher", "small", "--loss", "kd"])
    prepare.main([])
    with pytest.raises(ValueError, match=r"no logit store.*teach"):
        distill.main(["--teacher", "small", "--loss", "kd"])
    with pytest.raises(ConfigError, match="no parameters for loss 'kdd'"):
        distill.main(["--teacher", "small", "--loss", "kdd"])


def test_unknown_teacher_lists_valid_ones(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown teacher 'nope'.*\['small'\]"):
        train_teacher.main(["--name", "nope"])


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    dvc = shutil.which("dvc", path=env["PATH"])
    return subprocess.run([dvc, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _stale(cwd: Path) -> set[str]:
    res = _dvc(cwd, "status", "--json")
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout or "{}"))


@pytest.mark.slow
def test_dvc_reruns_only_what_a_change_touches(tmp_path):
    """`dvc repro` a tiny pipeline, then check which stages each kind of edit makes stale."""
    # Two budgets: the full cache and a 40-call budget (queried pool), as a `dvc exp run -S` sweep would.
    proj = make_project(tmp_path / "proj", tiny_params(distill={"budgets": ["full", 40], "pool_epoch_samples": 64}))
    res = _dvc(proj, "init", "--no-scm", "-q")
    assert res.returncode == 0, res.stderr
    res = _dvc(proj, "repro", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    assert Path(proj / "reports/report.md").exists()
    assert _stale(proj) == set()

    # 1. A new teacher: only its own train_teacher/teach/distill/evaluate stages (and the report) are stale.
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["teachers"]["big"] = {"arch": "cnn_small", "epochs": 1, "lr": 0.05, "batch_size": 32}
    p["distill"]["teachers"] = ["small", "big"]
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    stale = _stale(proj)
    students = {f"{t}@big-{loss}-{b}-0" for t in ("distill", "evaluate") for loss in ("ce", "kd") for b in ("full", 40)}
    # The report tracks the distill matrix (it reports exactly those students), so it reruns too.
    assert stale == {"train_teacher@big", "teach@big", "report"} | students, stale
    p["teachers"].pop("big")
    p["distill"]["teachers"] = ["small"]

    # 2. One loss's parameter: only that loss's students.
    p["distill"]["loss_params"]["kd"]["T"] = 2.0
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert _stale(proj) == {"distill@small-kd-full-0", "distill@small-kd-40-0"}
    p["distill"]["loss_params"]["kd"]["T"] = 4.0
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert _stale(proj) == set()
    # 3. How teach runs (threads, dask cluster) is not what it makes: nothing reruns.
    p["teach"]["threads"], p["teach"]["cluster"] = 2, "local"
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert _stale(proj) == set()


def test_teach_deps_exclude_student_code():
    """Editing the student side (losses, training, evaluation) must never rerun a teacher stage, and the teach
    stage's code imports none of it (so its file-level dep list is complete)."""
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    teach_deps = stages["teach"]["do"]["deps"]
    student_side = ("pipeline/losses", "pipeline/training", "pipeline/evaluation", "stages/distill.py")
    for dep in teach_deps:
        assert not dep.startswith(student_side), dep
    imported = _pipeline_imports(root, "stages.teach", set())
    assert not {m for m in imported if m.replace(".", "/").startswith(student_side)}, imported
    assert torch.__version__  # torch importable in the test env


def _pipeline_imports(root: Path, module: str, seen: set[str]) -> set[str]:
    """Transitive closure of the project modules (pipeline.*, stages.*) that `module` imports."""
    import ast

    if module in seen:
        return seen
    seen.add(module)
    if module in PLUMBING:  # wiring only (see PLUMBING): what it imports lazily is not what a stage computes
        return seen
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"

    def exists(m: str) -> bool:
        return (root / (m.replace(".", "/") + ".py")).exists() or (root / m.replace(".", "/")).is_dir()

    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` blocks never run
        id(x)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
        for b in n.body
        for x in ast.walk(b)
    }
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        names: list[str] = []
        if isinstance(n, ast.ImportFrom) and n.module:
            base = n.module
            if n.level:  # relative import inside a package (pipeline.losses)
                pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                for _ in range(n.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{n.module}"
            subs = [f"{base}.{a.name}" for a in n.names if exists(f"{base}.{a.name}")]
            # `from pkg import submodule` runs that submodule; `from pkg import name` runs pkg/__init__.py.
            names = subs if len(subs) == len(n.names) else [base, *subs]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        for m in names:
            if m.split(".")[0] in ("pipeline", "stages") and exists(m):
                _pipeline_imports(root, m, seen)
    return seen


# Modules that never change what a stage computes: params are tracked as params; device/logging set-up, artifact
# paths (dvc.yaml spells them in outs), stage wiring and the packages' lazy export tables do not change results.
PLUMBING = {
    "pipeline.config",
    "pipeline.runtime",
    "pipeline.layout",
    "pipeline.stage",
    "pipeline._lazy",
    "pipeline.data",
    "pipeline.cache",
    "pipeline.training",
    "pipeline.evaluation",
}


def test_stage_deps_cover_the_code_each_stage_imports():
    """Every project module a stage's command imports (transitively) is one of its DVC deps, so editing it reruns
    the stage (PLUMBING excepted)."""
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    exempt = {"pipeline", "stages", *PLUMBING}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("-m", 1)[1].split()[0]  # python -m stages.<name> ...
        deps = [d for d in body["deps"] if d.startswith(("pipeline", "stages"))]
        for m in sorted(_pipeline_imports(root, module, set()) - exempt):
            file = m.replace(".", "/") + ".py"
            covered = any(file == d or file.startswith(d.rstrip("/") + "/") or m.replace(".", "/") == d for d in deps)
            assert covered, f"stage {name}: imports {m} but {file} is not in its dvc.yaml deps"


def test_teach_params_are_what_shapes_the_store():
    """teach's DVC params: every TeachConfig field except how it runs (threads, cluster, workers)."""
    import dataclasses

    from pipeline.config import TeachConfig

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["teach"]["do"]["params"]
    want = {f"teach.{f.name}" for f in dataclasses.fields(TeachConfig)} - {
        "teach.threads",
        "teach.cluster",
        "teach.workers",
    }
    assert set(params) == want
