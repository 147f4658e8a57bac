"""kdcache: teacher-logit caching and offline knowledge distillation.

One package per step of `prepare -> teach -> distill -> evaluate -> report` (docs/ARCHITECTURE.md):

    data/        prepare, corrupt: sources -> WebDataset shards + manifest; views; corrupted test copies
    cache/       teach: the Zarr logit store, budgets, the teacher pass (local or dask), import, inspect
    losses/      the distillation losses (pure math; depend on nothing of the pipeline)
    models/      the architecture zoo, its registry, checkpoints, batched inference
    training/    train_teacher, distill: training sources, the loop, one student run
    evaluation/  evaluate, report: metrics, a student's metrics file, tables and figures

and the core every package may use: `config` (typed params.yaml), `runtime` (device, threads, seeds,
rank/world), `layout` (every artifact path), `stage` (what DVC stage entry points share), `cli`.
"""
