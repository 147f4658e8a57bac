"""Aggregate per-student metrics into the teacher x loss tables, a markdown report and charts.

`build_report` reads every `metrics/<teacher>-<loss>-<budget>-<seed>.json` (written by the evaluate
stage) and `data/teachers/<name>.json`, and writes into `reports/`:

- `report.md`: the student top-1 table (teacher x loss, mean ± sample std over seeds, full budget),
  a details table (top-1/top-5, teacher-student agreement, Pearson/Spearman of the logits, ECE of
  student and teacher, mean corruption accuracy), a robustness table (accuracy per corruption) and,
  when budget runs exist, a budget table;
- `accuracy.png`: student top-1 per teacher and loss (bars, std error bars);
- `teacher_capacity.png`: student top-1 per loss as the teacher gets stronger (x = the teacher's own
  test top-1, and its parameter count): the "does a stronger teacher make a better student?" question;
- `reliability.png`: reliability diagrams (Guo et al. 2017), one panel per teacher x loss, student
  bars vs the teacher's curve, seeds pooled;
- `robustness.png`: accuracy vs corruption severity (Hendrycks & Dietterich 2019), mean over
  corruptions, severity 0 = the same images uncorrupted;
- `budget.png` (only with budget runs): student top-1 vs teacher calls (log x), one line per loss,
  the full-budget and CE (no teacher) levels marked.

A figure whose data is absent (e.g. no corruption metrics) is left out rather than drawn empty.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.layout import Layout

log = logging.getLogger(__name__)

FULL = "full"
NO_TEACHER_LOSS = "ce"  # the baseline: trained on labels only, the teacher's logits unused


def load_metrics(folder: Path, only: set[str] | None = None) -> list[dict[str, Any]]:
    """Every metrics JSON in `folder` (sorted by file name); an empty folder is an error naming the fix.

    only: student ids to keep (files are `<student id>.json`); others are left out with a log line, so a
    folder holding metrics of an earlier configuration (another data set, a removed loss) cannot leak
    into the report.
    """
    paths = sorted(Path(folder).glob("*.json"))
    if only is not None:
        extra = [p.stem for p in paths if p.stem not in only]
        if extra:
            log.info("report: leaving out %d metrics file(s) not in the distill matrix: %s", len(extra), extra[:5])
        paths = [p for p in paths if p.stem in only]
    rows = [json.loads(p.read_text()) for p in paths]
    if not rows:
        raise FileNotFoundError(f"no metrics in {folder}: run the evaluate stages first (`dvc repro`)")
    return rows


def teacher_params(folder: Path, name: str, info: dict[str, Any]) -> int | None:
    """The teacher's parameter count: `params` in its JSON, else counted from its checkpoint, else None."""
    if isinstance(info.get("params"), int):
        return int(info["params"])
    ckpt = Layout.teacher_files(folder, name).checkpoint
    if not ckpt.is_file():
        return None
    try:
        from pipeline.models import count_parameters, load_checkpoint

        return count_parameters(load_checkpoint(ckpt)[0])
    except Exception as e:  # a foreign checkpoint must not break the report: the axis is just left out
        log.warning("cannot count the parameters of %s: %s", ckpt, e)
        return None


