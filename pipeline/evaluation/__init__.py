"""Evaluation: the `evaluate` and `report` stages' library side.

Owns: metrics on (N, C) logit arrays (`metrics`: accuracy, agreement, Pearson/Spearman, ECE and
reliability, corruption accuracy), one student's metrics file (`student`: `evaluate_student`), and
the report's tables and figures (`report`).

May import: everything below it (`pipeline.training` for whole-split predictions, `pipeline.cache`,
`pipeline.data`, `pipeline.models`, the core). Nothing imports evaluation but stages and the CLI.
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "evaluate_student": "student",
        "split_metrics": "metrics",
        "robustness_metrics": "metrics",
        "build_report": "report",
    },
)
