"""DVC stage `evaluate@<student>`: test-split metrics of one student (and its teacher) -> metrics/<id>.json.

    python -m stages.evaluate --student cnn-kd-full-0 [--params params.yaml] [--store STORE]

Writes `metrics/<id>.json` (accuracy, agreement, correlations, ECE + reliability bins, corruption
accuracy; keys in `pipeline.evaluation.metrics.split_metrics` / `robustness_metrics`) and
`plots/confusion/<id>.csv` (actual,predicted per test sample, for DVC's `confusion` template).
Agreement and correlations are computed against the store the student was trained on (recorded in
its checkpoint; `--store` to name it). Robustness metrics need the `corrupt` stage's output
(data/corrupt/<dataset>); without it they are skipped with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import EvaluateConfig
from pipeline.evaluation.student import evaluate_student
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("evaluate", __doc__)
    ap.add_argument("--student", required=True, help="student id <teacher>-<loss>-<budget>-<seed>")
    ap.add_argument("--model", default=None, help="default: data/students/<id>/model.safetensors")
    ap.add_argument("--store", default=None, help="the student's teacher store (default: the one it was trained on)")
    ap.add_argument("--out", default=None, help="default: metrics/<id>.json")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    run_main(main)