def load_teachers(folder: Path) -> dict[str, dict[str, Any]]:
    """Teacher name -> its `data/teachers/<name>.json` (test_top1, arch, ...) plus `params` when known."""
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        d = json.loads(p.read_text())
        name = d.get("teacher", p.stem)
        d.pop("history", None)  # training curves: not needed here
        d["params"] = teacher_params(Path(folder), name, d)
        out[name] = d
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """`mean ± std` (std only with more than one value), values multiplied by `scale`."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if len(values) > 1 else "")


def group(rows: list[dict[str, Any]], budget: str = FULL) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(teacher, loss) -> rows over seeds, for one budget."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if str(r.get("budget", FULL)) == budget:
            out[(r["teacher"], r["loss"])].append(r)
    return out


def loss_order(losses: set[str] | list[str]) -> list[str]:
    """CE (the no-teacher baseline) first, then alphabetical."""
    return sorted(set(losses), key=lambda x: (x != NO_TEACHER_LOSS, x))


def _vals(rs: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rs if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]


def _cell(rs: list[dict[str, Any]], key: str, scale: float = 100.0, digits: int = 2) -> str:
    vals = _vals(rs, key)
    return fmt(vals, scale, digits) if vals else ""


def _colors(losses: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {loss: cmap(i % 10) for i, loss in enumerate(losses)}


def _calls(r: dict[str, Any]) -> float | None:
    """Teacher calls a student used: the recorded count, else the numeric budget."""
    for v in (r.get("teacher_calls"), r.get("budget")):
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------------------------------
# tables


def _accuracy_table(g: dict, teachers: list[str], losses: list[str], info: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Student top-1", "", "Student top-1 accuracy (%) on the test split, mean ± std over seeds"]
    lines += ["(full budget); the teacher's architecture and own test top-1 (%) in brackets.", ""]
    lines.append("| teacher | " + " | ".join(losses) + " |")
    lines.append("|---|" + "---|" * len(losses))
    for t in teachers:
        ti = info.get(t, {})
        head = f"{t} ({ti['arch']}, {ti['test_top1'] * 100:.2f})" if "test_top1" in ti and "arch" in ti else t
        cells = [_cell(g[(t, loss)], "top1") if (t, loss) in g else "" for loss in losses]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return lines


DETAIL_COLS = [  # (metric key, header, scale, digits), after the top-k columns
    ("agreement", "agreement %", 100.0, 2),
    ("pearson", "Pearson", 1.0, 3),
    ("spearman", "Spearman", 1.0, 3),
    ("ece", "ECE", 1.0, 4),
    ("teacher_ece", "teacher ECE", 1.0, 4),
    ("corrupt_mean", "mCA %", 100.0, 2),
]


def _detail_table(g: dict, teachers: list[str], losses: list[str]) -> list[str]:
    # top-k columns as evaluated (`evaluate.topk`), then the fixed ones
    ks = sorted({int(k[3:]) for rs in g.values() for r in rs for k in r if k[:3] == "top" and k[3:].isdigit()})
    cols = [(f"top{k}", f"top-{k} %", 100.0, 2) for k in ks]
    cols += [c for c in DETAIL_COLS if any(_vals(rs, c[0]) for rs in g.values())]
    lines = ["## Details", "", "Means ± std over seeds (full budget). Agreement: student and teacher arg-max match;"]
    lines += ["Pearson/Spearman: mean per-sample correlation of student and teacher logits (CMKD's diagnostic);"]
    lines += ["ECE: 15-bin expected calibration error (Guo et al. 2017); mCA: mean corruption accuracy.", ""]
    lines.append("| teacher | loss | seeds | " + " | ".join(h for _, h, _, _ in cols) + " | teacher calls |")
    lines.append("|---|---|---|" + "---|" * (len(cols) + 1))
    for t in teachers:
        for loss in losses:
            rs = g.get((t, loss))
            if not rs:
                continue
            cells = [_cell(rs, k, s, d) for k, _, s, d in cols]
            calls = _vals(rs, "teacher_calls")
            cells.append(f"{int(np.mean(calls))}" if calls else "")
            lines.append(f"| {t} | {loss} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def _corruptions(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("corrupt/"):
                seen.setdefault(k.split("/", 1)[1])
    return list(seen)


def _robustness_table(g: dict, teachers: list[str], losses: list[str], names: list[str]) -> list[str]:
    lines = ["## Robustness", "", "Accuracy (%) on CIFAR-C-style corrupted test images (Hendrycks & Dietterich 2019),"]
    lines += ["mean over severities, then over seeds; clean = the same images uncorrupted;"]
    lines += ["mCA = mean corruption accuracy (over corruptions).", ""]
    lines.append("| teacher | loss | clean | " + " | ".join(n.replace("_", " ") for n in names) + " | mCA |")
    lines.append("|---|---|---|" + "---|" * (len(names) + 1))
    for t in teachers:
        for loss in losses:
            rs = g.get((t, loss))
            if not rs or not _vals(rs, "corrupt_mean"):
                continue
            cells = [_cell(rs, "corrupt_clean", 100.0, 1)] + [_cell(rs, f"corrupt/{n}", 100.0, 1) for n in names]
            cells.append(f"**{_cell(rs, 'corrupt_mean', 100.0, 1)}**")
            lines.append(f"| {t} | {loss} | " + " | ".join(cells) + " |")
    return lines


def _budget_table(rows: list[dict[str, Any]]) -> list[str]:
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["teacher"], r["loss"], str(r.get("budget", FULL)))].append(r)

    def key(k: tuple[str, str, str]) -> tuple:
        calls = [c for c in (_calls(r) for r in by[k]) if c is not None]
        return (k[0], loss_order([x[1] for x in by]).index(k[1]), float(np.mean(calls)) if calls else np.inf)

    lines = ["## Teacher-call budget", "", "Student top-1 (%) by the number of teacher calls it could use.", ""]
    lines += ["| teacher | loss | budget | teacher calls | seeds | top-1 % | agreement % |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for k in sorted(by, key=key):
        rs = by[k]
        calls = [c for c in (_calls(r) for r in rs) if c is not None]
        c = f"{int(np.mean(calls))}" if calls else ""
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {c} | {len(rs)} | {_cell(rs, 'top1')} | {_cell(rs, 'agreement')} |")
    return lines


# ---------------------------------------------------------------------------------------------
# figures


def _human(n: float) -> str:
    """12500 -> '12.5k', 2000000 -> '2M', 250 -> '250'."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _tick_teachers(ax: Any, xs: dict[str, float], human: bool) -> None:
    """Label the x axis at the teachers' own positions: '<name>\n<value>' (no minor tick labels on a log axis)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(list(xs.values()), [f"{t}\n{_human(v) if human else f'{v:.1f}'}" for t, v in xs.items()])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(xs) == 1:  # one point: give the axis some room instead of a degenerate range
        v = next(iter(xs.values()))
        if human:
            ax.set_xlim(v / 2, v * 2)
        else:
            ax.set_xlim(v - 5, v + 5)


def _tick_calls(ax: Any, calls: list[float]) -> None:
    from matplotlib.ticker import NullFormatter

    if calls:
        ax.set_xticks(calls, [_human(c) for c in calls])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(fig)
    log.info("wrote %s", path)


def plot_accuracy(g: dict, teachers: list[str], losses: list[str], path: Path) -> None:
    """Bars: student top-1 per loss, one bar per teacher, std over seeds as error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 1.2 * len(losses) * max(1, len(teachers)) / 2), 4))
    width = 0.8 / max(1, len(teachers))
    x = np.arange(len(losses))
    lo, hi = [], []
    for k, t in enumerate(teachers):
        ms = [mean_std(_vals(g[(t, loss)], "top1")) if (t, loss) in g else (np.nan, 0.0) for loss in losses]
        lo += [(m - s) * 100 for m, s in ms if np.isfinite(m)]
        hi += [(m + s) * 100 for m, s in ms if np.isfinite(m)]
        ax.bar(
            x + k * width,
            [m * 100 for m, _ in ms],
            width,
            yerr=[s * 100 for _, s in ms],
            label=f"teacher {t}",
            capsize=3,
        )
    if lo:  # zoom on the bars' range (differences between losses are often a few points)
        pad = max(1.0, 0.1 * (max(hi) - min(lo)))
        ax.set_ylim(max(0.0, min(lo) - 3 * pad), min(100.0, max(hi) + pad))
    ax.set_xticks(x + width * (len(teachers) - 1) / 2, losses)
    ax.set_ylabel("student top-1 (%)")
    ax.set_title("Student accuracy per teacher and loss (full budget)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_teacher_capacity(
    g: dict, teachers: list[str], losses: list[str], info: dict[str, dict[str, Any]], path: Path
) -> bool:
    """Student top-1 per loss vs teacher strength: x = teacher test top-1 (left), teacher parameters (right, log).

    One line per loss through the teachers sorted by x; error bars = std over seeds. Returns False
    (and draws nothing) when no teacher has a known test accuracy.
    """
    import matplotlib.pyplot as plt

    def t_top1(t: str) -> float | None:
        if "test_top1" in info.get(t, {}):
            return float(info[t]["test_top1"])
        vals = [v for loss in losses for v in _vals(g.get((t, loss), []), "teacher_top1")]
        return float(np.mean(vals)) if vals else None

    axes_spec = [("teacher test top-1 (%)", {t: v * 100 for t in teachers if (v := t_top1(t)) is not None}, False)]
    params = {t: float(info[t]["params"]) for t in teachers if info.get(t, {}).get("params")}
    if params:
        axes_spec.append(("teacher parameters", params, True))
    if not axes_spec[0][1]:
        return False
    colors = _colors(losses)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.2 * len(axes_spec), 4.2), squeeze=False, sharey=True)
    for ax, (xlabel, xs, logx) in zip(axes[0], axes_spec, strict=True):
        ts = sorted(xs, key=xs.get)
        for loss in losses:
            pts = [(xs[t], *mean_std(_vals(g[(t, loss)], "top1"))) for t in ts if _vals(g.get((t, loss), []), "top1")]
            if not pts:
                continue
            px, m, s = (np.array(v) for v in zip(*pts, strict=True))
            style = {"linestyle": "--"} if loss == NO_TEACHER_LOSS else {}
            ax.errorbar(px, m * 100, yerr=s * 100, marker="o", capsize=3, color=colors[loss], label=loss, **style)
        if logx:
            ax.set_xscale("log")
        _tick_teachers(ax, {t: xs[t] for t in ts}, human=logx)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("student top-1 (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Does a stronger teacher make a better student?")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)
    return True


