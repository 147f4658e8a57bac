"""DVC stage `evaluate@<student>`: test-split metrics of one student (and its teacher) -> metrics/<id>.json.

    python -m stages.evaluate --student cnn-kd-full-0 [--params params.yaml] [--store STORE]

Writes the student's record (`pipeline.records`): `metrics/<id>.json`, the numbers `dvc metrics show`
compares (accuracy = test top-1, agreement, ECE, mCA, teacher calls), and `metrics/details/<id>.json`,
everything (top-k, correlations, reliability bins, accuracy per corruption and severity; layout in
`pipeline.evaluation.student.student_record`); and `plots/confusion/<id>.csv` (actual,predicted per test
image, for DVC's `confusion` template and the report's paired tests).
Agreement and correlations are computed against the store the student was trained on (recorded in
its checkpoint; `--store` to name it). Robustness metrics need the `corrupt` stage's output
(data/corrupt/<dataset>); without it they are skipped with a warning.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EvaluateConfig
from pipeline.evaluation.student import evaluate_student
from pipeline.layout import Layout
from pipeline.records import write_record
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("evaluate", __doc__)
    ap.add_argument("--student", required=True, help="student id <teacher>-<loss>-<budget>-<seed>")
    ap.add_argument("--model", default=None, help="default: data/students/<id>/model.safetensors")
    ap.add_argument("--store", default=None, help="the student's teacher store (default: the one it was trained on)")
    ap.add_argument("--out", default=None, help="summary metrics (default: metrics/<id>.json; details beside it)")
    ap.add_argument("--corrupt", default=None, help="corrupted test set (default: data/corrupt/<dataset>)")
    ap.add_argument("--confusion", default=None, help="default: plots/confusion/<id>.csv")
    run = start(ap, argv)
    cfg = run.section(EvaluateConfig, "evaluate")
    sid, layout = run.args.student, run.layout
    metrics = evaluate_student(
        run.manifest(),
        run.args.model or layout.student_model(sid),
        run.args.corrupt or layout.corrupt,
        cfg,
        run.args.confusion or layout.confusion(sid),
        store=run.args.store,
    )
    out = Path(run.args.out or layout.student_metrics(sid))
    write_record(metrics, out, Layout.details(out), "student")


if __name__ == "__main__":
    run_main(main)
