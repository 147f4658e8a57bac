"""Cache: the logit store and everything that writes it (the `teach` stage) or reads it for a tool.

Owns: the Zarr store (`store`: `StoreWriter`, `LogitStore`, `StoreError`), teacher-call budgets
(`budget`: `BudgetSpec`, selection orders), the teacher pass (`teach`: `teach_store` with a local
executor `run_teach` and a dask one in `teach_dask`), importing logits computed elsewhere
(`import_logits`), ensemble teachers computed from member stores (`ensemble`: `ensemble_store`) and
summarising a store (`inspect_store`).

May import: `pipeline.data`, `pipeline.models`, and the core (`config`, `runtime`, `layout`). Never
training, losses or evaluation: editing student code must not rerun a teacher.

Add a selection strategy: a branch of `budget.selection_order` (and its name in `STRATEGIES`).
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "LogitStore": "store",
        "StoreError": "store",
        "StoreSpec": "store",
        "StoreWriter": "store",
        "BudgetSpec": "budget",
        "query_mask": "budget",
        "build_spec": "teach",
        "run_teach": "teach",
        "teach_store": "teach",
        "run_teach_dask": "teach_dask",
        "import_logits": "import_logits",
        "ensemble_store": "ensemble",
        "inspect_store": "inspect_store",
    },
)