def _pool_reliability(rs: list[dict[str, Any]], who: str) -> dict[str, np.ndarray] | None:
    """Sum bin counts over seeds; accuracy/confidence as count-weighted means."""
    parts = [r["reliability"][who] for r in rs if isinstance(r.get("reliability"), dict) and who in r["reliability"]]
    if not parts:
        return None
    count = np.sum([np.asarray(p["count"], dtype=np.float64) for p in parts], axis=0)
    acc = np.sum([np.nan_to_num(np.asarray(p["accuracy"], dtype=np.float64)) * p["count"] for p in parts], axis=0)
    conf = np.sum([np.nan_to_num(np.asarray(p["confidence"], dtype=np.float64)) * p["count"] for p in parts], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "accuracy": acc / count, "confidence": conf / count}


def plot_reliability(g: dict, teachers: list[str], losses: list[str], path: Path) -> bool:
    """Reliability diagrams, rows = teachers, columns = losses: student accuracy per confidence bin (bars)
    vs the teacher's (line), the diagonal = perfect calibration; panel titles give both ECEs."""
    import matplotlib.pyplot as plt

    cells = [(t, loss) for t in teachers for loss in losses if any("reliability" in r for r in g.get((t, loss), []))]
    if not cells:
        return False
    rows_t = [t for t in teachers if any(c[0] == t for c in cells)]
    fig, axes = plt.subplots(
        len(rows_t),
        len(losses),
        figsize=(2.6 * len(losses), 2.6 * len(rows_t) + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, t in enumerate(rows_t):
        for j, loss in enumerate(losses):
            ax = axes[i, j]
            rs = g.get((t, loss), [])
            s = _pool_reliability(rs, "student")
            if s is None:
                ax.set_axis_off()
                continue
            m = len(s["count"])
            edges = np.asarray(rs[0]["reliability"].get("edges", np.linspace(0, 1, m + 1)))
            centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
            ok = s["count"] > 0
            ax.bar(
                centres[ok],
                s["accuracy"][ok],
                width[ok],
                color="tab:blue",
                alpha=0.75,
                edgecolor="white",
                label="student",
            )
            gap = s["confidence"][ok] - s["accuracy"][ok]  # > 0: overconfident, < 0: underconfident
            ax.bar(
                centres[ok],
                gap,
                width[ok],
                bottom=s["accuracy"][ok],
                facecolor="none",
                edgecolor="tab:red",
                hatch="////",
                lw=0.6,
                label="gap to confidence",
            )
            tt = _pool_reliability(rs, "teacher")
            if tt is not None:
                tok = tt["count"] > 0
                ax.plot(centres[tok], tt["accuracy"][tok], "o-", color="black", ms=3, lw=1.2, label="teacher")
            ax.plot([0, 1], [0, 1], ":", color="0.4", lw=1)
            title = f"{t} / {loss}\nECE {np.mean(_vals(rs, 'ece')):.3f}"
            if _vals(rs, "teacher_ece"):
                title += f" (teacher {np.mean(_vals(rs, 'teacher_ece')):.3f})"
            ax.set_title(title, fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("confidence", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=8)
    handles, labels = next(a.get_legend_handles_labels() for a in axes.flat if a.get_legend_handles_labels()[0])
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Reliability diagrams (15 bins, seeds pooled)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path)
    return True


def plot_robustness(g: dict, teachers: list[str], losses: list[str], path: Path) -> bool:
    """Accuracy vs corruption severity (mean over corruptions and seeds), one panel per teacher, one line per loss."""
    import matplotlib.pyplot as plt

    have = [t for t in teachers if any(_vals(g.get((t, loss), []), "corrupt_mean") for loss in losses)]
    if not have:
        return False
    colors = _colors(losses)
    fig, axes = plt.subplots(1, len(have), figsize=(4.6 * len(have), 3.8), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], have, strict=True):
        for loss in losses:
            rs = [r for r in g.get((t, loss), []) if isinstance(r.get("corrupt_severity"), dict)]
            if not rs:
                continue
            n_sev = len(next(iter(rs[0]["corrupt_severity"].values())))
            sev = rs[0].get("corrupt_severities") or list(range(1, n_sev + 1))
            # per seed: mean over corruptions at each severity, then mean/std over seeds
            curves = np.array([np.mean(list(r["corrupt_severity"].values()), axis=0) for r in rs])  # (seeds, S)
            clean = [r.get("corrupt_clean", r.get("top1")) for r in rs]
            x = [0, *sev]
            y = np.column_stack([clean, curves]) * 100
            style = {"linestyle": "--"} if loss == NO_TEACHER_LOSS else {}
            ax.errorbar(
                x,
                y.mean(0),
                yerr=y.std(0, ddof=1) if len(y) > 1 else None,
                marker="o",
                ms=3,
                capsize=2,
                color=colors[loss],
                label=loss,
                **style,
            )
        ax.set_title(f"teacher {t}", fontsize=9)
        ax.set_xlabel("severity (0 = clean)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("student accuracy (%), mean over corruptions")
    axes[0, -1].legend(fontsize=8, title="loss")
    fig.suptitle("Robustness to common corruptions")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_budget(rows: list[dict[str, Any]], teachers: list[str], losses: list[str], path: Path) -> bool:
    """Student top-1 vs teacher calls (log x), one line per distillation loss and one panel per teacher.

    Stars mark the full-budget run (its level also drawn as a faint dotted line). CE (no teacher) is
    the grey dashed level any distillation must beat; CE runs at a budget (trained on the same
    subset of samples, without the teacher's logits) are drawn as a grey line: the fair baseline for
    a budget point. Returns False without budget runs.
    """
    import matplotlib.pyplot as plt

    budget_teachers = sorted({r["teacher"] for r in rows if str(r.get("budget", FULL)) != FULL})
    if not budget_teachers:
        return False
    colors = _colors(losses)
    fig, axes = plt.subplots(
        1, len(budget_teachers), figsize=(5.2 * len(budget_teachers), 4.2), squeeze=False, sharey=True
    )
    for ax, t in zip(axes[0], budget_teachers, strict=True):
        trs = [r for r in rows if r["teacher"] == t]
        ce = _vals([r for r in trs if r["loss"] == NO_TEACHER_LOSS and str(r.get("budget", FULL)) == FULL], "top1")
        if ce:
            ax.axhline(np.mean(ce) * 100, color="0.45", ls="--", lw=1.2, label=f"{NO_TEACHER_LOSS}, all samples")
        for loss in losses:
            by: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in trs:
                if r["loss"] == loss:
                    by[str(r.get("budget", FULL))].append(r)
            pts = []
            for b, rs in by.items():
                calls = [c for c in (_calls(r) for r in rs) if c is not None]
                if calls and _vals(rs, "top1"):
                    pts.append((float(np.mean(calls)), *mean_std(_vals(rs, "top1")), b == FULL))
            pts.sort()
            if loss == NO_TEACHER_LOSS:
                if len(pts) > 1:  # CE on the budget's samples only
                    x, m, s, _ = (np.array(v) for v in zip(*pts, strict=True))
                    ax.errorbar(
                        x,
                        m * 100,
                        yerr=s * 100,
                        marker="s",
                        ms=3,
                        capsize=2,
                        color="0.45",
                        ls="--",
                        lw=1,
                        label=f"{NO_TEACHER_LOSS}, same samples",
                    )
                continue
            if not pts:
                continue
            x, m, s, full = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(x, m * 100, yerr=s * 100, marker="o", ms=4, capsize=3, color=colors[loss], label=loss)
            if full.any():
                ax.plot(x[full], m[full] * 100, "*", ms=13, color=colors[loss], markeredgecolor="black")
                ax.axhline(m[full][0] * 100, color=colors[loss], ls=":", lw=0.8, alpha=0.7)
        ax.set_xscale("log")
        _tick_calls(ax, sorted({c for r in trs if (c := _calls(r)) is not None}))
        ax.set_xlabel("teacher calls (sample-views queried)")
        ax.set_title(f"teacher {t}  (★ = full budget)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("student top-1 (%)")
    handles, labels = {}, []
    for ax in axes[0]:  # one legend for all panels, below them (never over the data)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend(
        [handles[lab] for lab in labels],
        labels,
        loc="lower center",
        ncol=min(6, len(labels)),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Student accuracy vs teacher-call budget")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# the report


def build_report(
    metrics_dir: Path,
    teachers_dir: Path,
    out_dir: Path,
    title: str = "kdcache report",
    only: set[str] | None = None,
) -> Path:
    """Write `out_dir/report.md` and its PNGs from the metrics and teacher JSONs; returns the report's path.

    only: the student ids to report (default: every metrics file).
    """
    import matplotlib

    matplotlib.use("Agg")

    rows = load_metrics(Path(metrics_dir), only)
    info = load_teachers(Path(teachers_dir)) if Path(teachers_dir).exists() else {}
    g = group(rows)
    teachers = sorted({r["teacher"] for r in rows})
    losses = loss_order({r["loss"] for r in rows})
    g_teachers = [t for t in teachers if any((t, loss) in g for loss in losses)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a figure whose data went away must not linger in the report folder
        old.unlink()

    seeds = sorted({str(r.get("seed", "?")) for r in rows})
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} students: {len(teachers)} teacher(s) x {len(losses)} loss(es), "
        f"seeds {', '.join(seeds)}. Regenerate with `dvc repro`; compare two students with "
        "`kdcache compare metrics/a.json metrics/b.json`.",
        "",
    ]
    if g:
        lines += _accuracy_table(g, g_teachers, losses, info)
        plot_accuracy(g, g_teachers, losses, out_dir / "accuracy.png")
        lines += ["", "![student accuracy per teacher and loss](accuracy.png)", ""]
        lines += _detail_table(g, g_teachers, losses)
        lines.append("")
        if plot_teacher_capacity(g, g_teachers, losses, info, out_dir / "teacher_capacity.png"):
            lines += [
                "## Stronger teachers",
                "",
                "Student top-1 per loss as the teacher's own accuracy (left) and "
                "size (right) grow; dashed: CE, which ignores the teacher.",
                "",
                "![student accuracy vs teacher capacity](teacher_capacity.png)",
                "",
            ]
        if plot_reliability(g, g_teachers, losses, out_dir / "reliability.png"):
            lines += [
                "## Calibration",
                "",
                "Bars: student accuracy per confidence bin (red: confidence above "
                "accuracy = overconfidence); line: the teacher; dotted: perfect calibration.",
                "",
                "![reliability diagrams](reliability.png)",
                "",
            ]
        names = _corruptions([r for rs in g.values() for r in rs])
        if names:
            lines += _robustness_table(g, g_teachers, losses, names)
            lines.append("")
            if plot_robustness(g, g_teachers, losses, out_dir / "robustness.png"):
                lines += ["![accuracy vs corruption severity](robustness.png)", ""]
    if any(str(r.get("budget", FULL)) != FULL for r in rows):
        lines += _budget_table(rows)
        lines.append("")
        if plot_budget(rows, teachers, losses, out_dir / "budget.png"):
            lines += ["![student accuracy vs teacher calls](budget.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
