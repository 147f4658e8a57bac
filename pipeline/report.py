"""Aggregate per-student metrics into the teacher x loss table, a markdown report and charts."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def load_metrics(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not rows:
        raise FileNotFoundError(f"no metrics in {folder}: run the evaluate stages first (`dvc repro`)")
    return rows


def load_teachers(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(folder.glob("*.json")):
        d = json.loads(p.read_text())
        out[d["teacher"]] = d
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if len(values) > 1 else "")


def group(rows: list[dict[str, Any]], budget: str = "full") -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(teacher, loss) -> rows over seeds, for one budget."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if str(r.get("budget", "full")) == budget:
            out[(r["teacher"], r["loss"])].append(r)
    return out


def build_report(metrics_dir: Path, teachers_dir: Path, out_dir: Path, title: str = "kdcache report") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_metrics(metrics_dir)
    teachers_info = load_teachers(teachers_dir) if teachers_dir.exists() else {}
    g = group(rows)
    teachers = sorted({t for t, _ in g})
    losses = sorted({loss for _, loss in g}, key=lambda x: (x != "ce", x))
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {title}", "", "Student top-1 accuracy (%) on the test split, mean ± std over seeds (full budget).", ""]
    lines.append("| teacher (top-1) | " + " | ".join(losses) + " |")
    lines.append("|---|" + "---|" * len(losses))
    for t in teachers:
        ti = teachers_info.get(t, {})
        head = f"{t} ({ti['arch']}, {ti['test_top1'] * 100:.2f})" if ti else t
        cells = [fmt([r["top1"] for r in g[(t, loss)]]) if (t, loss) in g else "" for loss in losses]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    lines += ["", "Details per student (means over seeds):", ""]
    cols = ["top1", "top5", "agreement", "ece", "teacher_calls"]
    lines.append("| teacher | loss | seeds | " + " | ".join(cols) + " |")
    lines.append("|---|---|---|" + "---|" * len(cols))
    for t in teachers:
        for loss in losses:
            rs = g.get((t, loss))
            if not rs:
                continue
            cells = []
            for c in cols:
                vals = [r[c] for r in rs if c in r]
                if not vals:
                    cells.append("")
                elif c == "teacher_calls":
                    cells.append(f"{int(np.mean(vals))}")
                else:
                    cells.append(fmt(vals, 100.0 if c != "ece" else 1.0, 2 if c != "ece" else 4))
            lines.append(f"| {t} | {loss} | {len(rs)} | " + " | ".join(cells) + " |")

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(losses) * max(1, len(teachers)) / 2, 4))
    width = 0.8 / max(1, len(teachers))
    x = np.arange(len(losses))
    for k, t in enumerate(teachers):
        ms = [mean_std([r["top1"] for r in g[(t, loss)]]) if (t, loss) in g else (np.nan, 0.0) for loss in losses]
        ax.bar(
            x + k * width,
            [m * 100 for m, _ in ms],
            width,
            yerr=[s * 100 for _, s in ms],
            label=f"teacher {t}",
            capsize=3,
        )
    vals = [r["top1"] * 100 for r in rows]
    ax.set_ylim(max(0, min(vals) - 5), min(100, max(vals) + 3))
    ax.set_xticks(x + width * (len(teachers) - 1) / 2, losses)
    ax.set_ylabel("student top-1 (%)")
    ax.set_title("Student accuracy per teacher and loss")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    lines += ["", "![student accuracy per teacher and loss](accuracy.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
