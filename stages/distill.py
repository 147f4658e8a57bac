"""DVC stage `distill@<teacher>-<loss>-<budget>-<seed>`: train a student on shards + cached logits.

    python -m stages.distill --teacher cnn --loss kd [--budget full] [--seed 0] [--resume]
    torchrun --nproc_per_node N -m stages.distill --teacher cnn --loss kd      # DDP (gloo on CPU, nccl on CUDA)

Never builds the teacher (cache mode): its knowledge arrives as logits joined to the shards.
Section `distill` of params.yaml holds the student, the training recipe and each loss's parameters
(`distill.loss_params.<loss>`); `distill.teacher_source: online` runs the live teacher instead, for
comparison.

Under `torchrun` (WORLD_SIZE > 1) the stage joins the process group torchrun describes, every rank
trains on its share of the shards (`pipeline.train` keeps the ranks in lockstep), and only rank 0
evaluates and writes the checkpoint, model and curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import modelio
from pipeline.budget import query_mask
from pipeline.config import ConfigError, DistillConfig, from_dict, load_params, section, student_id
from pipeline.loader import DistillDataset
from pipeline.losses import build_loss
from pipeline.pool import QueriedPool
from pipeline.runtime import pick_device, seed_everything, set_threads, setup_logging
from pipeline.shards import load_manifest
from pipeline.store import LogitStore
from pipeline.train import train

log = logging.getLogger("stages.distill")


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


def init_distributed() -> torch.device | None:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this rank's device (None: single process).

    gloo on CPU, nccl on CUDA (one GPU per local rank). The rendezvous (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK) comes from torchrun's environment.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available() and os.environ.get("KDCACHE_DEVICE", "cuda").startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    log.info("DDP: %d ranks, backend %s", dist.get_world_size(), backend)
    return device


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run one student (under torchrun: one rank of it), tear the process group down."""
    args = _parse(argv)
    setup_logging()
    device = init_distributed()
    try:
        _run(args, device)
    finally:
        if device is not None and dist.is_initialized():
            dist.destroy_process_group()


def _parse(argv: list[str] | None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def _run(args: argparse.Namespace, device: torch.device | None) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
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
    if args.budget != "full" and cfg.unqueried == "drop":
        # Budget run: the few queried sample-views live in memory; every epoch draws the same number
        # of samples as a full run would, so small budgets train for the same schedule.
        train_set = QueriedPool(
            manifest, "train", store_path, allowed, seed=args.seed, epoch_samples=cfg.pool_epoch_samples
        )
    else:
        train_set = DistillDataset(
            manifest,
            "train",
            store_path,
            seed=args.seed,
            shuffle_buffer=tcfg.shuffle_buffer,
            allowed=allowed,
            unqueried=cfg.unqueried,
        )
    if getattr(loss_fn, "uses_teacher_features", False) and cfg.teacher_source == "cache":
        # The loss's teacher side (CMKD's soft ranks...) depends on the cached logits alone: the loader's
        # worker computes it per batch, off the training step (identical results, tested).
        train_set.teacher_features = loss_fn.teacher_features
    test_set = DistillDataset(manifest, "test", shuffle=False, split_nodes=False)  # rank 0 evaluates it whole
    teacher = None
    if cfg.teacher_source == "online":
        teacher, _ = modelio.load(f"data/teachers/{args.teacher}.pt", manifest=manifest)
    elif cfg.teacher_source != "cache":
        raise ConfigError(f"distill.teacher_source must be 'cache' or 'online', got '{cfg.teacher_source}'")
    model = modelio.build_for(cfg.student, manifest)
    out_dir = Path(args.out_dir or f"data/students/{sid}")
    history = train(
        model,
        loss_fn,
        train_set,
        tcfg,
        out_dir,
        test_set=test_set,
        device=device or pick_device(),
        resume=args.resume,
        teacher=teacher,
        desc=sid,
        arch=cfg.student,
    )
    if rank != 0:
        return  # only rank 0 writes outputs
    calls = int(allowed.sum())
    extra = {
        "student_id": sid,
        "teacher": args.teacher,
        "loss": args.loss,
        "budget": str(args.budget),
        "seed": args.seed,
        "teacher_calls": calls,
        "train_samples": train_set.pool_size() if isinstance(train_set, QueriedPool) else train_set.num_samples(),
        "distinct_comparisons": history[-1].get("distinct_comparisons"),
        "store_teacher": store.teacher,
    }
    modelio.save(out_dir / "model.pt", model.cpu(), cfg.student, extra=extra)
    curves = Path(args.curves or f"plots/curves/{sid}.json")
    curves.parent.mkdir(parents=True, exist_ok=True)
    curves.write_text(json.dumps(history, indent=1) + "\n")
    log.info("student %s done: test top-1 %.4f", sid, history[-1].get("test_acc", float("nan")))


if __name__ == "__main__":
    main()
