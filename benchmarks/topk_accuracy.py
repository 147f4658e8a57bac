"""Dense vs top-k logit stores: student accuracy per loss on the default data set.

    python benchmarks/topk_accuracy.py [--teacher resnet] [--k 5] [--losses kd dist cmkd ckd] [--seeds 0]

Builds a top-k copy of the teacher's cache (`teach_store` with `teach.topk: k`, the same teacher
checkpoint) and trains one student per loss and seed on each store. Prints a markdown table
(and writes <out>/topk_accuracy.md) with store bytes and test top-1. With C=10 classes, k=5 keeps half
the classes; the tail is spread evenly, so rank-based losses (CMKD's Spearman part) see ties there.
Resumable: a student whose metrics exist under <out>/topk/metrics is read, not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from benchmarks.students import find_student, run_student
from pipeline.cache.teach import teach_store
from pipeline.config import PrepareConfig, TeachConfig, from_dict, load_params, section
from pipeline.data.shards import load_manifest
from pipeline.layout import Layout


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--losses", nargs="+", default=["kd", "dist", "cmkd", "ckd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(args.out) / "topk"
    work.mkdir(parents=True, exist_ok=True)
    params = load_params("params.yaml")
    layout = Layout(from_dict(PrepareConfig, section(params, "prepare"), "prepare").name)
    cfg = dataclasses.replace(from_dict(TeachConfig, section(params, "teach"), "teach"), topk=args.k)
    dense = layout.store(args.teacher)
    topk = work / f"{args.teacher}-top{args.k}.zarr"
    if not topk.exists():
        teach_store(load_manifest(layout.shards), layout.teacher_checkpoint(args.teacher), topk, cfg, args.teacher)
    overrides = {"train": {"epochs": args.epochs}} if args.epochs else {}
    lines = [
        f"Dense vs top-{args.k} store, teacher `{args.teacher}`, seeds {args.seeds}: test top-1 (%).",
        "",
        f"Store bytes (train split): dense {disk_bytes(dense / 'train'):,}, "
        f"top-{args.k} {disk_bytes(topk / 'train'):,}.",
        "",
        f"| loss | dense | top-{args.k} | difference |",
        "|---|---:|---:|---:|",
    ]
    for loss in args.losses:
        res = {}
        for label, store in (("dense", dense), ("topk", topk)):
            runs = [
                find_student(work, f"{label}-{loss}-s{s}")  # resumable: a finished student is read
                or run_student(
                    work,
                    f"{label}-{loss}-s{s}",
                    teacher=args.teacher,
                    loss=loss,
                    seed=s,
                    store=str(store),
                    distill_overrides=overrides,
                )
                for s in args.seeds
            ]
            accs = [100 * m["accuracy"] for m in runs]
            res[label] = statistics.mean(accs)
        lines.append(f"| {loss} | {res['dense']:.2f} | {res['topk']:.2f} | {res['topk'] - res['dense']:+.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "topk_accuracy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
