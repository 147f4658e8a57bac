"""The report's figures, drawn from a `Study`: each function returns `(figure, caption)` or raises `NoData`.

Rules every figure keeps (issue 20): bars start at zero (differences get their own panel around a zero
line instead of a zoomed axis), both axes are labelled, losses appear in `study.losses` order with one
colour each across all figures (`loss_color`), intervals are drawn only where they exist (95% t-intervals
over seeds need two seeds; paired-bootstrap intervals need per-image predictions), and a figure whose data
is absent raises `NoData(reason)` so the report says what is missing instead of showing an empty image.

- `accuracy_figure`: student top-1 per teacher and loss (bars from 0, the teacher's own accuracy and
  chance marked), and each loss's paired difference to CE with its 95% interval;
- `capacity_figure`: student top-1 against the teacher's own test top-1 (parameters only when the larger
  teachers are also the stronger ones; the caption says which);
- `reliability_figure`: reliability diagrams (Guo et al. 2017), bars coloured by the sign of the gap, bin
  counts printed;
- `robustness_figure`: accuracy against corruption severity (Hendrycks & Dietterich 2019);
- `budget_figure`: student top-1 against teacher calls;
- `curves_figure`: held-out accuracy per epoch, the students of one teacher overlaid in one panel.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.stats import MIN_SEEDS
from pipeline.evaluation.study import ALPHA, FULL, NO_TEACHER_LOSS, Student, Study, loss_order

#: one colour per loss in every figure (registry order); CE, the no-teacher baseline, is grey
_PALETTE = {
    "ce": "0.35",
    "kd": "tab:blue",
    "dkd": "tab:purple",
    "dist": "tab:orange",
    "cmkd": "tab:green",
    "ckd": "tab:red",
}
_EXTRA = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


class NoData(Exception):  # noqa: N818 (it is a condition, not a failure: the report prints its message)
    """A figure that cannot be drawn from the data at hand; the message says what is missing."""


def loss_color(loss: str, losses: list[str] | None = None) -> Any:
    if loss in _PALETTE:
        return _PALETTE[loss]
    others = [x for x in loss_order(losses or [loss]) if x not in _PALETTE]
    return _EXTRA[others.index(loss) % len(_EXTRA)] if loss in others else _EXTRA[0]


def _pct(x: float | None) -> float:
    return float("nan") if x is None else 100.0 * x


def _human(n: float) -> str:
    """12500 -> '12.5k', 2000000 -> '2M', 250 -> '250'."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _shared_legend(fig: Any, axes: Any, ncol: int = 6, title: str | None = None, first: list[str] | None = None) -> Any:
    """One legend for all panels, below them (never over the data): every label once, in first-seen order."""
    handles: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if not handles:
        return None
    if first:  # e.g. the losses, in their order, before reference lines
        handles = {
            k: handles[k] for k in [*[f for f in first if f in handles], *[k for k in handles if k not in first]]
        }
    return fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(ncol, len(handles)),
        fontsize=8,
        frameon=False,
        title=title,
        title_fontsize=8,
    )


