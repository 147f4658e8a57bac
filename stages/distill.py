"""DVC stage `distill@<teacher>-<loss>-<budget>-<seed>`: train a student on shards + cached logits.

    python -m stages.distill --teacher cnn --loss kd [--budget full] [--seed 0] [--resume]

Never builds the teacher (cache mode): its knowledge arrives as logits joined to the shards.
Section `distill` of params.yaml holds the student, the training recipe and each loss's parameters
(`distill.loss_params.<loss>`); `distill.teacher_source: online` runs the live teacher instead, for
comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from pipeline import modelio
from pipeline.budget import query_mask
from pipeline.config import ConfigError, DistillConfig, from_dict, load_params, section
from pipeline.loader import DistillDataset
from pipeline.losses import build_loss
from pipeline.runtime import pick_device, seed_everything, set_threads, setup_logging
from pipeline.shards import load_manifest
from pipeline.store import LogitStore
from pipeline.train import train

log = logging.getLogger("stages.distill")


def student_id(teacher: str, loss: str, budget: str | int, seed: int) -> str:
    return f"{teacher}-{loss}-{budget}-{seed}"


def budget_mask(store: LogitStore, labels: np.ndarray, budget: str | int) -> np.ndarray:
    """(N, V) sample-views this student may use: the first `budget` calls of the store's selection order."""
    queried = store.queried()
    if budget in (None, "full"):
        return queried
    recipe = store.attrs.get("budget") or {}
    mask = query_mask(labels, store.views, budget, recipe.get("strategy", "random"), recipe.get("seed", 0))
    if (mask & ~queried).any():
        raise ConfigError(
            f"budget {budget} needs teacher calls the store {store.path} never made (it holds {int(queried.sum())}); "
            "raise teach.budget or lower the distill budget"
        )
    return mask


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.distill", description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--loss", required=True, help="a loss name or a '+' combination, e.g. dkd+cmkd")
    ap.add_argument("--budget", default="full", help="teacher calls this student may use ('full' = all cached)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--store", default=None, help="logit store (default: data/logits/<teacher>.zarr)")
    ap.add_argument("--out-dir", default=None, help="default: data/students/<id>")
    ap.add_argument("--curves", default=None, help="DVC plots file (default: plots/curves/<id>.json)")
    ap.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(DistillConfig, section(params, "distill"), "distill")
    if args.loss not in cfg.loss_params:
        raise ConfigError(
            f"no parameters for loss '{args.loss}': add distill.loss_params.{args.loss} to params.yaml "
            f"(configured: {sorted(cfg.loss_params)})"
        )
    loss_fn = build_loss(args.loss, **(cfg.loss_params[args.loss] or {}))
    sid = student_id(args.teacher, args.loss, args.budget, args.seed)
    manifest = load_manifest(args.shards or f"data/shards/{params['prepare']['name']}")
    store_path = args.store or f"data/logits/{args.teacher}.zarr"
    store = LogitStore(store_path, "train", manifest)
    labels = manifest.iter_labels("train") if args.budget != "full" else None
    allowed = budget_mask(store, labels, args.budget)
    tcfg = dataclasses.replace(cfg.train, seed=args.seed)
    set_threads(tcfg.threads)
    seed_everything(args.seed)
    train_set = DistillDataset(
        manifest, "train", store_path, seed=args.seed, shuffle_buffer=tcfg.shuffle_buffer,
        allowed=allowed, unqueried=cfg.unqueried,
    )
    test_set = DistillDataset(manifest, "test", shuffle=False)
    teacher = None
    if cfg.teacher_source == "online":
        teacher, _ = modelio.load(f"data/teachers/{args.teacher}.pt", manifest=manifest)
    elif cfg.teacher_source != "cache":
        raise ConfigError(f"distill.teacher_source must be 'cache' or 'online', got '{cfg.teacher_source}'")
    model = modelio.build_for(cfg.student, manifest)
    out_dir = Path(args.out_dir or f"data/students/{sid}")
    history = train(
        model, loss_fn, train_set, tcfg, out_dir, test_set=test_set, device=pick_device(),
        resume=args.resume, teacher=teacher, desc=sid,
    )
    calls = int(allowed.sum())
    extra = {
        "student_id": sid, "teacher": args.teacher, "loss": args.loss, "budget": str(args.budget),
        "seed": args.seed, "teacher_calls": calls, "train_samples": train_set.num_samples(),
        "store_teacher": store.teacher,
    }
    modelio.save(out_dir / "model.pt", model.cpu(), cfg.student, extra=extra)
    curves = Path(args.curves or f"plots/curves/{sid}.json")
    curves.parent.mkdir(parents=True, exist_ok=True)
    curves.write_text(json.dumps(history, indent=1) + "\n")
    log.info("student %s done: test top-1 %.4f", sid, history[-1].get("test_acc", float("nan")))


if __name__ == "__main__":
    main()
