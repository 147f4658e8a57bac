"""DVC stage `report`: every record of the run into reports/report.md (+ report.html, PNGs, dvc plots data).

    python -m stages.report [--metrics metrics] [--teachers metrics/teachers] [--out reports]

Reads the students of the distill matrix (metrics/details/<id>.json), their teachers
(metrics/teachers/details/<t>.json), the data set's manifest (title, classes, split and image sizes),
the per-image predictions (plots/confusion/<id>.csv: the paired tests) and the training curves
(plots/curves/<id>.json). `report.title` overrides the title ("kdcache on <data set>").
"""

from __future__ import annotations

from pipeline.config import DistillConfig, ReportConfig, call_costs, student_ids
from pipeline.evaluation.report import build_report
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("report", __doc__)
    ap.add_argument("--metrics", default=None, help="student metrics folder (default: metrics)")
    ap.add_argument("--teachers", default=None, help="teacher metrics folder (default: metrics/teachers)")
    ap.add_argument("--out", default=None, help="default: reports")
    run = start(ap, argv)
    cfg = run.section(ReportConfig, "report")
    # Only this configuration's students: metrics of earlier configurations (another data set or profile,
    # a removed loss) may still sit in the folder.
    only = student_ids(run.section(DistillConfig, "distill"))
    layout = run.layout
    build_report(
        run.args.metrics or layout.metrics,
        run.args.teachers or layout.teacher_metrics_dir,
        run.args.out or layout.reports,
        run.manifest(),
        confusion_dir=layout.confusion_dir,
        curves_dir=layout.curves_dir,
        only=only,
        title=cfg.title,
        params=run.params,
        params_path=run.args.params,
        costs=call_costs(run.params),
    )


if __name__ == "__main__":
    run_main(main)
