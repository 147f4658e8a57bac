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
from pipeline.records import read_record
from stages import corrupt, distill, evaluate, prepare, report, teach, train_teacher
from tests.conftest import TINY_PARAMS, make_project, tiny_params

ALL_LOSSES = ["ce", "kd", "dkd", "dist", "cmkd", "ckd"]
TINY_TEACHER = {"arch": "cnn_tiny", "epochs": 1, "lr": 0.1, "batch_size": 32}


def test_every_stage_on_tiny_data(tmp_path, monkeypatch):
    params = tiny_params(distill={"losses": ALL_LOSSES})
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    manifest = json.loads(Path("data/shards/tiny/manifest.json").read_text())
    # prepare.val = 0.1 (the default): a stratified 10% of train is the validation split
    assert manifest["splits"]["train"]["n"] + manifest["splits"]["val"]["n"] == 256
    assert (
        manifest["splits"]["val"]["n"] == pytest.approx(26, abs=2) and len(manifest["splits"]["train"]["shards"]) == 4
    )
    train_teacher.main(["--name", "small"])
    t = json.loads(Path("metrics/teachers/small.json").read_text())  # the summary, in git like the students'
    assert t["accuracy"] > 0.5  # 4 learnable classes: well above chance (0.25) after one epoch
    assert read_record("metrics/teachers/details/small.json", "teacher")["accuracy"] == t["accuracy"]
    teach.main(["--name", "small"])
    store = LogitStore("data/logits/small.zarr", "train")
    assert store.views == 2 and np.isfinite(store.read_all()).all()
    corrupt.main([])
    for loss in ALL_LOSSES:
        distill.main(["--teacher", "small", "--loss", loss])
        sid = f"small-{loss}-full-0"
        evaluate.main(["--student", sid])
        summary = json.loads(Path(f"metrics/{sid}.json").read_text())
        assert list(summary) == [
            "accuracy",
            "agreement",
            "ece",
            "mca",
            "teacher_calls",
            "val_accuracy",
        ]  # what dvc metrics show lists
        m = read_record(f"metrics/details/{sid}.json", "student")
        assert {k: m[k] for k in summary} == summary  # the summary is a projection of the details
        assert 0.0 <= m["accuracy"] <= 1.0 and m["accuracy"] <= m["test"]["top2"]
        assert m["teacher_calls"] == 2 * manifest["splits"]["train"]["n"] and 0 <= m["agreement"] <= 1
        assert (
            m["student"]["schedule"]["steps"] >= 1
            and 0 <= m["val_accuracy"] <= 1
            and m["student"]["selected_epoch"] == 1
        )
        assert -1 <= m["teacher"]["spearman"] <= 1 and len(m["test"]["reliability"]["count"]) == 15
        assert 0 <= m["mca"] <= 1 and len(m["robustness"]["per_severity"]["jpeg"]) == 5
        assert m["student"]["loss"] == loss and m["data"]["dataset"] == "tiny"
        assert len(Path(f"plots/confusion/{sid}.csv").read_text().splitlines()) == 1 + manifest["splits"]["test"]["n"]
        curves = json.loads(Path(f"plots/curves/{sid}.json").read_text())
        assert curves[-1]["epoch"] == 1 and "val_acc" in curves[-1] and np.isfinite(curves[-1]["train_loss"])
    report.main([])
    md = Path("reports/report.md").read_text()
    assert md.startswith("# kdcache on tiny\n")  # from the manifest, not a fixed string
    n = manifest["splits"]
    assert f"4 classes, 16x16 images with 1 channel(s); train {n['train']['n']} / val {n['val']['n']} / test 256" in md
    for loss in ALL_LOSSES:
        assert f"| small | {loss} |" in md
    assert f"small ({100 * t['accuracy']:.2f})" in md  # the teacher's one accuracy
    with Image.open("reports/accuracy.png") as im:
        assert im.size[0] > 100 and im.format == "PNG"
    assert "data:image/png;base64," in Path("reports/report.html").read_text()  # opens offline
    assert len(json.loads(Path("reports/plots/curves.json").read_text())) == len(ALL_LOSSES)  # 1 epoch each


