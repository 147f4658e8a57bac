"""The layout holds: imports point one way between the packages, and dvc.yaml's outs are where `Layout` says."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from pipeline.config import student_id
from pipeline.layout import Layout

ROOT = Path(__file__).resolve().parents[1]

# What each package of `pipeline/` may import from the project (docs/ARCHITECTURE.md). "core" is the top-level
# modules (config, runtime, layout, _lazy); the CLI and `pipeline.stage` sit above everything and may import anything.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "losses": set(),  # pure math: not even the core
    "models": {"core"},
    "data": {"core"},
    "cache": {"core", "data", "models"},
    "serve": {"core", "data", "models"},  # `kdcache serve`: a teacher behind HTTP; only the CLI imports it
    "training": {"core", "data", "cache", "models", "losses"},
    # active queries train students to choose teacher calls: above both cache and training, imported by no package
    "active": {"core", "data", "cache", "models", "losses", "training"},
    "evaluation": {"core", "data", "cache", "models", "losses", "training"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "cli" if parts[1:2] in (["cli"], ["stage"]) else "core"  # the CLI and stage wiring sit on top


def _imports(path: Path, module: str) -> set[str]:
    """Project modules `path` imports (absolute and relative), TYPE_CHECKING blocks included: a type-only
    import still couples the packages."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = module.rsplit(".", n.level)[0] if path.name != "__init__.py" else module
                if path.name == "__init__.py" and n.level > 1:
                    pkg = module.rsplit(".", n.level - 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.startswith("pipeline"):
                out.add(base)
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("pipeline")}
    return out


def test_imports_point_one_way():
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _package(module)
        if src == "cli":
            continue
        for target in _imports(path, module):
            dst = _package(target) if target != "pipeline" else "core"
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{module} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the direction of docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_the_direction_test_catches_an_upward_import(tmp_path):
    """The rule above is not vacuous: an upward import is seen (cache -> training)."""
    f = tmp_path / "teach.py"
    f.write_text("from pipeline.training.loop import train\nfrom . import store\n")
    found = _imports(f, "pipeline.cache.teach")
    assert "pipeline.training.loop" in found and "pipeline.cache" in found
    assert _package("pipeline.training.loop") not in ALLOWED["cache"]


def test_dvc_outs_are_where_layout_says():
    """Every artifact path dvc.yaml declares is the one `Layout` gives the stages (and vice versa)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    ds, t, sid = (
        "${prepare.name}",
        "${key}",
        student_id("${item.teacher}", "${item.loss}", "${item.budget}", "${item.seed}"),
    )
    layout = Layout(ds)

    def outs(stage: dict, kind: str = "outs") -> set[str]:
        body = stage.get("do", stage)
        return {next(iter(o)) if isinstance(o, dict) else o for o in body.get(kind, [])}

    assert outs(dvc["prepare"]) == {str(layout.shards)}
    # your teachers' files: the `teachers` stage depends on their folder, each train_teacher on its fingerprint
    assert outs(dvc["teachers"]) == {str(layout.teacher_inputs_dir), str(layout.student_inputs)}
    assert str(layout.weights) in dvc["teachers"]["deps"]
    assert str(layout.teacher_inputs(t)) in dvc["train_teacher"]["do"]["deps"]
    # the student's `py:` code: its fingerprint feeds every student (distill and the query rounds)
    assert str(layout.student_inputs) in dvc["distill"]["deps"]
    assert str(layout.student_inputs) in dvc["query"]["do"]["deps"]
    assert (ROOT / layout.weights).is_dir()  # in git, so a fresh clone has the dependency
    assert outs(dvc["train_teacher"]) == {str(layout.teacher_checkpoint(t)), str(layout.teacher_details(t))}
    assert outs(dvc["train_teacher"], "metrics") == {str(layout.teacher_metrics(t))}
    assert outs(dvc["teach"]) == {str(layout.store(t))}
    assert outs(dvc["ensemble"]) == {str(layout.store(t))}  # an ensemble's store is a teacher's store
    members = [str(layout.store(f"${{item.members[{k}]}}")) for k in (0, 1)]
    assert set(members) <= set(dvc["ensemble"]["do"]["deps"])  # it depends on its member stores
    assert outs(dvc["query"]) == {str(layout.store(t))}  # an actively queried store is a teacher's store too
    assert str(layout.teacher_checkpoint("${item.teacher}")) in dvc["query"]["do"]["deps"]  # its teacher answers
    assert outs(dvc["corrupt"]) == {str(layout.corrupt)}
    item_t = "${item.teacher}"
    assert outs(dvc["distill"]) == {str(layout.student(sid)), str(layout.curves(sid))}
    assert outs(dvc["evaluate"], "metrics") == {str(layout.student_metrics(sid))}
    assert outs(dvc["evaluate"]) == {str(layout.student_details(sid))}
    assert outs(dvc["evaluate"], "plots") == {str(layout.confusion(sid))}
    assert outs(dvc["report"]) == {str(layout.reports)}
    # the stages' inputs are those outputs
    assert str(layout.teacher_checkpoint(t)) in dvc["teach"]["do"]["deps"]
    assert str(layout.store(item_t)) in dvc["distill"]["deps"]
    assert str(layout.student(sid)) in dvc["evaluate"]["deps"]
    report_deps = set(dvc["report"]["deps"])
    assert {str(layout.shards / "manifest.json"), str(layout.confusion_dir), str(layout.curves_dir)} <= report_deps
    assert {str(Layout.details_dir(layout.metrics)), str(Layout.details_dir(layout.teacher_metrics_dir))} <= report_deps
    # metrics people compare live in git: nothing DVC declares as metrics or plots data sits under data/
    declared = outs(dvc["train_teacher"], "metrics") | outs(dvc["evaluate"], "metrics") | outs(dvc["evaluate"], "plots")
    assert not [p for p in declared if p.startswith("data/")], declared


def test_top_level_plots_use_the_report_data_and_project_templates():
    """`dvc plots show` overlays come from the report's plot data with templates in .dvc/plots (checked in)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    layout = Layout("x")
    plots = {next(iter(p)): next(iter(p.values())) for p in dvc["plots"]}
    assert set(plots) == {str(layout.reports / "plots" / "curves.json"), str(layout.reports / "plots" / "budget.json")}
    for spec in plots.values():
        template = ROOT / ".dvc" / "plots" / f"{spec['template']}.json"
        assert template.is_file(), template
        assert "<DVC_METRIC_DATA>" in template.read_text()


def test_stages_only_wire():
    """Stage modules parse, load, call and write: no loops over data, no math, no paths of their own."""
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        tree = ast.parse(text)
        loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
        assert not loops, f"{path.name} loops (library work belongs in pipeline/)"
        fstrings = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
        paths = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "Path"]
        assert not [f for f in fstrings + paths if "data/" in f or "metrics/" in f], f"{path.name} builds a path itself"
        assert "import torch" not in text and "import numpy" not in text, path.name
        assert "stage_parser(" in text and "start(" in text, f"{path.name} does not use pipeline.stage"
