"""Budget sweep: student accuracy against teacher calls (the CKD paper's main figure, from our runs).

    python -m benchmarks.budget_sweep [--teacher resnet] [--budgets 100 300 1000 3000 full]
        [--losses ce kd dist cmkd ckd] [--seeds 0] [--steps 500] [--out benchmarks/results]

Every student is trained exactly as `dvc repro` trains a `distill@<teacher>-<loss>-<budget>-<seed>`
stage (through `benchmarks.students.run_student`): budget n uses the first n teacher calls of the
store's fixed selection order, held in memory as the queried pool, for the same number of steps as
the full-budget run. `ce` at budget n is cross-entropy on the same n samples (no teacher). The
figure and tables come from `pipeline.evaluation.report.build_report` over the sweep's metrics, written to
<out>/budget/report/; `<out>/budget/vs_kd.md` adds each loss against KD at every budget (the report compares
with KD at the full budget only), paired on the same test images. Inside the DVC pipeline the same sweep is
`dvc exp run -S 'distill.budgets=[100,300,1000,3000,full]'`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.students import find_student, run_student
from pipeline.config import PrepareConfig, from_dict, load_params, section, student_id
from pipeline.data.shards import load_manifest
from pipeline.evaluation.report import build_report, fmt_paired
from pipeline.evaluation.study import HINTON_LOSS, Study, load_study
from pipeline.layout import Layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet")
    ap.add_argument("--budgets", nargs="+", default=["100", "300", "1000", "3000", "full"])
    ap.add_argument("--losses", nargs="+", default=["ce", "kd", "dist", "cmkd", "ckd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="distill.train.steps for every run (full included); default: params.yaml",
    )
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(args.out) / "budget"
    overrides = {"train": {"steps": args.steps, "epochs": None}} if args.steps else {}
    for budget in args.budgets:
        for loss in args.losses:
            for seed in args.seeds:
                name = student_id(args.teacher, loss, budget, seed)
                if find_student(work, name) is not None:
                    continue  # resumable: a finished student is not trained again
                m = run_student(
                    work, name, teacher=args.teacher, loss=loss, seed=seed, budget=budget, distill_overrides=overrides
                )
                print(
                    f"{name}: top-1 {100 * m['accuracy']:.2f} (teacher calls {m.get('teacher_calls')}, "
                    f"distinct comparisons {m['student'].get('distinct_comparisons', '-')})",
                    flush=True,
                )
    layout = Layout(from_dict(PrepareConfig, section(load_params(), "prepare"), "prepare").name)
    manifest = load_manifest(layout.shards)
    path = build_report(
        work / "metrics",
        layout.teacher_metrics_dir,  # the project's teacher records: the sweep distils the project's teacher
        work / "report",
        manifest,
        confusion_dir=work / "confusion",
        curves_dir=work / "curves",
        title=f"Budget sweep, teacher {args.teacher}",
    )
    print(path.read_text())
    study = load_study(work / "metrics", layout.teacher_metrics_dir, manifest, work / "confusion")
    text = vs_kd_table(study, args.teacher, args.budgets)
    (work / "vs_kd.md").write_text(text)
    print(text)


def vs_kd_table(study: Study, teacher: str, budgets: list[str]) -> str:
    """Each loss minus KD (points) at each budget, same teacher and seeds, on the same test images: the
    report's paired test (paired bootstrap over images with several seeds, McNemar mid-p with one)."""
    losses = [loss for loss in study.losses if loss != HINTON_LOSS]
    lines = [
        f"Each loss minus `{HINTON_LOSS}` (top-1 points) with teacher {teacher} at each budget [95% paired interval], "
        "p; * = p < 0.05 (unadjusted); the test is the report's (paired bootstrap over images with several seeds).",
        "",
        "| loss | " + " | ".join(budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for loss in losses:
        cells = [fmt_paired(study.paired(teacher, loss, HINTON_LOSS, budget)) for budget in budgets]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
