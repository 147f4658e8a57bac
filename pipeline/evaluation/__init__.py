"""Evaluation: the `evaluate` and `report` stages' library side.

Owns: metrics on (N, C) logit arrays (`metrics`: accuracy, agreement, Pearson/Spearman, ECE and
reliability, corruption accuracy), one student's record (`student`: `evaluate_student`), intervals and
paired tests (`stats`), the records of one run read and checked together (`study`), the figures
(`figures`), where a report came from (`provenance`) and the report itself (`report`).

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
        "load_study": "study",
        "paired_comparison": "stats",
        "mean_ci": "stats",
    },
)
