"""DVC stage `evaluate@<student>`: test-split metrics of one student (and its teacher) -> metrics/<id>.json.

    python -m stages.evaluate --student cnn-kd-full-0 [--params params.yaml]

Writes `metrics/<id>.json` (accuracy, agreement, correlations, ECE + reliability bins, corruption
accuracy; keys in `pipeline.evaluate.split_metrics` / `robustness_metrics`) and
`plots/confusion/<id>.csv` (actual,predicted per test sample, for DVC's `confusion` template).
Robustness metrics need the `corrupt` stage's output (data/corrupt/<dataset>); without it they are
skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline import modelio
from pipeline.config import EvaluateConfig, from_dict, load_params, section
from pipeline.corruptions import load_corrupted
from pipeline.evaluate import predict_split, robustness_metrics, split_metrics, write_confusion_csv
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
    ap.add_argument("--corrupt", default=None, help="corrupted test set (default: data/corrupt/<dataset>)")
    ap.add_argument("--confusion", default=None, help="default: plots/confusion/<id>.csv")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(EvaluateConfig, section(params, "evaluate"), "evaluate")
    dataset = params["prepare"]["name"]
    manifest = load_manifest(args.shards or f"data/shards/{dataset}")
    model, meta = modelio.load(args.model or f"data/students/{args.student}/model.pt", manifest=manifest)
    device = pick_device()
    model = model.to(device)
    logits, labels = predict_split(model, DistillDataset(manifest, "test", shuffle=False), cfg.batch_size, device)
    keys = ("student_id", "teacher", "loss", "budget", "seed", "teacher_calls", "train_samples", "distinct_comparisons")
    metrics = {k: meta[k] for k in keys if meta.get(k) is not None}
    metrics["student_arch"] = meta["arch"]
    store = Path(f"data/logits/{meta['teacher']}.zarr")
    teacher = LogitStore(store, "test", manifest).read_all()[:, 0] if store.exists() else None  # (N, C) view 0
    if teacher is None:
        log.warning("no logit store %s: teacher-side metrics (agreement, correlations) skipped", store)
    metrics.update(split_metrics(logits, labels, teacher, topk=cfg.topk))
    corrupt_dir = Path(args.corrupt or f"data/corrupt/{dataset}")
    if (corrupt_dir / "meta.json").exists():
        metrics.update(robustness_metrics(model, load_corrupted(corrupt_dir, manifest), logits, cfg.batch_size, device))
    else:
        log.warning("no corrupted test set at %s (`dvc repro corrupt`): robustness metrics skipped", corrupt_dir)
    confusion = args.confusion or f"plots/confusion/{args.student}.csv"
    write_confusion_csv(confusion, labels, logits.argmax(1), manifest.classes)
    out = Path(args.out or f"metrics/{args.student}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    log.info("%s: %s", args.student, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