def save(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG (legends outside the axes kept) and free it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _yerr(iv: Any) -> Any:
    """Asymmetric error bar of a 95% interval in points, or None where there is no interval (one seed)."""
    if iv is None or iv.lo is None:
        return None
    return [[100 * (iv.mean - iv.lo)], [100 * (iv.hi - iv.mean)]]


# ---------------------------------------------------------------------------------------------
# accuracy per teacher and loss


def accuracy_figure(study: Study) -> tuple[Any, str]:
    """Left: top-1 bars from 0 per teacher (groups) and loss (colours); right: paired difference to CE."""
    teachers = [t for t in study.teacher_names if any(study.cell(t, loss) for loss in study.losses)]
    if not teachers:
        raise NoData("no full-budget students")
    losses = study.losses
    fig, (ax, dx) = _subplots(1, 2, figsize=(max(8.0, 2.2 + 1.9 * len(teachers) * max(1, len(losses)) / 3), 4.2))
    width = 0.8 / len(losses)
    x = np.arange(len(teachers))
    for k, loss in enumerate(losses):
        ivs = [study.interval(study.cell(t, loss)) for t in teachers]
        heights = [_pct(iv.mean) if iv else np.nan for iv in ivs]
        err = np.array(
            [[100 * (iv.mean - iv.lo), 100 * (iv.hi - iv.mean)] if iv and iv.lo is not None else [0, 0] for iv in ivs]
        ).T
        has_err = any(iv and iv.lo is not None for iv in ivs)
        ax.bar(
            x - 0.4 + (k + 0.5) * width,
            heights,
            width,
            color=loss_color(loss, losses),
            label=loss,
            yerr=err if has_err else None,
            capsize=2 if has_err else 0,
        )
    for i, t in enumerate(teachers):
        acc = study.teacher_accuracy(t)
        if acc is not None:
            ax.hlines(100 * acc, i - 0.45, i + 0.45, color="black", lw=1.2, label="teacher's own top-1")
    chance = 100.0 / study.data.classes
    ax.axhline(chance, color="0.5", ls=":", lw=1, label=f"chance ({chance:.0f}%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(x, teachers)
    ax.set_xlabel("teacher")
    ax.set_ylabel("student top-1 (%)")
    ax.set_title("Student top-1 (full budget)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)

    dist_losses = [loss for loss in losses if loss != NO_TEACHER_LOSS]
    pts = 0
    for k, loss in enumerate(dist_losses):
        for i, t in enumerate(teachers):
            p = study.paired(t, loss, NO_TEACHER_LOSS)
            if p is None:
                continue
            xi = i - 0.4 + (k + 0.5) * 0.8 / max(1, len(dist_losses))
            sig = p.significant(ALPHA)
            dx.errorbar(
                [xi],
                [100 * p.diff],
                yerr=[[100 * (p.diff - p.lo)], [100 * (p.hi - p.diff)]],
                fmt="o",
                ms=6,
                capsize=3,
                color=loss_color(loss, losses),
                mfc=loss_color(loss, losses) if sig else "white",
                label=loss,
            )
            pts += 1
    dx.axhline(0, color=loss_color(NO_TEACHER_LOSS), ls="--", lw=1.2, label=f"{NO_TEACHER_LOSS} (zero line)")
    dx.set_xticks(x, teachers)
    dx.set_xlim(-0.6, len(teachers) - 0.4)
    dx.set_xlabel("teacher")
    dx.set_ylabel("top-1 minus CE's (points)")
    dx.grid(axis="y", alpha=0.3)
    if pts:
        dx.set_title("Paired difference to CE, 95% bootstrap interval (filled: p < 0.05 over seeds)", fontsize=9)
    else:
        why = (
            "no CE students"
            if not any(study.cell(t, NO_TEACHER_LOSS) for t in teachers)
            else "no per-image predictions"
        )
        dx.set_title("Paired difference to CE", fontsize=9)
        dx.text(0.5, 0.5, f"not available:\n{why}", ha="center", va="center", transform=dx.transAxes, color="0.3")
    _shared_legend(fig, [ax, dx], ncol=8, first=losses)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    n = sorted(study.seed_counts())
    bars = "mean over seeds, 95% t-interval" if max(n) > 1 else "one seed: no interval over seeds"
    verdicts = (
        "filled markers are significant at 5% (paired bootstrap over the seeds)"
        if max(n) >= MIN_SEEDS
        else "every marker is open: with one seed per loss no difference is called significant (McNemar's test on "
        "one training run measures that run, not the loss)"
    )
    caption = (
        f"Left: student top-1 on the test split per teacher and loss ({bars}); black line: the teacher's own "
        "top-1; dotted: chance. Right: each loss's top-1 minus CE's on the same test images (same teacher and "
        f"seeds) with its 95% paired-bootstrap interval; {verdicts}."
    )
    return fig, caption


# ---------------------------------------------------------------------------------------------
# stronger teachers


def _same_order(a: dict[str, float], b: dict[str, float]) -> bool:
    """True when sorting the teachers by a and by b gives the same order, without ties."""
    names = sorted(a)
    ra = sorted(names, key=a.get)
    rb = sorted(names, key=b.get)
    return ra == rb and len(set(a.values())) == len(a) and len(set(b.values())) == len(b)


def accuracy_noise(acc: float, n: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy `acc` (fraction) measured on n images."""
    return 1.96 * math.sqrt(max(acc * (1.0 - acc), 0.0) / n)


def unordered_teachers(acc: dict[str, float], n: int | None) -> list[tuple[str, str, float, float]]:
    """(weaker, stronger, difference, 95% half-width), in points, for each pair of teachers adjacent in accuracy
    whose difference is within the noise of two accuracies on n test images (an unpaired two-proportion test at
    5%): their order, and so any trend drawn through them, is not established. Unknown n: every pair."""
    ts = sorted(acc, key=acc.get)
    out = []
    for lo, hi in zip(ts, ts[1:], strict=False):
        d = acc[hi] - acc[lo]
        half = 1.96 * math.sqrt(sum(a / 100 * (1 - a / 100) for a in (acc[lo], acc[hi])) / n) * 100 if n else math.inf
        if d <= half:
            out.append((lo, hi, d, half))
    return out


def capacity_figure(study: Study) -> tuple[Any, str]:
    """Student top-1 per loss against the teacher's own test top-1 (and its size when that ranks them alike).

    A line joins a loss's points only when the data can carry a trend: the teachers' accuracies differ beyond their
    test-set noise and every point has an interval over seeds; otherwise the points stand alone, with their
    intervals (the teacher's accuracy always has one: its test images), and the caption says why."""
    acc = {t: 100 * a for t in study.teacher_names if (a := study.teacher_accuracy(t)) is not None}
    if len(acc) < 2:
        have = "no teacher" if not acc else "only one teacher"
        raise NoData(f"{have} with a recorded accuracy (metrics/teachers/<t>.json): a trend needs two or more")
    n_test = study.data.splits.get("test")
    ties = unordered_teachers(acc, n_test)
    single_seed = max(len(study.cell(t, loss)) for t in acc for loss in study.losses) < 2
    join = not ties and not single_seed
    params = {t: float(study.teachers[t].params) for t in acc if study.teachers[t].params}
    panels: list[tuple[str, dict[str, float], bool]] = [("teacher's own test top-1 (%)", acc, False)]
    by_size = len(params) == len(acc) and _same_order(acc, params)
    if by_size:
        panels.append(("teacher parameters (log)", params, True))
    fig, axes = _subplots(1, len(panels), figsize=(5.4 * len(panels), 4.3), squeeze=False, sharey=True)
    for ax, (xlabel, xs, logx) in zip(axes[0], panels, strict=True):
        ts = sorted(xs, key=xs.get)
        for loss in study.losses:
            pts = [(t, iv) for t in ts if (iv := study.interval(study.cell(t, loss))) is not None]
            if not pts:
                continue
            px = [xs[t] for t, _ in pts]
            m = [100 * iv.mean for _, iv in pts]
            have_err = all(iv.lo is not None for _, iv in pts)
            err = (
                np.array([[100 * (iv.mean - iv.lo), 100 * (iv.hi - iv.mean)] for _, iv in pts]).T if have_err else None
            )
            xerr = (  # the teacher's accuracy is itself a measurement on n_test images
                [100 * accuracy_noise(acc[t] / 100, n_test) for t, _ in pts] if n_test and not logx else None
            )
            style = {"linestyle": "--" if loss == NO_TEACHER_LOSS else "-"} if join else {"linestyle": "none"}
            ax.errorbar(
                px,
                m,
                yerr=err,
                xerr=xerr,
                marker="o",
                capsize=3,
                color=loss_color(loss, study.losses),
                label=loss,
                **style,
            )
        if logx:
            ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        ax.set_xticks([xs[t] for t in ts], [f"{t}\n{_human(xs[t]) if logx else f'{xs[t]:.2f}'}" for t in ts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("student top-1 (%)")
    _shared_legend(fig, axes, title="loss")
    fig.suptitle("Does a stronger teacher make a better student?", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    caption = "Student top-1 per loss against the teacher's own test top-1"
    if n_test:
        caption += f" (horizontal bars: its 95% interval on the {n_test:,} test images)"
    if join:
        caption += (
            "; lines join the teachers in order of strength (their accuracies differ beyond test-set noise), "
            "vertical bars are 95% t-intervals over seeds; dashed: CE, which ignores the teacher."
        )
    else:
        why = []
        for lo, hi, d, half in ties:
            why.append(
                f"{lo} and {hi} differ by {d:.2f} points, within the ±{half:.2f} that two accuracies on "
                f"{n_test:,} test images vary by at 95%"
                if n_test
                else f"the test size behind {lo} and {hi}'s accuracies is unknown"
            )
        if single_seed:
            why.append("each point is one training run (one seed), with no interval over seeds")
        caption += (
            ". The points are not joined, because the data cannot carry a trend: "
            + "; ".join(why)
            + " (train several seeds, or teachers further apart, to see one)."
        )
    if by_size:
        caption += " Right: the same against the teacher's parameter count (larger teachers are also stronger here)."
    elif len(params) == len(acc):
        big = max(params, key=params.get)
        caption += (
            f" Teacher size is not plotted: the largest teacher ({big}, {_human(params[big])} parameters, "
            f"{acc[big]:.2f}%) is not the most accurate, so size does not order these teachers by strength."
        )
    missing = sorted(set(study.teacher_names) - set(acc))
    if missing:
        caption += f" Left out (no recorded accuracy): {', '.join(missing)}."
    return fig, caption


# ---------------------------------------------------------------------------------------------
# calibration


def _pool_bins(students: list[Student], key: str) -> dict[str, np.ndarray] | None:
    """Sum bin counts over seeds; accuracy/confidence as count-weighted means (NaN in empty bins)."""
    parts = [r for s in students if isinstance(r := _rel(s.record, key), dict) and r.get("count")]
    if not parts:
        return None
    count = np.sum([np.asarray(p["count"], dtype=np.float64) for p in parts], axis=0)
    acc = np.sum([np.nan_to_num(np.asarray(p["accuracy"], dtype=np.float64)) * p["count"] for p in parts], axis=0)
    conf = np.sum([np.nan_to_num(np.asarray(p["confidence"], dtype=np.float64)) * p["count"] for p in parts], axis=0)
    edges = np.asarray(parts[0].get("edges") or np.linspace(0, 1, len(count) + 1), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "accuracy": acc / count, "confidence": conf / count, "edges": edges}


def _rel(record: dict[str, Any], key: str) -> Any:
    section = record.get(key)
    return section.get("reliability") if isinstance(section, dict) else None


OVER, UNDER = "tab:red", "tab:blue"


def reliability_figure(study: Study) -> tuple[Any, str]:
    """Rows = teachers, columns = losses: student accuracy per confidence bin, coloured by over/underconfidence."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    losses = study.losses
    cells = [(t, loss) for t in study.teacher_names for loss in losses if _pool_bins(study.cell(t, loss), "test")]
    if not cells:
        raise NoData("no reliability bins in the student records (test.reliability): rerun the evaluate stage")
    rows = [t for t in study.teacher_names if any(c[0] == t for c in cells)]
    cols = [loss for loss in losses if any(c[1] == loss for c in cells)]
    fig, axes = _subplots(
        len(rows), len(cols), figsize=(2.7 * len(cols), 2.8 * len(rows) + 0.8), squeeze=False, sharex=True, sharey=True
    )
    for i, t in enumerate(rows):
        for j, loss in enumerate(cols):
            ax = axes[i, j]
            rs = study.cell(t, loss)
            s = _pool_bins(rs, "test")
            if s is None:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_title(f"{t} / {loss}", fontsize=8)
                continue
            centres, width = (s["edges"][:-1] + s["edges"][1:]) / 2, np.diff(s["edges"])
            ok = s["count"] > 0
            gap = s["confidence"] - s["accuracy"]  # > 0: overconfident
            colors = [OVER if g > 0 else UNDER for g in gap[ok]]
            ax.bar(centres[ok], s["accuracy"][ok], width[ok], color=colors, alpha=0.8, edgecolor="white", lw=0.5)
            ax.plot(centres[ok], s["confidence"][ok], "_", color="0.1", ms=7, mew=1.2)
            for c, n in zip(centres[ok], s["count"][ok], strict=True):  # at the foot of each bar: never over the data
                ax.text(c, 0.015, f"{int(n)}", rotation=90, ha="center", va="bottom", fontsize=5.5, color="0.1")
            tt = _pool_bins(rs, "teacher")
            if tt is not None:
                tok = tt["count"] > 0
                tc = (tt["edges"][:-1] + tt["edges"][1:]) / 2
                ax.plot(tc[tok], tt["accuracy"][tok], "o-", color="black", ms=2.5, lw=1.0)
            ax.plot([0, 1], [0, 1], ":", color="0.4", lw=1)
            ece = study.values(rs, "ece")
            title = f"{t} / {loss}\nECE {np.mean(ece):.3f}" if ece else f"{t} / {loss}"
            tece = study.values(rs, "teacher.ece")
            if tece:
                title += f" (teacher {np.mean(tece):.3f})"
            ax.set_title(title, fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.1)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("confidence", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=8)
    fig.legend(
        [
            Patch(color=OVER, alpha=0.8),
            Patch(color=UNDER, alpha=0.8),
            Line2D([], [], color="0.1", marker="_", ls="none", ms=7, mew=1.2),
            Line2D([], [], color="black", marker="o", ms=3),
            Line2D([], [], color="0.4", ls=":"),
        ],
        [
            "student, overconfident bin (confidence > accuracy)",
            "student, underconfident bin",
            "student's mean confidence in the bin",
            "teacher (cached logits)",
            "perfect calibration",
        ],
        loc="lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Reliability diagrams (15 bins, seeds pooled; numbers: test images per bin)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    caption = (
        "Bars: student accuracy per confidence bin, red where the mean confidence exceeds the accuracy "
        "(overconfident), blue where it falls below (underconfident); dash: the bin's mean confidence; the number at "
        "the foot of each bar is its image count (sparse bins are noisy); line: the teacher's cached logits; "
        "dotted: perfect calibration."
    )
    return fig, caption


# ---------------------------------------------------------------------------------------------
# robustness


def robustness_figure(study: Study) -> tuple[Any, str]:
    """Accuracy vs corruption severity (mean over corruptions), one panel per teacher, one line per loss."""
    have = [
        t
        for t in study.teacher_names
        if any(_severity(s) is not None for loss in study.losses for s in study.cell(t, loss))
    ]
    if not have:
        raise NoData("no corruption accuracies in the student records (robustness): run `dvc repro corrupt` first")
    fig, axes = _subplots(1, len(have), figsize=(4.6 * len(have), 4.0), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], have, strict=True):
        for loss in study.losses:
            per = [c for s in study.cell(t, loss) if (c := _severity(s)) is not None]
            if not per:
                continue
            sev = per[0][0]
            y = np.array([c[1] for c in per]) * 100  # (seeds, 1 + S)
            err = None
            if len(y) > 1:
                from pipeline.evaluation.stats import mean_ci

                ivs = [mean_ci(col) for col in y.T]
                err = np.array([[iv.mean - iv.lo, iv.hi - iv.mean] for iv in ivs]).T
            style = {"linestyle": "--"} if loss == NO_TEACHER_LOSS else {}
            ax.errorbar(
                [0, *sev],
                y.mean(0),
                yerr=err,
                marker="o",
                ms=3,
                capsize=2,
                color=loss_color(loss, study.losses),
                label=loss,
                **style,
            )
        ax.set_title(f"teacher {t}", fontsize=9)
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("student accuracy (%), mean over corruptions")
    _shared_legend(fig, axes, title="loss")
    fig.suptitle("Robustness to common corruptions", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    n = max(study.seed_counts())
    caption = (
        "Student accuracy against corruption severity, mean over the corruptions"
        + (", mean over seeds with 95% t-intervals" if n > 1 else " (one seed)")
        + "; severity 0 = the same images uncorrupted."
    )
    return fig, caption


def _severity(s: Student) -> tuple[list[int], list[float]] | None:
    rob = s.record.get("robustness")
    if not isinstance(rob, dict) or not rob.get("per_severity"):
        return None
    per = list(rob["per_severity"].values())
    sev = rob.get("severities") or list(range(1, len(per[0]) + 1))
    clean = rob.get("clean", s.value("accuracy"))
    return list(sev), [clean, *np.mean(per, axis=0)]


# ---------------------------------------------------------------------------------------------
# teacher-call budget


def calls(s: Student) -> float | None:
    """Teacher calls a student used: the recorded count, else its numeric budget."""
    for v in (s.record.get("teacher_calls"), s.budget):
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def budget_figure(study: Study) -> tuple[Any, str]:
    """Student top-1 vs teacher calls (log x), one line per distillation loss and one panel per teacher."""
    teachers = [t for t in study.teacher_names if any(b != FULL for b in study.budgets(t))]
    if not teachers:
        raise NoData("no budget runs (distill.budgets has only 'full')")
    fig, axes = _subplots(1, len(teachers), figsize=(5.4 * len(teachers), 4.4), squeeze=False, sharey=True)
    multi = max(len(study.cell(t, loss, b)) for t in teachers for loss in study.losses for b in study.budgets(t)) > 1
    for ax, t in zip(axes[0], teachers, strict=True):
        ce_full = study.interval(study.cell(t, NO_TEACHER_LOSS))
        if ce_full is not None:
            ax.axhline(100 * ce_full.mean, color="0.45", ls="--", lw=1.2, label=f"{NO_TEACHER_LOSS}, all samples")
        ticks: set[float] = set()
        for loss in study.losses:
            pts = []
            for b in study.budgets(t):
                rs = study.cell(t, loss, b)
                c = [x for s in rs if (x := calls(s)) is not None]
                iv = study.interval(rs)
                if c and iv is not None:
                    pts.append((float(np.mean(c)), iv, b == FULL))
            pts.sort(key=lambda p: p[0])
            ticks |= {p[0] for p in pts}
            if not pts:
                continue
            xs = [p[0] for p in pts]
            m = [100 * p[1].mean for p in pts]
            err = (
                np.array([[100 * (p[1].mean - p[1].lo), 100 * (p[1].hi - p[1].mean)] for p in pts]).T
                if all(p[1].lo is not None for p in pts)
                else None
            )
            if loss == NO_TEACHER_LOSS:
                if len(pts) > 1:  # CE on the budget's samples only: the fair baseline of a budget point
                    ax.errorbar(xs, m, yerr=err, marker="s", ms=3, capsize=2, color="0.45", ls="--", lw=1,
                                label=f"{NO_TEACHER_LOSS}, same samples")  # fmt: skip
                continue
            color = loss_color(loss, study.losses)
            ax.errorbar(xs, m, yerr=err, marker="o", ms=4, capsize=3, color=color, label=loss)
            full = [(x, y) for (x, y, p) in zip(xs, m, pts, strict=True) if p[2]]
            if full:
                ax.plot([full[0][0]], [full[0][1]], "*", ms=13, color=color, markeredgecolor="black")
        ax.set_xscale("log")
        if ticks:
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(sorted(ticks), [_human(c) for c in sorted(ticks)])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("teacher calls (sample-views queried, log)")
        ax.set_title(f"teacher {t}  (★ = full budget)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("student top-1 (%)")
    _shared_legend(fig, axes, first=study.losses)
    fig.suptitle("Student accuracy vs teacher-call budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    caption = "Student top-1 against the teacher calls it could use" + (
        ", mean over seeds with 95% t-intervals." if multi else " (one seed per point: no intervals)."
    )
    return fig, caption


# ---------------------------------------------------------------------------------------------
# training curves


def curve_points(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]] | None:
    """(split, [(epoch, held-out accuracy)]) from a curves file: validation accuracy when recorded, else test."""
    from pipeline.evaluation.study import CURVE_KEYS

    for key, split in CURVE_KEYS:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) is not None and "epoch" in r]
        if pts:
            return split, pts
    return None


def curves_figure(study: Study, curves: dict[str, list[dict[str, Any]]]) -> tuple[Any, str]:
    """Held-out accuracy per epoch: one panel per teacher, its full-budget students overlaid (one colour per loss)."""
    teachers = [
        t for t in study.teacher_names if any(s.sid in curves for loss in study.losses for s in study.cell(t, loss))
    ]
    if not teachers:
        raise NoData("no training curves (plots/curves/<id>.json) for the full-budget students")
    fig, axes = _subplots(1, len(teachers), figsize=(4.8 * len(teachers), 4.0), squeeze=False, sharey=True)
    splits: set[str] = set()
    for ax, t in zip(axes[0], teachers, strict=True):
        for loss in study.losses:
            for k, s in enumerate(study.cell(t, loss)):
                got = curve_points(curves.get(s.sid, []))
                if got is None:
                    continue
                splits.add(got[0])
                ep, acc = zip(*got[1], strict=True)
                style = {"linestyle": "--"} if loss == NO_TEACHER_LOSS else {}
                ax.plot(ep, np.array(acc) * 100, marker="o", ms=3, color=loss_color(loss, study.losses),
                        label=loss if k == 0 else None, alpha=0.9, **style)  # fmt: skip
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"teacher {t}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    split = " / ".join(sorted(splits))
    axes[0, 0].set_ylabel(f"student {split} top-1 (%)")
    _shared_legend(fig, axes, title="loss")
    fig.suptitle("Training curves (full budget; one line per seed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig, f"Held-out ({split}) top-1 after each epoch, the students of one teacher in one panel."