def test_evaluate_compares_a_student_with_the_store_it_was_trained_on(tmp_path, monkeypatch):
    """A student trained with --store on another teacher's cache is evaluated against that cache, not the default
    store of its --teacher name (which would be a silently wrong agreement); a store of another teacher is refused."""
    from pipeline.evaluation.metrics import expected_calibration_error
    from pipeline.models import save_model
    from tests.conftest import linear_teacher

    make_project(tmp_path, tiny_params(teachers={"small": TINY_TEACHER, "other": TINY_TEACHER}))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    from pipeline.data.shards import load_manifest

    m = load_manifest("data/shards/tiny")
    for name, seed in (("small", 0), ("other", 1)):  # two different (untrained) teachers
        save_model(Layout("tiny").teacher_checkpoint(name), linear_teacher(m, seed=seed), "cnn_tiny")
        teach.main(["--name", name])
    distill.main(["--teacher", "small", "--loss", "kd", "--store", "data/logits/other.zarr"])
    evaluate.main(["--student", "small-kd-full-0"])
    got = read_record("metrics/details/small-kd-full-0.json", "student")
    other = LogitStore("data/logits/other.zarr", "test").read_all()[:, 0]
    small = LogitStore("data/logits/small.zarr", "test").read_all()[:, 0]
    labels = m.iter_labels("test")
    # ECE is continuous: the two untrained teachers' values differ, so this tells which cache was used.
    assert got["teacher"]["ece"] == pytest.approx(expected_calibration_error(other, labels))
    assert got["teacher"]["ece"] != pytest.approx(expected_calibration_error(small, labels))
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


def _run_lock_commands(proj: Path, folder: Path) -> Path:
    """Run every stage command `proj`'s dvc.lock records (`python -m stages.<name> ...`) in a fresh copy of `proj`'s
    code and params, in this process, each with torch's default thread count as in its own process."""
    import importlib
    import shlex

    make_project(folder, yaml.safe_load((proj / "params.yaml").read_text()))
    stages = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    cwd, threads = os.getcwd(), torch.get_num_threads()
    default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 capture_output=True, text=True, check=True).stdout)  # fmt: skip
    os.chdir(folder)
    try:
        for stage in stages.values():
            _, _, module, *args = shlex.split(stage["cmd"])  # python -m stages.<name> ...
            torch.set_num_threads(default)
            importlib.import_module(module).main(args)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return folder


