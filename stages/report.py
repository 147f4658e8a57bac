"""DVC stage `report`: gather metrics/*.json into reports/report.md and PNG charts.

python -m stages.report [--metrics metrics] [--teachers data/teachers] [--out reports]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config import DistillConfig, ReportConfig, from_dict, load_params, section, student_ids
from pipeline.report import build_report
from pipeline.runtime import setup_logging

log = logging.getLogger("stages.report")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--teachers", default="data/teachers")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(ReportConfig, section(params, "report"), "report")
    # Only this configuration's students: metrics of earlier configurations (another data set or profile,
    # a removed loss) may still sit in the folder.
    only = student_ids(from_dict(DistillConfig, section(params, "distill"), "distill"))
    path = build_report(Path(args.metrics), Path(args.teachers), Path(args.out), title=cfg.title, only=only)
    log.info("report written to %s", path)


if __name__ == "__main__":
    main()
