"""Every report figure drawn from tiny records: its axes, legend entries and number of bars/lines; missing data said."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer, ErrorbarContainer

from pipeline.evaluation import figures as F
from pipeline.evaluation.report import load_curves
from pipeline.evaluation.study import load_study
from tests.fakes import LOSSES, TEACHERS, make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds with budgets, and one seed without: the two shapes the figures must tell apart."""
    out = {}
    for name, kw in (("three", {}), ("one", {"seeds": (0,), "budgets": ("full",)})):
        root = tmp_path_factory.mktemp(name)
        layout, manifest = make_run(root, **kw)
        out[name] = (load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir), layout)
    return out


def _legend_texts(fig) -> list[str]:
    assert len(fig.legends) == 1, "one shared legend for all panels"
    assert all(ax.get_legend() is None for ax in fig.axes)
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _labelled(ax) -> None:
    assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_xlabel(), ax.get_ylabel())


def _errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_accuracy_figure(runs):
    study, _ = runs["three"]
    fig, caption = F.accuracy_figure(study)
    ax, dx = fig.axes
    for a in (ax, dx):
        _labelled(a)
    assert ax.get_ylim() == (0.0, 100.0)  # bars from a meaningful baseline
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == LOSSES  # one fixed loss order
    assert all(len(c.patches) == len(TEACHERS) for c in bars)
    assert all(c.errorbar is not None for c in bars)  # three seeds: 95% t-intervals
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(TEACHERS)
    assert _legend_texts(fig)[: len(LOSSES)] == LOSSES
    assert len(_errorbars(dx)) == len(TEACHERS) * (len(LOSSES) - 1)  # every distillation loss vs CE
    assert "95% t-interval" in caption and "filled markers are significant at 5% (paired bootstrap" in caption
    assert any(_filled(c) for c in _errorbars(dx))  # dist vs CE is significant over the three seeds
    plt.close(fig)

    one, _ = runs["one"]
    fig, caption = F.accuracy_figure(one)
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert all(c.errorbar is None for c in bars)  # one seed: no interval drawn (never a zero-length bar)
    assert "one seed: no interval" in caption
    assert len(_errorbars(fig.axes[1])) == len(TEACHERS) * (len(LOSSES) - 1)  # the paired interval exists
    # one training run per loss: no marker is filled, however small McNemar's p (dist vs CE: p < 0.001 here)
    assert one.paired("big", "dist", "ce").p < 0.001
    assert not any(_filled(c) for c in _errorbars(fig.axes[1])) and "every marker is open" in caption
    plt.close(fig)


def _filled(c: ErrorbarContainer) -> bool:
    """A filled marker (significant), as opposed to an open one (white face)."""
    return matplotlib.colors.to_hex(c.lines[0].get_markerfacecolor()) != "#ffffff"


def _joined(c: ErrorbarContainer) -> bool:
    return c.lines[0].get_linestyle() not in ("None", "none", "")


def test_capacity_figure_plots_size_only_when_it_orders_strength(runs, tmp_path):
    study, _ = runs["three"]
    fig, caption = F.capacity_figure(study)  # fakes: the larger teacher is the stronger one
    assert len(fig.axes) == 2 and fig.axes[1].get_xscale() == "log"
    assert fig.axes[0].get_xlabel() == "teacher's own test top-1 (%)" and fig.axes[0].get_ylabel()
    assert len(_errorbars(fig.axes[0])) == len(LOSSES) and _legend_texts(fig) == LOSSES
    assert "larger teachers are also stronger" in caption
    # 80% vs 92% on 400 test images is far beyond noise, and three seeds give intervals: the trend is drawn
    assert all(_joined(c) and c.has_yerr and c.has_xerr for c in _errorbars(fig.axes[0]))
    assert "lines join the teachers in order of strength" in caption
    plt.close(fig)
    # the demo zoo's case: the larger teacher is the weaker one
    inverted = {"small": (0.80, "cnn_tiny", 200_000), "big": (0.92, "resnet8", 78_000)}
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), teachers=inverted)
    s = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    fig, caption = F.capacity_figure(s)
    assert len(fig.axes) == 1 and "Teacher size is not plotted: the largest teacher (small" in caption
    assert not any(c.has_yerr for c in _errorbars(fig.axes[0]))  # one seed: no error bars
    assert not any(_joined(c) for c in _errorbars(fig.axes[0]))  # ... and no trend line through single runs
    assert "not joined" in caption and "one training run (one seed)" in caption
    plt.close(fig)
    s.teachers.pop("big")
    with pytest.raises(F.NoData, match="only one teacher"):
        F.capacity_figure(s)


