"""The report from a tiny fake run (records written as the stages write them): what it says, what it refuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.evaluation import report
from pipeline.evaluation.provenance import provenance
from pipeline.evaluation.report import build_report, fmt_ci, fmt_iv
from pipeline.evaluation.stats import mcnemar_midp, mean_ci
from pipeline.evaluation.study import StudyError, load_study, loss_order, read_correct
from pipeline.layout import Layout
from pipeline.records import RecordError, read_record, write_record
from stages import report as report_stage
from tests.fakes import CORRUPTIONS, LOSSES, TEACHERS, fake_manifest, make_run

FIGURES = ["accuracy.png", "budget.png", "curves.png", "reliability.png", "robustness.png", "teacher_capacity.png"]


def _build(layout: Layout, manifest, **kw) -> str:
    path = build_report(
        layout.metrics,
        layout.teacher_metrics_dir,
        layout.reports,
        manifest,
        confusion_dir=layout.confusion_dir,
        curves_dir=layout.curves_dir,
        **kw,
    )
    return path.read_text()


def _accs(layout: Layout, pattern: str) -> list[float]:
    return [json.loads(p.read_text())["accuracy"] for p in sorted(layout.metrics.glob(pattern))]


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt PNG raises here
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_report_from_tiny_run(tmp_path):
    layout, manifest = make_run(tmp_path)
    md = _build(layout, manifest)
    # what it is about, from the manifest
    assert md.startswith("# kdcache on fake\n")
    assert "10 classes, 16x16 images with 1 channel(s); train 1,200 / val 200 / test 400" in md
    assert "3 seeds per number" in md
    pngs = sorted(p.name for p in layout.reports.glob("*.png"))
    assert pngs == FIGURES
    for name in pngs:
        assert f"]({name})" in md  # every figure is embedded
        _check_png(layout.reports / name)
    html = (layout.reports / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) and "<table>" in html  # self-contained

    # the top-1 table: mean ± std over the seeds (checked against the summaries), losses in one order
    assert loss_order(LOSSES) == ["ce", "kd", "dist"]
    big = {loss: mean_ci(_accs(layout, f"big-{loss}-full-*.json")) for loss in LOSSES}
    t_acc = read_record(layout.teacher_details("big"), "teacher")["accuracy"]
    row = f"| big ({100 * t_acc:.2f}) | {fmt_iv(big['ce'])} | {fmt_iv(big['kd'])} | **{fmt_iv(big['dist'])}** |"
    assert row in md  # dist beats ce and kd clearly in the fake run: bold; the others are not
    assert f"{100 * big['ce'].mean:.2f} ± {100 * big['ce'].std:.2f}" == fmt_iv(big["ce"])
    # paired comparisons: the difference is the seed-mean accuracy difference (same images, same seeds)
    diff = 100 * (big["dist"].mean - big["ce"].mean)
    line = next(x for x in md.splitlines() if x.startswith("| big | dist | 3 |"))
    assert f"| {fmt_ci(big['dist'])} | {diff:+.2f} [" in line and "p < 0.001 *" in line
    assert "paired bootstrap over test images" in md
    # details, robustness (no bold anywhere but the significant best), budget
    assert "| big | kd | 3 |" in md and "Spearman" in md and "mCA" in md
    table_bold = [x for x in md.splitlines() if x.startswith("|") and "**" in x]
    assert len(table_bold) == 2 and all(x.count("**") == 2 for x in table_bold)  # only the best cells (mCA is not)
    for c in CORRUPTIONS:
        assert c.replace("_", " ") in md
    assert "| big | kd | 250 | 250 | 3 |" in md
    # the dvc plots data
    curves = json.loads((layout.reports / "plots" / "curves.json").read_text())
    assert len(curves) == 2 * 3 * 3 * 3 * 2  # teachers x losses x budgets x seeds x epochs
    assert [r["loss"] for r in curves][:1] == ["ce"] and {r["split"] for r in curves} == {"val"}
    budget = json.loads((layout.reports / "plots" / "budget.json").read_text())
    assert {r["teacher_calls"] for r in budget} == {250, 1000, 2000}


def test_one_seed_uses_mcnemar_and_draws_no_interval(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,))
    md = _build(layout, manifest)
    assert "1 seed per number" in md
    assert not [x for x in md.splitlines() if x.startswith("|") and "±" in x]  # no std from one seed
    # McNemar's mid-p from the per-image predictions, counted here independently
    a = read_correct(layout.confusion("small-kd-full-0"))
    b = read_correct(layout.confusion("small-ce-full-0"))
    p = mcnemar_midp(int((a & ~b).sum()), int((~a & b).sum()))
    line = next(x for x in md.splitlines() if x.startswith("| small | kd | 1 |"))
    assert "| — |" in line  # no t-interval from one seed
    assert (f"p {p:.3f}" if p >= 0.001 else "p < 0.001") in line
    assert "McNemar mid-p" in md
    assert not (layout.reports / "budget.png").exists() and "budget.png" not in md


def test_warnings_come_first_and_a_loss_below_ce_is_flagged(tmp_path):
    warn = {"small": ["teacher small is still improving at the end of its schedule"]}
    layout, manifest = make_run(tmp_path, budgets=("full",), warnings=warn, skill={"kd": -1.5})
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    head = "\n".join(report._warnings(study))
    assert head.startswith("## Warnings")
    assert "teacher **small**: teacher small is still improving at the end of its schedule" in head
    assert "**kd** with teacher small is significantly *below* CE" in head
    assert "**kd** with teacher big is significantly *below* CE" in head
    assert "**dist**" not in head
    assert [(t, loss) for t, loss, _ in study.below_ce()] == [("big", "kd"), ("small", "kd")]


def test_a_teacher_no_better_than_a_ce_student_is_flagged(tmp_path):
    """The teacher check's cheap reference: a CE student's validation top-1 (labels alone, no teacher)."""
    teachers = {"weak": (0.40, "cnn_tiny", None), "big": (0.92, "resnet8", 78_000)}
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), teachers=teachers)
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    (weak,) = study.weak_teachers()
    assert weak[0] == "weak" and weak[1] < weak[2]
    head = "\n".join(report._warnings(study))
    assert "teacher **weak** is no better than a CE student" in head and "teacher **big** is no" not in head


def test_what_is_missing_is_said_not_hidden(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), robustness=False)
    for p in layout.confusion_dir.glob("small-*.csv"):
        p.unlink()  # no per-image predictions for one teacher's students
    layout.teacher_details("big").unlink()
    layout.teacher_metrics("big").unlink()
    only = {f"{t}-{loss}-full-{s}" for t in TEACHERS for loss in LOSSES for s in range(3)} | {"big-ckd-full-0"}
    md = _build(layout, manifest, only=only)
    assert "no per-image predictions (plots/confusion/<id>.csv) for 9 student(s)" in md
    assert "teacher **big**: no record in metrics/teachers" in md
    assert "1 student(s) of the matrix have no metrics: big-ckd-full-0" in md
    assert "*Figure `robustness.png` left out: no corruption accuracies" in md and "## Robustness" in md
    assert "*Figure `teacher_capacity.png` left out: only one teacher with a recorded accuracy" in md
    small = next(x for x in md.splitlines() if x.startswith("| small (")).split(" | ")
    assert "**" not in " ".join(small)  # without paired tests nothing is called significantly best
    assert not (layout.reports / "robustness.png").exists()


def test_bad_input_is_a_clear_error(tmp_path):
    layout, manifest = make_run(tmp_path / "a", budgets=("full",), seeds=(0,))
    with pytest.raises(StudyError, match=r"describes data set 'other'.*on data set 'fake'"):
        load_study(layout.metrics, layout.teacher_metrics_dir, fake_manifest("other"), layout.confusion_dir)
    with pytest.raises(StudyError, match="per-image predictions, the test split has 500"):
        load_study(
            layout.metrics,
            layout.teacher_metrics_dir,
            fake_manifest("fake", n_test=500, sha=manifest.sha256),
            layout.confusion_dir,
        )
    old = layout.student_details("big-kd-full-0")
    rec = json.loads(old.read_text())
    old.write_text(json.dumps({"top1": 0.5, "teacher": "big", "loss": "kd"}))  # an older kdcache's flat file
    with pytest.raises(StudyError, match=r"schema none \(flat keys: an older kdcache\).*rerun"):
        load_study(layout.metrics, layout.teacher_metrics_dir, manifest)
    rec.pop("accuracy")
    write_record(rec, layout.student_metrics("big-kd-full-0"), old, "student")
    with pytest.raises(StudyError, match=r"missing \['accuracy'\]"):
        load_study(layout.metrics, layout.teacher_metrics_dir, manifest)
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        load_study(tmp_path / "nothing", layout.teacher_metrics_dir, manifest)
    with pytest.raises(RecordError, match="'teacher' record where a 'student' record"):
        read_record(layout.teacher_details("big"), "student")


def test_header_records_the_commit_and_the_params_that_differ(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), teachers={"big": TEACHERS["big"]})
    params_path = tmp_path / "params.yaml"
    params = {"distill": {"loss_params": {"kd": {"T": 4.0}}, "seeds": [0]}, "report": {"title": None}}
    params_path.write_text(yaml.safe_dump(params))
    md = _build(layout, manifest, params=params, params_path=params_path)
    assert "**Made from**: not a git checkout" in md
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest)
    head = "\n".join(report._header(study, "t", provenance(params_path, params)))
    assert f"**Made from** commit `{commit.stdout.strip()}`." in head and "params.yaml as committed." in head
    # what `dvc exp run -S distill.loss_params.kd.T=2` leaves: the workspace's params differ from the commit's
    params["distill"]["loss_params"]["kd"]["T"] = 2
    params_path.write_text(yaml.safe_dump(params))
    head = "\n".join(report._header(study, "t", provenance(params_path, params)))
    assert "with uncommitted changes to params.yaml" in head
    assert "| `distill.loss_params.kd.T` | `2` | `4.0` |" in head


def test_report_stage(tmp_path, monkeypatch):
    """The stage reads the manifest and the distill matrix from params.yaml (stray metrics stay out)."""
    from pipeline.data.shards import write_dataset
    from tests.conftest import synthetic_splits

    splits, classes = synthetic_splits(n_train=32, n_test=400, classes=10)
    manifest = write_dataset(tmp_path / "data" / "shards" / "fake", "fake", splits, classes, shard_size=400)
    layout, _ = make_run(tmp_path, budgets=("full",), seeds=(0,), manifest=manifest)
    stray = read_record(layout.student_details("big-kd-full-0"), "student")
    stray["student"].update(teacher="other", student_id="other-kd-full-0")
    write_record(stray, layout.student_metrics("other-kd-full-0"), layout.student_details("other-kd-full-0"), "student")
    distill = {"teachers": list(TEACHERS), "losses": LOSSES, "budgets": ["full"], "seeds": [0]}
    distill["loss_params"] = {loss: {} for loss in LOSSES}  # every stage checks the whole params file first
    params = {"prepare": {"name": "fake"}, "report": {"title": "staged"}, "distill": distill}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    report_stage.main([])
    text = Path("reports/report.md").read_text()
    assert text.startswith("# staged\n") and "| other" not in text
    assert f"{len(TEACHERS) * len(LOSSES)} students" in text
    assert "train 32 / test 400" in text


def test_compare_reads_summaries_with_their_details(tmp_path, capsys):
    """`kdcache compare` puts the compared numbers first (top-1 leading), then every nested number."""
    layout, _ = make_run(tmp_path, budgets=("full",), seeds=(0,))
    a, b = layout.student_metrics("big-kd-full-0"), layout.student_metrics("big-ce-full-0")
    assert cli_main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert [line.split()[0] for line in out[1:6]] == ["accuracy", "agreement", "ece", "mca", "teacher_calls"]
    ma, mb = read_record(Layout.details(a)), read_record(Layout.details(b))
    assert float(lines["accuracy"][0]) == pytest.approx(ma["accuracy"], abs=1e-4)
    assert float(lines["accuracy"][2]) == pytest.approx(mb["accuracy"] - ma["accuracy"], abs=1e-4)
    assert "robustness.per_corruption.gaussian_noise" in lines and "teacher.spearman" in lines
    assert "schema" not in lines and not any(k.startswith("test.reliability") for k in lines)  # lists skipped
    # a plain (nested) JSON file still works
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"a": {"b": 1.5, "c": [1, 2], "d": {"e": 2}}, "flag": True}))
    assert cli_main(["compare", str(nested), str(nested)]) == 0
    out = capsys.readouterr().out
    assert "a.b" in out and "a.d.e" in out and "a.c" not in out and "flag" not in out


def test_budget_sweep_vs_kd_table_is_the_paired_test_at_every_budget(tmp_path):
    """benchmarks/budget_sweep.py's `vs_kd.md`: each loss minus KD per budget, the paired test on the same images."""
    from benchmarks.budget_sweep import vs_kd_table
    from pipeline.evaluation.stats import paired_comparison

    layout, manifest = make_run(tmp_path)
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    text = vs_kd_table(study, "big", ["250", "1000", "full"])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"loss", "ce", "dist"}  # kd is the reference: no row
    for loss in ("ce", "dist"):
        cells = rows[loss].strip("| ").split(" | ")[1:]
        for budget, cell in zip(["250", "1000", "full"], cells, strict=True):
            a = np.stack([read_correct(layout.confusion_dir / f"big-{loss}-{budget}-{s}.csv") for s in range(3)])
            b = np.stack([read_correct(layout.confusion_dir / f"big-kd-{budget}-{s}.csv") for s in range(3)])
            c = paired_comparison(a, b)
            p = "< 0.001" if c.p < 0.001 else f"{c.p:.3f}"
            assert cell.startswith(f"{100 * c.diff:+.2f} [{100 * c.lo:+.2f}, {100 * c.hi:+.2f}], p {p}")
            assert cell.endswith(" *") == (c.p < 0.05)
