"""What the report calls significant, what it warns about, and what it says was overridden (issue 32).

One training run per method makes no verdict (McNemar's test on one run measures that run): stars, bold and
"significantly below CE" come only from the test over several seeds. The Teachers table counts the warnings the
report shows; a CE student at the 100% ceiling gets advice that is true there; runs whose `epochs` `min_steps`
raised are listed in the header.
"""

from __future__ import annotations

import re

import pytest

from pipeline.config import TrainConfig
from pipeline.evaluation import report
from pipeline.evaluation.report import build_report
from pipeline.evaluation.stats import MCNEMAR, MIN_SEEDS, paired_comparison
from pipeline.evaluation.study import RAISED_RULE, load_study, read_correct
from pipeline.records import read_record, write_record
from pipeline.training.schedule import resolve_schedule
from tests.fakes import make_run


def _md(layout, manifest) -> str:
    return build_report(
        layout.metrics, layout.teacher_metrics_dir, layout.reports, manifest, confusion_dir=layout.confusion_dir
    ).read_text()


def _table_rows(md: str, section: str) -> list[str]:
    body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [x for x in body.splitlines() if x.startswith("| ") and not x.startswith("| teacher |")]


def test_one_seed_shows_the_differences_but_marks_none_significant(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), skill={"kd": -1.5})
    a = read_correct(layout.confusion("big-dist-full-0"))
    b = read_correct(layout.confusion("big-ce-full-0"))
    one = paired_comparison(a, b)
    assert one.test == MCNEMAR and one.p < 0.001 and one.one_run and not one.significant(0.05)
    md = _md(layout, manifest)
    # the difference is still shown, with McNemar's p, but unstarred
    line = next(x for x in md.splitlines() if x.startswith("| big | dist | 1 |"))
    assert f"{100 * one.diff:+.2f} [{100 * one.lo:+.2f}, {100 * one.hi:+.2f}], p < 0.001 |" in line
    paired = _table_rows(md, "Paired comparisons")
    assert paired and not [x for x in paired if " *" in x]
    assert not [x for x in _table_rows(md, "Student top-1") if "**" in x]  # no bold: no loss is called best
    assert "significantly *below* CE" not in md  # kd is far below CE in this run, but one run is no verdict
    # ... and the header says why, before any table
    head = md.split("## ", 1)[0]
    assert "**One seed per method: no comparison is marked significant.**" in head
    assert "measures that run (these two networks on these test images), not the method" in head


def test_several_seeds_make_the_verdicts(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=tuple(range(MIN_SEEDS + 1)), skill={"kd": -1.5})
    md = _md(layout, manifest)
    assert "One seed per method" not in md and "cell(s) with one seed" not in md
    assert [x for x in _table_rows(md, "Paired comparisons") if " *" in x]
    assert [x for x in _table_rows(md, "Student top-1") if "**" in x]  # dist is significantly best
    assert "**kd** with teacher big is significantly *below* CE" in md


def test_a_mixed_run_names_the_one_seed_cells(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0, 1, 2))
    for s in (1, 2):  # the kd students of teacher small lost two seeds
        for p in (layout.student_metrics(f"small-kd-full-{s}"), layout.student_details(f"small-kd-full-{s}")):
            p.unlink()
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    assert study.single_seed_cells() == 1
    assert study.paired("small", "kd", "ce").seeds == 1 and not study.paired("small", "kd", "ce").significant()
    md = _md(layout, manifest)
    assert "**1 cell(s) with one seed: their comparisons are not marked significant.**" in md


def test_the_teachers_table_counts_the_warnings_shown(tmp_path):
    """A recorded warning and the report's own CE check both count (the table said 0 beside a warning)."""
    teachers = {"weak": (0.40, "cnn_tiny", None), "big": (0.92, "resnet8", 78_000)}
    warn = {"big": ["teacher big is still improving at the end of its schedule"]}
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), teachers=teachers, warnings=warn)
    md = _md(layout, manifest)
    warnings = md.split("## Warnings\n", 1)[1].split("\n## ", 1)[0]
    shown = {t: len(re.findall(rf"^- teacher \*\*{t}\*\*", warnings, flags=re.M)) for t in teachers}
    assert shown == {"weak": 1, "big": 1}
    rows = {r.split(" | ")[0].strip("| "): r.strip(" |").split(" | ")[-1] for r in _table_rows(md, "Teachers")}
    assert rows == {t: str(n) for t, n in shown.items()}


