"""DVC stage `train_teacher@<name>`: train a demo teacher, or import your own checkpoint.

    python -m stages.train_teacher --name cnn [--params params.yaml] [--shards data/shards/<ds>]

The teacher's recipe is `teachers.<name>` in params.yaml (shared recipe: section `train_teacher`).
With `teachers.<name>.checkpoint: PATH` nothing is trained: the file (a kdcache checkpoint or a bare
state_dict of `arch`) is validated against the data set and copied to data/teachers/<name>.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from pipeline import modelio
from pipeline.config import TrainTeacherConfig, from_dict, load_params, section, teacher_spec
from pipeline.evaluate import predict_split, topk_accuracy
from pipeline.loader import DistillDataset
from pipeline.losses.ce import CELoss
from pipeline.runtime import pick_device, seed_everything, set_threads, setup_logging
from pipeline.shards import load_manifest
from pipeline.train import train
from pipeline.views import ViewRecipe

log = logging.getLogger("stages.train_teacher")

AUGMENT_VIEWS = 1 << 30  # teacher training draws a fresh augmentation per (epoch, sample)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train_teacher", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="teacher name (a key of `teachers` in params.yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default=None, help="prepared data set folder (default: data/shards/<prepare.name>)")
    ap.add_argument("--out-dir", default="data/teachers")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    spec = teacher_spec(params, args.name)
    cfg = from_dict(TrainTeacherConfig, section(params, "train_teacher"), "train_teacher")
    shards = args.shards or f"data/shards/{params['prepare']['name']}"
    manifest = load_manifest(shards)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{args.name}.pt"
    device = pick_device()
    set_threads(cfg.train.threads)
    test_set = DistillDataset(manifest, "test", shuffle=False)

    if spec.checkpoint:
        src = Path(spec.checkpoint)
        try:
            model, meta = modelio.load(src, expected_arch=spec.arch, manifest=manifest)
        except (KeyError, ValueError, TypeError):
            model = modelio.import_state_dict(src, spec.arch, manifest)  # a bare state_dict
        history: list[dict] = []
        source = str(src)
    else:
        seed_everything(cfg.train.seed)
        model = modelio.build_for(spec.arch, manifest)
        tcfg = dataclasses.replace(
            cfg.train,
            epochs=spec.epochs,
            batch_size=spec.batch_size,
            optim=dataclasses.replace(cfg.train.optim, lr=spec.lr),
        )
        recipe = ViewRecipe(views=AUGMENT_VIEWS, seed=tcfg.seed)
        train_set = DistillDataset(
            manifest, "train", seed=tcfg.seed, shuffle_buffer=tcfg.shuffle_buffer, recipe=recipe, augment=True
        )
        history = train(
            model,
            CELoss(),
            train_set,
            tcfg,
            out_dir / f"{args.name}.run",
            test_set=test_set,
            device=device,
            resume=args.resume,
            desc=f"teacher {args.name}",
        )
        source = "trained by train_teacher"
    logits, labels = predict_split(model.to(device), test_set, 1000, device)
    metrics = {
        "teacher": args.name,
        "arch": spec.arch,
        "source": source,
        "test_top1": topk_accuracy(logits, labels, 1),
        "test_top5": topk_accuracy(logits, labels, 5),
    }
    modelio.save(ckpt, model.cpu(), spec.arch, extra={"name": args.name, "test_top1": metrics["test_top1"]})
    (out_dir / f"{args.name}.json").write_text(json.dumps({**metrics, "history": history}, indent=1) + "\n")
    log.info("teacher %s (%s): test top-1 %.4f -> %s", args.name, spec.arch, metrics["test_top1"], ckpt)


if __name__ == "__main__":
    main()
