"""The report builds from a tiny synthetic run (teachers x losses x budgets x seeds) and its PNGs are valid images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.evaluation.metrics import split_metrics
from pipeline.evaluation.report import build_report, fmt, group, load_metrics, mean_std
from stages import report as report_stage

CORRUPTIONS = ["gaussian_noise", "contrast", "jpeg"]
TEACHERS = {"small": (0.80, "cnn_tiny", 20_000), "big": (0.90, "resnet8", 78_000)}
LOSSES = ["ce", "kd", "dist"]
FULL_CALLS = 2000


def _fake_metrics(rng: np.random.Generator, teacher: str, loss: str, budget: str, seed: int) -> dict:
    """A metrics dict shaped exactly like the evaluate stage's (it goes through `split_metrics`)."""
    n, c = 200, 10
    labels = rng.integers(0, c, n)
    t_acc = TEACHERS[teacher][0]
    skill = 0.6 + 0.1 * (loss != "ce") * t_acc + (0.0 if budget == "full" else -0.05)
    teacher_logits = rng.normal(size=(n, c)) + 4.0 * np.eye(c)[labels] * (rng.random(n) < t_acc)[:, None]
    hit = (rng.random(n) < skill)[:, None]
    student = 0.6 * teacher_logits + rng.normal(size=(n, c)) + 2.0 * np.eye(c)[labels] * hit
    m = split_metrics(student, labels, teacher_logits, topk=(1, 5))
    calls = FULL_CALLS if budget == "full" else int(budget)
    m.update(
        student_id=f"{teacher}-{loss}-{budget}-{seed}",
        teacher=teacher,
        loss=loss,
        budget=budget,
        seed=seed,
        teacher_calls=calls,
        student_arch="cnn_tiny",
    )
    sev = {name: [float(m["top1"] * (1 - 0.08 * s)) for s in range(1, 6)] for name in CORRUPTIONS}
    m.update({f"corrupt/{k}": float(np.mean(v)) for k, v in sev.items()})
    m.update(
        corrupt_mean=float(np.mean([np.mean(v) for v in sev.values()])),
        corrupt_clean=m["top1"],
        corrupt_severity=sev,
        corrupt_severities=[1, 2, 3, 4, 5],
    )
    return m


def make_run(root: Path, budgets: tuple[str, ...] = ("full", "250", "1000")) -> tuple[Path, Path]:
    """metrics/*.json for 2 teachers x 3 losses x budgets x 3 seeds, and data/teachers/*.json."""
    rng = np.random.default_rng(0)
    mdir, tdir = root / "metrics", root / "teachers"
    mdir.mkdir(parents=True)
    tdir.mkdir(parents=True)
    for t, (acc, arch, params) in TEACHERS.items():
        info = {"teacher": t, "arch": arch, "test_top1": acc, "test_top5": 0.99, "history": []}
        if t == "big":
            info["params"] = params  # "small" has neither `params` nor a checkpoint: the axis must cope
        (tdir / f"{t}.json").write_text(json.dumps(info))
        for loss in LOSSES:
            for budget in budgets:
                if loss == "ce" and budget != "full":
                    continue
                for seed in range(3):
                    m = _fake_metrics(rng, t, loss, budget, seed)
                    (mdir / f"{m['student_id']}.json").write_text(json.dumps(m))
    return mdir, tdir


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt PNG raises here
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_report_from_tiny_run(tmp_path):
    mdir, tdir = make_run(tmp_path)
    path = build_report(mdir, tdir, tmp_path / "reports", title="tiny study")
    md = path.read_text()
    assert md.startswith("# tiny study")
    pngs = sorted(p.name for p in (tmp_path / "reports").glob("*.png"))
    assert pngs == ["accuracy.png", "budget.png", "reliability.png", "robustness.png", "teacher_capacity.png"]
    for name in pngs:
        assert f"]({name})" in md  # every figure is embedded
        _check_png(tmp_path / "reports" / name)

    # teacher x loss table: mean ± std over the 3 seeds, full budget only
    def cell(loss: str) -> str:
        return fmt([json.loads(p.read_text())["top1"] for p in sorted(mdir.glob(f"big-{loss}-full-*.json"))])

    assert f"| big (resnet8, 90.00) | {cell('ce')} | {cell('dist')} | {cell('kd')} |" in md  # CE first
    assert "| big | kd | 3 |" in md and "Spearman" in md and "mCA" in md
    assert "| big | kd | 250 | 250 | 3 |" in md  # budget table
    for c in CORRUPTIONS:
        assert c.replace("_", " ") in md


def test_report_without_budgets_or_corruptions(tmp_path):
    mdir, tdir = make_run(tmp_path, budgets=("full",))
    for p in mdir.glob("*.json"):  # an older evaluate output: no robustness keys
        m = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("corrupt")}
        p.write_text(json.dumps(m))
    build_report(mdir, tdir, tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    assert not (tmp_path / "reports/budget.png").exists() and "budget.png" not in md
    assert not (tmp_path / "reports/robustness.png").exists() and "## Robustness" not in md
    _check_png(tmp_path / "reports/teacher_capacity.png")


def test_report_stage_and_helpers(tmp_path, monkeypatch):
    mdir, tdir = make_run(tmp_path, budgets=("full",))
    # A stray metrics file of an earlier configuration (another data set's teacher) must stay out.
    stray = json.loads((mdir / "big-kd-full-0.json").read_text())
    stray.update(teacher="other", student_id="other-kd-full-0")
    (mdir / "other-kd-full-0.json").write_text(json.dumps(stray))
    distill = {"teachers": list(TEACHERS), "losses": list(LOSSES), "budgets": ["full"], "seeds": [0, 1, 2]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"title": "staged"}, "distill": distill}))
    monkeypatch.chdir(tmp_path)
    report_stage.main(["--metrics", str(mdir), "--teachers", str(tdir), "--out", "out"])
    text = Path("out/report.md").read_text()
    assert text.startswith("# staged") and "| other" not in text
    assert f"{len(TEACHERS) * len(LOSSES) * 3} students" in text
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof 1)
    assert fmt([0.5]) == "50.00" and fmt([0.5, 0.7]) == "60.00 ± 14.14"
    assert len(group(load_metrics(mdir))[("small", "kd")]) == 3
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        load_metrics(tmp_path / "nothing")


def test_compare_nested_metrics(tmp_path, capsys):
    """`kdcache compare` prints numeric metrics side by side and skips nested/list/str values."""
    mdir, _ = make_run(tmp_path, budgets=("full",))
    a, b = mdir / "big-kd-full-0.json", mdir / "big-ce-full-0.json"
    assert cli_main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert float(lines["top1"][0]) == pytest.approx(ma["top1"], abs=1e-4)
    assert float(lines["top1"][2]) == pytest.approx(mb["top1"] - ma["top1"], abs=1e-4)
    assert "corrupt/gaussian_noise" in lines and "spearman" in lines
    for skipped in ("reliability", "corrupt_severity", "corrupt_severities", "teacher", "student_arch", "budget"):
        assert not any(k == skipped or k.startswith(skipped + ".") for k in lines), skipped  # also when nested
    # nested numeric dicts are flattened like `dvc metrics show` does
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"a": {"b": 1.5, "c": [1, 2], "d": {"e": 2}}, "flag": True}))
    assert cli_main(["compare", str(nested), str(nested)]) == 0
    out = capsys.readouterr().out
    assert "a.b" in out and "a.d.e" in out and "a.c" not in out and "flag" not in out