def test_capacity_figure_draws_no_trend_between_teachers_within_noise(tmp_path):
    """Two teachers whose accuracies differ by less than their test-set noise (the demo zoo: 90.84 vs 90.30 on 10k
    images) have no established order: each point keeps its intervals, and no line suggests a trend."""
    close = {"a": (0.90, "cnn_tiny", None), "b": (0.90, "resnet8", 78_000)}
    layout, manifest = make_run(tmp_path, budgets=("full",), teachers=close)  # three seeds: y intervals exist
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest, layout.confusion_dir)
    acc = {t: 100 * study.teacher_accuracy(t) for t in close}
    ((lo, hi, d, half),) = F.unordered_teachers(acc, 400)
    assert {lo, hi} == {"a", "b"} and d == pytest.approx(abs(acc["a"] - acc["b"])) and d <= half
    assert half == pytest.approx(1.96 * np.sqrt(sum(a / 100 * (1 - a / 100) for a in acc.values()) / 400) * 100)
    fig, caption = F.capacity_figure(study)
    bars = _errorbars(fig.axes[0])
    assert bars and all(c.has_xerr and c.has_yerr and not _joined(c) for c in bars)
    assert f"{lo} and {hi} differ by {d:.2f} points, within the ±{half:.2f}" in caption
    plt.close(fig)
    assert F.unordered_teachers({"a": 80.0, "b": 92.0}, 400) == []  # 12 points apart: ordered


def test_reliability_figure(runs):
    study, _ = runs["three"]
    fig, caption = F.reliability_figure(study)
    panels = [a for a in fig.axes if a.patches]
    assert len(panels) == len(TEACHERS) * len(LOSSES)
    s = F._pool_bins(study.cell("big", "kd"), "test")
    ok = s["count"] > 0
    ax = fig.axes[len(LOSSES) * sorted(TEACHERS).index("big") + LOSSES.index("kd")]
    assert ax.get_title().startswith("big / kd")
    assert len(ax.patches) == ok.sum()  # one bar per non-empty bin
    over = (s["confidence"] - s["accuracy"])[ok] > 0
    red = np.array([np.allclose(p.get_facecolor()[:3], matplotlib.colors.to_rgb(F.OVER)) for p in ax.patches])
    np.testing.assert_array_equal(red, over)  # coloured by the sign of the gap
    counts = [int(t.get_text()) for t in ax.texts]
    assert counts == [int(c) for c in s["count"][ok]]  # bin counts shown
    texts = _legend_texts(fig)
    assert texts[0].startswith("student, overconfident") and texts[1] == "student, underconfident bin"
    assert "count" in caption
    plt.close(fig)


def test_robustness_figure(runs):
    study, _ = runs["three"]
    fig, caption = F.robustness_figure(study)
    assert len(fig.axes) == len(TEACHERS)
    for ax in fig.axes:
        assert ax.get_xlabel() == "corruption severity (0 = clean)"
        eb = _errorbars(ax)
        assert len(eb) == len(LOSSES) and len(eb[0].lines[0].get_xdata()) == 6  # clean + 5 severities
    assert fig.axes[0].get_ylabel()
    assert _legend_texts(fig) == LOSSES and "95% t-intervals" in caption
    plt.close(fig)


def test_budget_figure(runs):
    study, _ = runs["three"]
    fig, _ = F.budget_figure(study)
    assert len(fig.axes) == len(TEACHERS) and fig.axes[0].get_xscale() == "log"
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("teacher calls")
        lines = {c.get_label(): len(c.lines[0].get_xdata()) for c in _errorbars(ax)}
        assert lines == {"kd": 3, "dist": 3, "ce, same samples": 3}  # 250, 1000, full
    texts = _legend_texts(fig)
    assert texts[:2] == ["kd", "dist"] and "ce, all samples" in texts
    plt.close(fig)
    one, _ = runs["one"]
    with pytest.raises(F.NoData, match="no budget runs"):
        F.budget_figure(one)


def test_curves_figure_overlays_the_students_of_a_teacher(runs):
    study, layout = runs["three"]
    fig, _ = F.curves_figure(study, load_curves(layout.curves_dir, study.students))
    assert len(fig.axes) == len(TEACHERS)
    for ax in fig.axes:
        assert len(ax.lines) == len(LOSSES) * 3  # every full-budget student of the teacher, one line per seed
        assert ax.get_xlabel() == "epoch"
    assert fig.axes[0].get_ylabel() == "student val top-1 (%)"
    assert _legend_texts(fig) == LOSSES
    plt.close(fig)
    with pytest.raises(F.NoData, match="no training curves"):
        F.curves_figure(study, {})


def test_figures_without_their_data_say_so(runs, tmp_path):
    layout, manifest = make_run(tmp_path, budgets=("full",), seeds=(0,), robustness=False)
    for p in layout.student_details("x").parent.glob("*.json"):
        rec = json.loads(p.read_text())
        rec["test"].pop("reliability")
        p.write_text(json.dumps(rec))
    study = load_study(layout.metrics, layout.teacher_metrics_dir, manifest)  # and no per-image predictions
    with pytest.raises(F.NoData, match="robustness"):
        F.robustness_figure(study)
    with pytest.raises(F.NoData, match="reliability"):
        F.reliability_figure(study)
    fig, _ = F.accuracy_figure(study)
    assert "not available:\nno per-image predictions" in [t.get_text() for t in fig.axes[1].texts]
    assert not [c for c in fig.axes[1].collections if isinstance(c, LineCollection)]  # nothing drawn there
    plt.close(fig)
