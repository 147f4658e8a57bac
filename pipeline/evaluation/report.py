"""The report: every student and teacher record of a run in tables with their uncertainty, figures, and its origin.

`build_report` reads a `Study` (`pipeline.evaluation.study`: the records, the manifest, the per-image
predictions), and writes into `reports/`:

- `report.md`: a header saying what it is about (data set, classes, split sizes and image size from the
  manifest; the commit and the params that differ from it; why one seed makes no verdict; the runs whose
  `epochs` `min_steps` raised), warnings first (every teacher warning, every loss significantly below CE,
  students or predictions missing), the teachers, the student top-1 table (mean ± std over seeds; **bold**
  only for a loss significantly better than every other loss of its row, which takes two or more seeds), the
  paired comparisons of each loss with CE and KD on the same test images (difference, 95% interval, p-value,
  the test named; starred only across seeds), details (top-k, agreement, correlations, ECE, mCA), robustness
  and, with budget runs, the budget table; every figure of `pipeline.evaluation.figures` with its caption, or
  the reason it is missing;
- `report.html`: the same, self-contained (figures embedded), so it opens offline;
- `plots/curves.json`, `plots/budget.json`: the data of the `dvc plots` overlays declared in dvc.yaml
  (`.dvc/plots/*.json` templates: the students of one teacher in one plot, and the budget curve).

Statistics: 95% t-intervals over seeds (`stats.mean_ci`), McNemar's mid-p test with one seed and a paired
bootstrap over test images with several (`stats.paired_comparison`): see `pipeline.evaluation.stats` for why.
Only the test over several seeds makes a verdict (a star, bold, a "significantly below CE" warning): with one
seed per method the report shows the differences and says why none is called significant (`ONE_RUN_NOTE`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.evaluation import figures as F
from pipeline.evaluation.provenance import Provenance, provenance
from pipeline.evaluation.stats import BOOTSTRAP, MCNEMAR, MIN_SEEDS, Interval, Paired
from pipeline.evaluation.study import (
    ALPHA,
    CE_MARGIN,
    FULL,
    HINTON_LOSS,
    NO_TEACHER_LOSS,
    Student,
    Study,
    load_study,
)

log = logging.getLogger(__name__)

TEST_NOTE = (
    f"p: two-sided, {BOOTSTRAP} over test images (each image with all its seeds) with several seeds, * = p < 0.05; "
    f"with one seed, {MCNEMAR} test on per-image correctness, never starred (it describes that run, not the "
    "method); intervals: 95% paired bootstrap. Unadjusted for the number of comparisons."
)

ONE_RUN_NOTE = (
    "McNemar's test on one training run per method measures that run (these two networks on these test images), "
    "not the method: another seed, or the same seed on a CPU with other kernels, trains other networks and can flip "
    "the verdict. Differences, intervals and p-values are shown as a description of the run; stars and **bold** "
    f"come only from the paired test over {MIN_SEEDS} or more seeds (`dvc exp run -S 'distill.seeds=[0,1,2]'`)."
)


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_iv(iv: Interval | None, scale: float = 100.0, digits: int = 2) -> str:
    """`mean ± std` over seeds (std only with two or more seeds), scaled; '' for no value."""
    if iv is None:
        return ""
    s = f"{iv.mean * scale:.{digits}f}"
    return s + (f" ± {iv.std * scale:.{digits}f}" if iv.std is not None else "")


def fmt_ci(iv: Interval | None, scale: float = 100.0, digits: int = 2) -> str:
    """`[lo, hi]`, the 95% t-interval over seeds, or '—' with one seed."""
    if iv is None or iv.lo is None:
        return "—"
    return f"[{iv.lo * scale:.{digits}f}, {iv.hi * scale:.{digits}f}]"


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_paired(p: Paired | None) -> str:
    """`+0.51 [-0.12, +1.10], p 0.034` in points (A minus B); '—' when there is no paired data."""
    if p is None:
        return "—"
    star = " *" if p.significant(ALPHA) else ""
    return f"{100 * p.diff:+.2f} [{100 * p.lo:+.2f}, {100 * p.hi:+.2f}], p {fmt_p(p.p)}{star}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _seeds_note(study: Study, budget: str = FULL) -> str:
    n = sorted(study.seed_counts(budget))
    if not n:
        return "no seeds"
    if len(n) == 1:
        return f"{n[0]} seed{'s' if n[0] > 1 else ''} per number"
    return f"{n[0]} to {n[-1]} seeds per number (the `seeds` column or `n=` says which)"


# ---------------------------------------------------------------------------------------------
# sections


def _header(study: Study, title: str, prov: Provenance | None) -> list[str]:
    d = study.data
    n_t, n_l = len(study.teacher_names), len(study.losses)
    seeds = sorted({s.seed for s in study.students})
    lines = [
        f"# {title}",
        "",
        f"**Data set** `{d.name}`: {d.describe()} (manifest `{d.sha256[:12]}`).",
        "",
        f"{len(study.students)} students: {n_t} teacher(s) x {n_l} loss(es), budgets "
        f"{', '.join(study.budgets())}, seeds {', '.join(map(str, seeds))}; {_seeds_note(study)}. "
        "Regenerate with `dvc repro`; compare two students with `kdcache compare metrics/a.json metrics/b.json`.",
        "",
        *_one_run_note(study),
        *_raised_note(study),
    ]
    if prov is None:
        return lines
    if prov.commit is None:
        lines += [f"**Made from**: {prov.note}.", ""]
        return lines
    dirty = f", with uncommitted changes to {', '.join(prov.dirty)}" if prov.dirty else ""
    lines.append(f"**Made from** commit `{prov.commit}`{dirty}.")
    if prov.note:
        lines += ["", prov.note + "."]
    elif prov.params_diff:
        lines += ["Params that differ from that commit's params.yaml:", ""]
        lines += _table(
            ["param", "this report", "commit"],
            [[f"`{k}`", f"`{json.dumps(a)}`", f"`{json.dumps(b)}`"] for k, a, b in prov.params_diff],
        )
    else:
        lines.append("params.yaml as committed.")
    return [*lines, ""]


def _one_run_note(study: Study) -> list[str]:
    """Why no comparison of a one-seed cell is called significant (all cells, or how many)."""
    single = study.single_seed_cells()
    if not single:
        return []
    if set().union(*(study.seed_counts(b) for b in study.budgets())) == {1}:
        head = "**One seed per method: no comparison is marked significant.**"
    else:
        head = f"**{single} cell(s) with one seed: their comparisons are not marked significant.**"
    return [f"{head} {ONE_RUN_NOTE}", ""]


def _raised_note(study: Study) -> list[str]:
    """The runs `min_steps` made longer than their `epochs` asked (a `dvc exp run -S ...epochs=1` that trained 3)."""
    raised = study.raised_schedules()
    if not raised:
        return []
    lines = [
        "**Schedules raised by `min_steps`**: these runs asked for fewer optimizer steps than `min_steps` on this "
        "data, so they trained for more epochs than `epochs` says (set `min_steps: 0`, or `steps: N`, for an exact "
        "length):",
        "",
    ]
    for rule, who in raised.items():
        more = ", ..." if len(who) > 6 else ""
        lines.append(f"- `{rule}`: {len(who)} run(s) ({', '.join(who[:6])}{more})")
    return [*lines, ""]


def teacher_warnings(study: Study) -> dict[str, list[str]]:
    """Every warning about each teacher the report shows: the ones in its record (`train_teacher`'s checks) and the
    report's own comparison with a CE student (`Study.weak_teachers`). The Warnings section lists them and the
    Teachers table counts them, so the two never disagree."""
    out = {t: [f"teacher **{t}**: {w}" for w in te.warnings] for t, te in study.teachers.items()}
    for t, acc, ce in study.weak_teachers():
        where = f"validation top-1 {100 * acc:.2f} vs {100 * ce:.2f} for a student trained on labels alone"
        if ce + CE_MARGIN > 1.0:  # nothing left above the CE student: a longer or stronger teacher cannot help
            msg = (
                f"teacher **{t}** cannot beat a CE student on this data: {where}, at the 100% ceiling; no teacher "
                "has anything left to teach here, so training it longer will not help, and the loss comparisons "
                "below tell runs apart by a few images at most: compare losses on a harder data set"
            )
        else:
            msg = (
                f"teacher **{t}** is no better than a CE student: {where}; distilling from it can only teach its "
                f"mistakes: train it longer (teachers.{t}.steps) or bring a stronger one"
            )
        out.setdefault(t, []).append(msg)
    return out


def _warnings(study: Study) -> list[str]:
    items = []
    by_teacher = teacher_warnings(study)
    for t in study.teacher_names:
        if t not in study.teachers:
            items.append(f"teacher **{t}**: no record in metrics/teachers: its accuracy and warnings are unknown")
        items += by_teacher.get(t, [])
    for t, loss, p in study.below_ce():
        items.append(
            f"**{loss}** with teacher {t} is significantly *below* CE: {100 * p.diff:+.2f} points "
            f"[{100 * p.lo:+.2f}, {100 * p.hi:+.2f}] over {p.seeds} seed(s), {p.test} p {fmt_p(p.p)}"
        )
    if study.missing:
        more = ", ..." if len(study.missing) > 8 else ""
        items.append(
            f"{len(study.missing)} student(s) of the matrix have no metrics: {', '.join(study.missing[:8])}{more}"
        )
    if study.no_predictions:
        more = ", ..." if len(study.no_predictions) > 8 else ""
        items.append(
            f"no per-image predictions (plots/confusion/<id>.csv) for {len(study.no_predictions)} student(s) "
            f"({', '.join(study.no_predictions[:8])}{more}): their paired tests are left out"
        )
    if not items:
        return []
    return ["## Warnings", "", *[f"- {w}" for w in items], ""]


def _teachers(study: Study) -> list[str]:
    rows = []
    warnings = teacher_warnings(study)
    for t in study.teacher_names:
        te = study.teachers.get(t)
        if te is None:
            rows.append([t, "", "", "", "", "no record"])
            continue
        rows.append(
            [
                t,
                te.arch or "",
                f"{te.params:,}" if te.params else "",
                f"{100 * te.accuracy:.2f}" if te.accuracy is not None else "",
                f"{100 * te.val_accuracy:.2f}" if te.val_accuracy is not None else "",
                str(len(warnings.get(t, []))),
            ]
        )
    return [
        "## Teachers",
        "",
        "Each teacher's own top-1 (%), computed once by `train_teacher` (metrics/teachers/<t>.json); every table and",
        "figure uses this number. Warnings: how many of the report's warnings are about the teacher.",
        "",
        *_table(["teacher", "architecture", "parameters", "test top-1", "val top-1", "warnings"], rows),
        "",
    ]


def _top1_table(study: Study) -> list[str]:
    losses = study.losses
    uniform = len(study.seed_counts()) == 1
    spread = "mean ± std over seeds" if max(study.seed_counts()) > 1 else "one run each"
    rows = []
    for t in study.teacher_names:
        best = study.significantly_best(t)
        cells = []
        for loss in losses:
            rs = study.cell(t, loss)
            c = fmt_iv(study.interval(rs))
            if c and not uniform:
                c += f" (n={len(rs)})"
            cells.append(f"**{c}**" if c and loss == best else c)
        acc = study.teacher_accuracy(t)
        head = f"{t} ({100 * acc:.2f})" if acc is not None else t
        rows.append([head, *cells])
    return [
        "## Student top-1",
        "",
        f"Student top-1 (%) on the test split, full budget, {spread} ({_seeds_note(study)}); the",
        "teacher's own top-1 in brackets. **Bold**: the row's best loss when it is significantly better than *every*",
        f"other loss of the row (each paired test at {ALPHA:.0%}, two-sided: the {BOOTSTRAP} over {MIN_SEEDS} or more",
        "seeds; requiring all of them is an intersection-union test, so no multiplicity correction). No bold: no loss",
        "is significantly best, or one seed per loss, which makes no verdict (one training run measures that run).",
        "",
        *_table(["teacher", *losses], rows),
        "",
    ]


def _paired_table(study: Study, budget: str = FULL) -> list[str]:
    rows = []
    refs = [r for r in (NO_TEACHER_LOSS, HINTON_LOSS) if r in study.losses]
    for t in study.teacher_names:
        for loss in study.losses:
            rs = study.cell(t, loss, budget)
            if not rs:
                continue
            iv = study.interval(rs)
            cells = [t, loss, str(len(rs)), fmt_iv(iv), fmt_ci(iv)]
            cells += ["" if loss == ref else fmt_paired(study.paired(t, loss, ref, budget)) for ref in refs]
            rows.append(cells)
    if not refs:
        return []
    return [
        "## Paired comparisons",
        "",
        f"Each loss against {' and '.join(f'`{r}`' for r in refs)} with the same teacher, budget and seeds, on the",
        "same test images: top-1 difference in points (loss minus reference) [95% interval], p-value; * = p < 0.05",
        f"over {MIN_SEEDS} or more seeds.",
        f"The 95% CI column is the t-interval over seeds ('—' with one seed). {TEST_NOTE}",
        "",
        *_table(["teacher", "loss", "seeds", "top-1 %", "95% CI", *[f"vs {r}" for r in refs]], rows),
        "",
    ]


DETAIL_COLS = [  # (record key, header, scale, digits), after the top-k columns
    ("agreement", "agreement %", 100.0, 2),
    ("teacher.pearson", "Pearson", 1.0, 3),
    ("teacher.spearman", "Spearman", 1.0, 3),
    ("ece", "ECE", 1.0, 4),
    ("teacher.ece", "teacher ECE", 1.0, 4),
    ("mca", "mCA %", 100.0, 2),
]


def _cost(costs: dict[str, float], t: str, calls: list[int]) -> list[str]:
    """The cost column's cell: the mean calls a student of teacher `t` used times its price per call."""
    if not any(costs.values()):
        return []
    return [f"{sum(calls) / len(calls) * costs.get(t, 0.0):.2f}" if calls and costs.get(t) else ""]


def _details_table(study: Study, costs: dict[str, float]) -> list[str]:
    full = [s for s in study.students if s.budget == FULL]
    ks = sorted({int(k[3:]) for s in full for k in (s.record.get("test") or {}) if k[:3] == "top" and k[3:].isdigit()})
    cols = [("accuracy", "top-1 %", 100.0, 2)] + [(f"test.top{k}", f"top-{k} %", 100.0, 2) for k in ks]
    cols += [c for c in DETAIL_COLS if study.values(full, c[0])]
    rows = []
    for t in study.teacher_names:
        for loss in study.losses:
            rs = study.cell(t, loss)
            if not rs:
                continue
            cells = [fmt_iv(study.interval(rs, k), s, d) for k, _, s, d in cols]
            c = [x for r in rs if (x := F.calls(r)) is not None]
            rows.append([t, loss, str(len(rs)), *cells, f"{int(sum(c) / len(c))}" if c else "", *_cost(costs, t, c)])
    return [
        "## Details",
        "",
        "Means ± std over seeds (full budget). Agreement: student and teacher arg-max match; Pearson/Spearman: mean",
        "per-sample correlation of student and teacher logits (CMKD's diagnostic); ECE: 15-bin expected calibration",
        "error (Guo et al. 2017) of the student and of the teacher's cached logits; mCA: mean corruption accuracy.",
        "",
        *_cost_note(costs),
        *_table(["teacher", "loss", "seeds", *[h for _, h, _, _ in cols], "teacher calls", *_cost_head(costs)], rows),
        "",
    ]


def _corruptions(students: list[Student]) -> list[str]:
    seen: dict[str, None] = {}
    for s in students:
        for name in (s.record.get("robustness") or {}).get("per_corruption") or {}:
            seen.setdefault(name)
    return list(seen)


def _robustness_table(study: Study) -> list[str]:
    full = [s for s in study.students if s.budget == FULL]
    names = _corruptions(full)
    if not names:
        return []
    rows = []
    for t in study.teacher_names:
        for loss in study.losses:
            rs = study.cell(t, loss)
            if not study.values(rs, "mca"):
                continue
            cells = [fmt_iv(study.interval(rs, "robustness.clean"), 100.0, 1)]
            cells += [fmt_iv(study.interval(rs, f"robustness.per_corruption.{n}"), 100.0, 1) for n in names]
            cells.append(fmt_iv(study.interval(rs, "mca"), 100.0, 1))
            rows.append([t, loss, str(len(rs)), *cells])
    return [
        "## Robustness",
        "",
        "Accuracy (%) on CIFAR-C-style corrupted test images (Hendrycks & Dietterich 2019), mean over severities,",
        "then mean ± std over seeds; clean = the same images uncorrupted; mCA = mean corruption accuracy. These",
        "images are a subset without per-image records, so no test ranks the losses here.",
        "",
        *_table(["teacher", "loss", "seeds", "clean", *[n.replace("_", " ") for n in names], "mCA"], rows),
        "",
    ]


def _cost_head(costs: dict[str, float]) -> list[str]:
    return ["cost"] if any(costs.values()) else []


def _cost_note(costs: dict[str, float]) -> list[str]:
    if not any(costs.values()):
        return []
    priced = ", ".join(f"{t} {c:g}" for t, c in sorted(costs.items()) if c)
    return [f"Cost: the teacher calls a student used times the price per call (`cost_per_call`: {priced}).", ""]


def _budget_table(study: Study, costs: dict[str, float]) -> list[str]:
    rows = []
    for t in study.teacher_names:
        for loss in study.losses:
            for b in study.budgets(t):
                rs = study.cell(t, loss, b)
                if not rs:
                    continue
                iv = study.interval(rs)
                c = [x for r in rs if (x := F.calls(r)) is not None]
                vs = "" if loss == NO_TEACHER_LOSS else fmt_paired(study.paired(t, loss, NO_TEACHER_LOSS, b))
                agree = fmt_iv(study.interval(rs, "agreement"))
                rows.append([t, loss, b, f"{int(sum(c) / len(c))}" if c else "", *_cost(costs, t, c), str(len(rs)),
                             fmt_iv(iv), fmt_ci(iv), agree, vs])  # fmt: skip
    return [
        "## Teacher-call budget",
        "",
        "Student top-1 (%) by the number of teacher calls it could use, mean ± std over seeds, 95% t-interval; vs CE:",
        f"against CE trained on the same samples (same budget). {TEST_NOTE}",
        "",
        *_cost_note(costs),
        *_table(
            [
                "teacher",
                "loss",
                "budget",
                "teacher calls",
                *_cost_head(costs),
                "seeds",
                "top-1 %",
                "95% CI",
                "agreement %",
                "vs ce",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


# ---------------------------------------------------------------------------------------------
# figures, DVC plot data, HTML


def _figure(lines: list[str], out_dir: Path, name: str, alt: str, make: Any) -> None:
    """Draw one figure into `out_dir/name` with its caption, or say in the report why it is missing."""
    try:
        fig, caption = make()
    except F.NoData as e:
        lines += [f"*Figure `{name}` left out: {e}.*", ""]
        log.info("report: %s left out: %s", name, e)
        return
    F.save(fig, out_dir / name)
    lines += [caption, "", f"![{alt}]({name})", ""]


def load_curves(curves_dir: Path | None, students: list[Student]) -> dict[str, list[dict[str, Any]]]:
    """sid -> its training-curve rows (plots/curves/<id>.json) for the students that have one."""
    out = {}
    if curves_dir is None:
        return out
    for s in students:
        p = Path(curves_dir) / f"{s.sid}.json"
        if p.is_file():
            rows = json.loads(p.read_text())
            if isinstance(rows, list):
                out[s.sid] = rows
    return out


def plot_data(study: Study, curves: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of the `dvc plots` overlays: `curves` (one row per student and epoch) and `budget` (per student)."""
    rows_c, rows_b = [], []
    order = {loss: i for i, loss in enumerate(study.losses)}  # rows in loss order: the templates colour in data order
    for s in sorted(study.students, key=lambda s: (s.teacher, order[s.loss], s.budget, s.seed)):
        ident = {"teacher": s.teacher, "loss": s.loss, "budget": s.budget, "seed": s.seed, "student": s.sid}
        got = F.curve_points(curves.get(s.sid, []))
        if got is not None:
            rows_c += [{**ident, "split": got[0], "epoch": e, "accuracy": a} for e, a in got[1]]
        c = F.calls(s)
        if c is not None:
            rows_b.append({**ident, "teacher_calls": c, "accuracy": s.value("accuracy")})
    return {"curves": rows_c, "budget": rows_b}


def write_html(md_path: Path) -> Path:
    """`report.html` beside `report.md`: the same text with every figure embedded (opens offline)."""
    from markdown_it import MarkdownIt

    folder = md_path.parent
    body = MarkdownIt("commonmark").enable("table").render(md_path.read_text())

    def embed(m: re.Match) -> str:
        src = folder / m.group(1)
        if not src.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(src.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}code{background:#f3f3f3}"
    )
    html = f'<!doctype html><html><head><meta charset="utf-8"><style>{style}</style></head><body>{body}</body></html>'
    path = md_path.with_suffix(".html")
    path.write_text(html)
    return path


# ---------------------------------------------------------------------------------------------
# the report


def build_report(
    metrics_dir: Path,
    teachers_dir: Path,
    out_dir: Path,
    manifest: Any,
    *,
    confusion_dir: Path | None = None,
    curves_dir: Path | None = None,
    only: set[str] | None = None,
    title: str | None = None,
    params: dict[str, Any] | None = None,
    params_path: str | Path | None = None,
    costs: dict[str, float] | None = None,
) -> Path:
    """Write `out_dir/report.md`, `report.html`, the PNGs and the `dvc plots` data; returns the report's path.

    metrics_dir: the students' summaries (their records under `details/`); teachers_dir: the teachers'
    (`metrics/teachers`); manifest: the data set's `Manifest` (the title and the data description come from it;
    `title` overrides the title). confusion_dir: per-image predictions for the paired tests. only: the student
    ids to report (default: every record). params + params_path: the params the report ran with and the file
    they came from, to record the commit and the params that differ from it. costs: a teacher's (or query
    store's) price per call (`config.call_costs`): with any, the details and budget tables add a cost column.
    """
    costs = costs or {}
    study = load_study(Path(metrics_dir), Path(teachers_dir), manifest, confusion_dir, only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a figure whose data went away must not linger in the report folder
        old.unlink()
    prov = provenance(params_path, params) if params is not None and params_path is not None else None
    lines = _header(study, title or f"kdcache on {study.data.name}", prov)
    lines += _warnings(study)
    lines += _teachers(study)
    curves = load_curves(curves_dir, study.students)
    if any(s.budget == FULL for s in study.students):
        lines += _top1_table(study)
        _figure(
            lines, out_dir, "accuracy.png", "student accuracy per teacher and loss", lambda: F.accuracy_figure(study)
        )
        lines += _paired_table(study)
        lines += _details_table(study, costs)
        lines += ["## Training curves", ""]
        _figure(lines, out_dir, "curves.png", "training curves", lambda: F.curves_figure(study, curves))
        lines += ["## Stronger teachers", ""]
        _figure(lines, out_dir, "teacher_capacity.png", "student accuracy vs teacher", lambda: F.capacity_figure(study))
        lines += ["## Calibration", ""]
        _figure(lines, out_dir, "reliability.png", "reliability diagrams", lambda: F.reliability_figure(study))
        rob = _robustness_table(study)
        lines += rob or ["## Robustness", ""]
        _figure(lines, out_dir, "robustness.png", "accuracy vs corruption severity", lambda: F.robustness_figure(study))
    else:
        lines += ["*No full-budget students: only the budget table and figure below.*", ""]
    if any(s.budget != FULL for s in study.students):
        lines += _budget_table(study, costs)
        _figure(lines, out_dir, "budget.png", "student accuracy vs teacher calls", lambda: F.budget_figure(study))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    write_html(path)
    data = plot_data(study, curves)
    for name, rows in data.items():
        p = out_dir / "plots" / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rows, indent=1) + "\n")
    log.info("wrote %s (+ report.html, %d figures)", path, len(list(out_dir.glob("*.png"))))
    return path
