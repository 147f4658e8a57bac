"""Training: the `train_teacher` and `distill` stages' library side.

Owns: the training-source protocol (`source`: `BatchSource`, `EpochPlan`), the shard stream joined
with cached logits (`dataset`: `DistillDataset`), the budget pool (`pool`: `QueriedPool`), moving
batches from loader workers (`transport`: `make_loader`), the optimizer and schedule (`schedule`),
the loop (`loop`: `train`), whole-split predictions (`validate`), one student run (`student`:
`run_student`) and the demo teachers (`teacher`: `train_teacher`).

May import: `pipeline.data`, `pipeline.cache` (reading stores), `pipeline.losses`, `pipeline.models`,
and the core. Never evaluation.

Add a training source: a class implementing `BatchSource`; `train` and `make_loader` take it as is.
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "BatchSource": "source",
        "EpochPlan": "source",
        "DistillDataset": "dataset",
        "QueriedPool": "pool",
        "make_loader": "transport",
        "train": "loop",
        "predict_split": "validate",
        "topk_accuracy": "validate",
        "StudentRun": "student",
        "run_student": "student",
        "train_teacher": "teacher",
    },
)
