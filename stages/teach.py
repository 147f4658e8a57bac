"""DVC stage `teach@<name>`: run teacher <name> once over the shards and cache its raw logits.

    python -m stages.teach --name cnn [--params params.yaml] [--force]

Writes data/logits/<name>.zarr (via <name>.zarr.partial/, resumed shard by shard after an
interruption). Section `teach` of params.yaml sets views, dtype, layout and the query budget;
`teach.cluster: local | tcp://host:8786` runs it on dask workers instead of this process.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import modelio
from pipeline.config import TeachConfig, from_dict, load_params, section
from pipeline.runtime import pick_device, set_threads, setup_logging
from pipeline.shards import load_manifest, sha256_file
from pipeline.teach import PreviousCalls, build_spec, run_teach
from pipeline.teach_dask import run_teach_dask, worker_threads
from pipeline.views import ViewRecipe

log = logging.getLogger("stages.teach")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.teach", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="teacher name (data/teachers/<name>.pt)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default=None, help="prepared data set folder (default: data/shards/<prepare.name>)")
    ap.add_argument("--checkpoint", default=None, help="teacher checkpoint (default: data/teachers/<name>.pt)")
    ap.add_argument("--out", default=None, help="store path (default: data/logits/<name>.zarr)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing store / discard a partial one")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="replace an existing store, reusing the teacher calls it already made when only the budget grew "
        "(what `dvc repro` runs: raising teach.budget calls the teacher only on the new sample-views)",
    )
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(TeachConfig, section(params, "teach"), "teach")
    manifest = load_manifest(args.shards or f"data/shards/{params['prepare']['name']}")
    ckpt = Path(args.checkpoint or f"data/teachers/{args.name}.pt")
    model, meta = modelio.load(ckpt, manifest=manifest)
    set_threads(cfg.threads)
    aug = cfg.augment
    recipes = {
        "train": ViewRecipe(cfg.views, cfg.view_seed, int(aug.get("pad", 4)), bool(aug.get("flip", True))),
        "test": ViewRecipe(cfg.test_views, cfg.view_seed, int(aug.get("pad", 4)), bool(aug.get("flip", True))),
    }
    recipes = {k: v for k, v in recipes.items() if k in manifest.splits}
    budget = {"n": cfg.budget, "strategy": cfg.strategy, "seed": cfg.budget_seed}
    teacher = {"name": args.name, "arch": meta["arch"], "weights_sha256": sha256_file(ckpt)}
    spec = build_spec(
        manifest,
        teacher,
        recipes,
        dtype=cfg.dtype,
        topk=cfg.topk,
        compressor=cfg.compressor,
        chunk_rows=cfg.chunk_rows,
        budget=budget,
    )
    out = args.out or f"data/logits/{args.name}.zarr"
    previous = PreviousCalls.find(out, spec) if args.reuse else None
    if cfg.cluster != "none":  # same store, computed by dask workers (pipeline/teach_dask.py)
        run_teach_dask(
            manifest,
            ckpt,
            out,
            spec,
            recipes,
            cluster=cfg.cluster,
            workers=cfg.workers,
            threads_per_worker=worker_threads(cfg.cluster, cfg.workers, cfg.threads),
            batch_size=cfg.batch_size,
            force=args.force,
            previous=previous,
        )
        return
    run_teach(
        manifest,
        model,
        out,
        spec,
        recipes,
        batch_size=cfg.batch_size,
        device=pick_device(),
        force=args.force,
        previous=previous,
    )


if __name__ == "__main__":
    main()