@pytest.mark.slow
def test_dvc_reruns_only_what_a_change_touches(tmp_path):
    """`dvc repro` a tiny pipeline, then check which stages each kind of edit makes stale."""
    # Two budgets: the full cache and a 40-call budget (queried pool), as a `dvc exp run -S` sweep would. A second
    # cached teacher (`other`, no students) lets step 4 add an ensemble of two cached teachers.
    teachers = {"small": TINY_PARAMS["teachers"]["small"], "other": TINY_TEACHER}
    params = tiny_params(teachers=teachers, distill={"budgets": ["full", 40], "pool_epoch_samples": 64})
    proj = make_project(tmp_path / "proj", params)
    res = _dvc(proj, "init", "--no-scm", "-q")
    assert res.returncode == 0, res.stderr
    shutil.copytree(Path(__file__).resolve().parents[1] / ".dvc" / "plots", proj / ".dvc" / "plots")  # templates
    res = _dvc(proj, "repro", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    assert Path(proj / "reports/report.md").exists()
    assert _stale(proj) == set()

    # What a user looks at: `dvc metrics show` fits a screen with top-1 first, teachers and students alike.
    res = _dvc(proj, "metrics", "show")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["Path", "accuracy"], lines[0]
    assert max(map(len, lines)) <= 120, res.stdout
    assert any(line.startswith("metrics/teachers/small.json") for line in lines)
    # `dvc plots show`: one overlay of all students per teacher and the budget curve, from the report's data.
    res = _dvc(proj, "plots", "show", "--json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)["data"]
    curves = shown["reports/plots/curves.json"][0]["content"]
    assert curves["facet"]["column"]["field"] == "teacher" and curves["spec"]["encoding"]["color"]["field"] == "loss"
    assert {d["student"] for d in curves["data"]["values"]} == {
        f"small-{x}-{b}-0" for x in ("ce", "kd") for b in ("full", 40)
    }
    budget = shown["reports/plots/budget.json"][0]["content"]
    assert budget["spec"]["encoding"]["x"]["field"] == "teacher_calls"
    assert sorted({d["teacher_calls"] for d in budget["data"]["values"]}) == [40, 2 * 232]

    # 1. A new teacher: only its own train_teacher/teach/distill/evaluate stages (and the report) are stale.
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["teachers"]["big"] = {"arch": "cnn_small", "epochs": 1, "lr": 0.05, "batch_size": 32}
    p["distill"]["teachers"] = ["small", "big"]
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    stale = _stale(proj)
    students = {f"{t}@big-{loss}-{b}-0" for t in ("distill", "evaluate") for loss in ("ce", "kd") for b in ("full", 40)}
    # The report tracks the distill matrix (it reports exactly those students), so it reruns too; the `teachers` stage
    # fingerprints the zoo's files (params `teachers`): it reruns, and only the new teacher's fingerprint is new.
    assert stale == {"teachers", "train_teacher@big", "teach@big", "report"} | students, stale
    p["teachers"].pop("big")
    p["distill"]["teachers"] = ["small"]

    # 1b. Switching to an actively queried teacher (a `query` entry used as a distill teacher): only its query stage,
    # its students and the report; the teacher's own teach stage is untouched (it never runs student code).
    p["query"] = {"small_margin": {"teacher": "small", "budget": 40, "initial": 20, "per_round": 10, "loss": "kd"}}
    p["distill"]["teachers"] = ["small_margin"]
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    items = [f"small_margin-{loss}-{b}-0" for loss in ("ce", "kd") for b in ("full", 40)]
    active = {f"{stage}@{item}" for stage in ("distill", "evaluate") for item in items}
    assert _stale(proj) == {"query@small_margin", "report"} | active
    # Training code reruns the active store (its rounds train students) but never a teach stage (demo teachers are
    # trained by the same loop, so train_teacher reruns).
    loop = proj / "pipeline" / "training" / "loop.py"
    original = loop.read_text()
    loop.write_text(original + "# an edit\n")
    stale = _stale(proj)
    assert "query@small_margin" in stale and not {x for x in stale if x.startswith("teach@")}
    loop.write_text(original)
    p["query"] = {}
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

    # 4. The lock check (scripts/check_lock.py, run on a fresh clone by .ci/run) passes on a fresh lock and names
    # what is stale: code, params, a git-kept output; absent DVC-cached data is not its business.
    from tests.test_dvc_lock import check_lock

    assert check_lock.check(proj) == []
    shutil.rmtree(proj / "data" / "students")  # what a fresh clone lacks
    assert check_lock.check(proj) == []
    with (proj / "stages" / "report.py").open("a") as f:
        f.write("# an edit\n")
    (proj / "metrics" / "small-kd-full-0.json").write_text("{}\n")
    p["evaluate"]["batch_size"] = 64
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    problems = check_lock.check(proj)
    assert "report: code dependency stages/report.py modified" in problems
    assert "evaluate@small-kd-full-0: output kept in git metrics/small-kd-full-0.json modified" in problems
    assert "evaluate@small-ce-40-0: param evaluate modified (params.yaml)" in problems  # a whole-section param
    assert not [x for x in problems if "data/" in x], problems


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
    "pipeline.errors",  # which exceptions print one line instead of a traceback
    "pipeline.lock",  # one writer per output: how a stage runs, never what it writes
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
    """teach's DVC params: every TeachConfig field except how it runs (threads, cluster, workers), and `runtime` (the
    CPU kernel pin decides the logits' last bits on another CPU, like every stage's)."""
    import dataclasses

    from pipeline.config import TeachConfig

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["teach"]["do"]["params"]
    want = {f"teach.{f.name}" for f in dataclasses.fields(TeachConfig)} - {
        "teach.threads",
        "teach.cluster",
        "teach.workers",
    } | {"runtime"}
    assert set(params) == want
