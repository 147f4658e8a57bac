"""DVC stage `evaluate@<student>`: test-split metrics of one student (and its teacher) -> metrics/<id>.json.

python -m stages.evaluate --student cnn-kd-full-0 [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline import modelio
from pipeline.config import EvaluateConfig, from_dict, load_params, section
from pipeline.evaluate import agreement, expected_calibration_error, predict_split, topk_accuracy
from pipeline.loader import DistillDataset
from pipeline.runtime import pick_device, setup_logging
from pipeline.shards import load_manifest
from pipeline.store import LogitStore

log = logging.getLogger("stages.evaluate")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="student id <teacher>-<loss>-<budget>-<seed>")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--model", default=None, help="default: data/students/<id>/model.pt")
    ap.add_argument("--out", default=None, help="default: metrics/<id>.json")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(EvaluateConfig, section(params, "evaluate"), "evaluate")
    manifest = load_manifest(args.shards or f"data/shards/{params['prepare']['name']}")
    model, meta = modelio.load(args.model or f"data/students/{args.student}/model.pt", manifest=manifest)
    device = pick_device()
    logits, labels = predict_split(
        model.to(device), DistillDataset(manifest, "test", shuffle=False), cfg.batch_size, device
    )
    metrics = {k: meta[k] for k in ("student_id", "teacher", "loss", "budget", "seed", "teacher_calls") if k in meta}
    metrics["student_arch"] = meta["arch"]
    for k in cfg.topk:
        metrics[f"top{k}"] = topk_accuracy(logits, labels, k)
    metrics["ece"] = expected_calibration_error(logits, labels)
    store = Path(f"data/logits/{meta['teacher']}.zarr")
    if store.exists():
        t = LogitStore(store, "test", manifest).read_all()[:, 0]  # (N, C) view 0 = plain image
        metrics["teacher_top1"] = topk_accuracy(t, labels, 1)
        metrics["agreement"] = agreement(logits, t)
        metrics["teacher_ece"] = expected_calibration_error(t, labels)
    out = Path(args.out or f"metrics/{args.student}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    log.info("%s: %s", args.student, {k: v for k, v in metrics.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
