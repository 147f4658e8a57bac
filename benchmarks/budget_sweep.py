"""Budget sweep: student accuracy against teacher calls (the CKD paper's main figure, from our runs).

    python -m benchmarks.budget_sweep [--teacher resnet] [--budgets 100 300 1000 3000 full]
        [--losses ce kd dist cmkd ckd] [--seeds 0] [--epochs 2] [--out benchmarks/results]

Every student is trained exactly as `dvc repro` trains a `distill@<teacher>-<loss>-<budget>-<seed>`
stage (through `benchmarks.students.run_student`): budget n uses the first n teacher calls of the
store's fixed selection order, held in memory as the queried pool, for the same number of steps as
the full-budget run. `ce` at budget n is cross-entropy on the same n samples (no teacher). The
figure and tables come from `pipeline.evaluation.report.build_report` over the sweep's metrics, written to
<out>/budget/report/. Inside the DVC pipeline the same sweep is
`dvc exp run -S 'distill.budgets=[100,300,1000,3000,full]'`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.students import run_student
from pipeline.config import student_id
from pipeline.evaluation.report import build_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet")
    ap.add_argument("--budgets", nargs="+", default=["100", "300", "1000", "3000", "full"])
    ap.add_argument("--losses", nargs="+", default=["ce", "kd", "dist", "cmkd", "ckd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=2, help="distill.train.epochs for every run (full included)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(args.out) / "budget"
    overrides = {"train": {"epochs": args.epochs}}
    for budget in args.budgets:
        for loss in args.losses:
            for seed in args.seeds:
                name = student_id(args.teacher, loss, budget, seed)
                if (work / "metrics" / f"{name}.json").exists():
                    continue  # resumable: a finished student is not trained again
                m = run_student(
                    work, name, teacher=args.teacher, loss=loss, seed=seed, budget=budget, distill_overrides=overrides
                )
                print(
                    f"{name}: top-1 {100 * m['top1']:.2f} (teacher calls {m.get('teacher_calls')}, "
                    f"distinct comparisons {m.get('distinct_comparisons', '-')})",
                    flush=True,
                )
    teachers = work / "teachers"
    teachers.mkdir(exist_ok=True)
    for f in Path("data/teachers").glob(f"{args.teacher}.*"):
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, teachers / f.name)
    path = build_report(work / "metrics", teachers, work / "report", title=f"Budget sweep, teacher {args.teacher}")
    print(path.read_text())


if __name__ == "__main__":
    main()