def test_a_ce_student_at_the_ceiling_gets_no_train_it_longer_advice(tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,))
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    study.teachers["big"].record["val_accuracy"] = 1.0
    for s in study.cell("big", "ce"):
        s.record["val_accuracy"] = 1.0  # the CE student already gets every validation image right
    study.teachers["small"].record["val_accuracy"] = 0.30  # far below its CE student: the usual advice
    got = report.teacher_warnings(study)
    (big,) = got["big"]
    assert "cannot beat a CE student on this data" in big and "100% ceiling" in big and "longer" in big
    assert "train it longer (teachers" not in big and "harder data set" in big
    (small,) = got["small"]
    assert "is no better than a CE student" in small and "train it longer (teachers.small.steps)" in small


def test_schedules_raised_by_min_steps_are_listed_in_the_header(tmp_path):
    raised = resolve_schedule(TrainConfig(epochs=1, min_steps=1000), steps_per_epoch=422, samples_per_epoch=54_000)
    assert raised.raised and RAISED_RULE.fullmatch(raised.rule)  # the report reads what the loop records
    kept = resolve_schedule(TrainConfig(epochs=3, min_steps=1000), steps_per_epoch=422, samples_per_epoch=54_000)
    assert not kept.raised and not RAISED_RULE.search(kept.rule)
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,))
    for sid in ("big-kd-full-0", "big-ce-full-0", "small-kd-full-0"):
        rec = read_record(layout.student_details(sid), "student")
        rec["student"]["schedule"] = (raised if sid != "small-kd-full-0" else kept).to_dict()
        write_record(rec, layout.student_metrics(sid), layout.student_details(sid), "student")
    t = read_record(layout.teacher_details("small"), "teacher")
    t["schedule"] = resolve_schedule(TrainConfig(epochs=1, min_steps=2000), 422, 54_000).to_dict()
    write_record(t, layout.teacher_metrics("small"), layout.teacher_details("small"), "teacher")
    head = _md(layout, manifest).split("## ", 1)[0]
    assert "**Schedules raised by `min_steps`**" in head
    assert "- `epochs=1 raised to 3 by min_steps=1000`: 2 run(s) (big-ce-full-0, big-kd-full-0)" in head
    assert "- `epochs=1 raised to 5 by min_steps=2000`: 1 run(s) (teacher small)" in head
    assert "small-kd-full-0" not in head


@pytest.mark.parametrize("seeds", [1, MIN_SEEDS])
def test_significance_needs_several_runs(seeds):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.random((seeds, 2000)) < 0.9
    b = rng.random((seeds, 2000)) < 0.7  # 20 points apart: p ~ 0 either way
    p = paired_comparison(a, b)
    assert p.p < 1e-3 and p.significant(0.05) == (seeds >= MIN_SEEDS)


def test_training_warns_when_min_steps_raises_the_epochs_asked_for(tmp_path, caplog):
    """What `dvc exp run -S distill.train.epochs=1` prints: a WARNING (not an info line) naming the override."""
    import logging

    import torch

    from pipeline.losses import build_loss
    from pipeline.models import build_for
    from pipeline.training.dataset import DistillDataset
    from pipeline.training.loop import train
    from tests.conftest import cached_tiny

    m, store, _ = cached_tiny(tmp_path, n_train=128, n_test=32)  # 2 shards of 64: 4 steps per epoch at batch 32
    cfg = TrainConfig(epochs=1, min_steps=6, batch_size=32, workers=0, shuffle_buffer=32, threads=1, eval_every=0)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="pipeline.training.loop"):
        result = train(build_for("cnn_tiny", m), build_loss("ce"), DistillDataset(m, "train", store), cfg, tmp_path)
    assert result.schedule.raised and [r["epoch"] for r in result.history] == [1, 2]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING and "min_steps" in r.getMessage()]
    assert "epochs=1 raised to 2 by min_steps=6" in warning.getMessage() and "min_steps: 0" in warning.getMessage()
