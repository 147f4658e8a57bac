"""DVC stage `report`: gather metrics/*.json into reports/report.md and PNG charts.

python -m stages.report [--metrics metrics] [--teachers data/teachers] [--out reports]
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DistillConfig, ReportConfig, student_ids
from pipeline.evaluation.report import build_report
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("report", __doc__, shards=False)
    ap.add_argument("--metrics", default=None, help="default: metrics")
    ap.add_argument("--teachers", default=None, help="default: data/teachers")
    ap.add_argument("--out", default=None, help="default: reports")
    run = start(ap, argv)
    cfg = run.section(ReportConfig, "report")
    # Only this configuration's students: metrics of earlier configurations (another data set or profile,
    # a removed loss) may still sit in the folder.
    only = student_ids(run.section(DistillConfig, "distill"))
    layout = run.layout
    build_report(
        Path(run.args.metrics or layout.metrics),
        Path(run.args.teachers or layout.teachers),
        Path(run.args.out or layout.reports),
        title=cfg.title,
        only=only,
    )


if __name__ == "__main__":
    run_main(main)
