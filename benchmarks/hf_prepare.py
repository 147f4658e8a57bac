"""Streaming `prepare` from Hugging Face datasets: peak memory and manifest against the ImageFolder path.

    python -m benchmarks.hf_prepare [--archive PATH] [--workdir /tmp/kdcache-hf]

Writes the CIFAR-10 JPEG ImageFolder archive (`../shared/datasets/cifar10-jpeg.tar.gz`, 60,000 images) as a
Hugging Face `DatasetDict.save_to_disk` folder and as Parquet files (one per split, the Hub's naming), rows in
the ImageFolder's order, then runs `python -m stages.prepare` under `/usr/bin/time` on each of the three with the
`profiles/cifar10.yaml` prepare section (shuffled train split) and prints peak RSS, the interpreter's baseline
(`import stages.prepare, datasets`), wall time, and whether the manifests (every shard's sha256) are identical.
Skips cleanly where the archive is absent (nothing downloads a data set).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.cifar10_profile import ROOT, archive_args


def write_hf(archive: Path, work: Path) -> tuple[Path, Path]:
    """The archive's images (their JPEG bytes, untouched) as a save_to_disk folder and as Parquet files."""
    import datasets

    from pipeline.data.sources import open_imagefolder

    saved, parquet = work / "saved", work / "parquet"
    if (saved / "dataset_dict.json").exists() and parquet.exists():
        return saved, parquet
    splits = {}
    for split in ("train", "test"):
        stream = open_imagefolder(archive, split, mode="RGB")
        features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=stream.classes)})
        rows = {
            "img": [{"bytes": e.data, "path": None} for e in stream.entries],
            "label": [e.label for e in stream.entries],
        }
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
        splits[split].to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    return saved, parquet


def timed(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `cmd` under /usr/bin/time."""
    res = subprocess.run(["/usr/bin/time", "-f", "%M %e", *cmd], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{res.stderr[-2000:]}")
    kb, secs = res.stderr.strip().splitlines()[-1].split()
    return int(kb) / 1024, float(secs)


def main(argv: list[str] | None = None) -> int:
    args, archive = archive_args(__doc__, "/tmp/kdcache-hf", argv)
    if archive is None:
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    saved, parquet = write_hf(archive, work)
    base = yaml.safe_load((ROOT / "profiles" / "cifar10.yaml").read_text())["prepare"]
    variants = {
        "imagefolder (.tar.gz)": {"source": "imagefolder", "root": str(archive), "options": {"mode": "RGB"}},
        "hf save_to_disk": {"source": "hf", "root": str(saved), "options": {"mode": "RGB"}},
        "hf Parquet": {"source": "hf", "root": str(parquet), "options": {"mode": "RGB"}},
        # CIFAR-10's JPEGs are ~20 MB, smaller than the default 64 MB window: a small window shows what a split
        # larger than the window costs (the same shards, memory set by the window, not by the split)
        "hf save_to_disk, window_mb: 2": {
            "source": "hf",
            "root": str(saved),
            "options": {"mode": "RGB", "window_mb": 2},
        },
        "hf Parquet, window_mb: 2": {"source": "hf", "root": str(parquet), "options": {"mode": "RGB", "window_mb": 2}},
    }
    baseline, _ = timed([sys.executable, "-c", "import stages.prepare, datasets"])
    print(f"interpreter baseline (import stages.prepare, datasets): {baseline:.0f} MB")
    print("| source | peak RSS | above the baseline | wall | manifest = ImageFolder's |\n|---|---:|---:|---:|---|")
    reference = None
    for i, (name, prep) in enumerate(variants.items()):
        params = work / "params.yaml"
        params.write_text(yaml.safe_dump({"prepare": {**base, **prep}}))
        out = work / f"out-{i}"
        peak, wall = timed([sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(out)])
        manifest = json.loads((out / "manifest.json").read_text())
        reference = reference or manifest
        print(f"| {name} | {peak:,.0f} MB | {peak - baseline:,.0f} MB | {wall:.0f} s | {manifest == reference} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
