"""DVC stage `ensemble@<name>`: an ensemble teacher's logit store, computed from its members' stores.

    python -m stages.ensemble --name both [--params params.yaml] [--force]

Reads data/logits/<member>.zarr of the members of `ensembles.<name>` (no model runs, no teacher call)
and writes data/logits/<name>.zarr, a normal logit store that `distill` and `evaluate` use like any
teacher's: the members' logits combined by `combine` (mean_logits | mean_probs) with `weights`, plus
every member's logits when `keep_members` (for the per-member loss `mtkd`). Members must be cached on
the same data set, views and (for budgets) queried sample-views.
"""

from __future__ import annotations

from pipeline.cache.ensemble import ensemble_store
from pipeline.config import ensemble_spec
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("ensemble", __doc__)
    ap.add_argument("--name", required=True, help="ensemble name (an entry of params.yaml `ensembles`)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing store / discard a partial one")
    run = start(ap, argv)
    spec = ensemble_spec(run.params, run.args.name)
    ensemble_store(run.manifest(), run.args.name, spec, run.layout.store, force=run.args.force)


if __name__ == "__main__":
    run_main(main)
