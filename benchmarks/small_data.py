"""Defaults on a user's small data set: the default params with only `prepare.*` changed, on 5,000-image ImageFolders.

    python -m benchmarks.small_data [--datasets fashion cifar] [--workdir /tmp/kdcache-small] [--seeds 0]

Builds two ImageFolders a user might bring (4,000 train / 1,000 test images, a seeded class-stratified
subset): one from Fashion-MNIST's IDX files (PNGs), one from the CIFAR-10 JPEG archive (`../shared/datasets`,
skipped where absent), clones this repository's committed code next to each, points `prepare` at it
(name, source, root: nothing else changes), runs `dvc repro` and prints, per data set, each teacher's
validation/test top-1, its warnings, the CE student, and every loss with its paired difference to CE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.layout import Layout
from pipeline.records import read_record

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
FASHION = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 4000, 1000


def _subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, the same number from each class (seeded)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = n // len(classes)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]))


def fashion_folder(out: Path) -> Path:
    """A 4,000 / 1,000 Fashion-MNIST ImageFolder of PNGs (class folders named after the classes)."""
    from pipeline.data.sources import load_split

    if (out / "test").exists():
        return out
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        d = load_split("fashion_mnist", FASHION, split)
        for i in _subset(d.labels, n, seed=1):
            path = out / split / d.classes[d.labels[i]].replace("/", "-") / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(d.images[i][:, :, 0]).save(path)
    return out


def cifar_folder(out: Path, archive: Path) -> Path:
    """A 4,000 / 1,000 ImageFolder of CIFAR-10 JPEGs taken from the archive as they are (bytes unchanged)."""
    if (out / "test").exists():
        return out
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            mine = sorted((m for m in members if f"/{split}/" in f"/{m.name}"), key=lambda m: m.name)
            labels = np.array([m.name.split("/")[-2] for m in mine])
            for i in _subset(labels, n, seed=1):
                m = mine[i]
                path = out / split / labels[i] / Path(m.name).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tf.extractfile(m).read())
    return out


def run_pipeline(name: str, folder: Path, work: Path, seeds: list[int]) -> dict:
    """`dvc repro` in a clone with only prepare.* (and the seed list) changed; returns the report's numbers."""
    if not (work / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare"].update(name=name, source="imagefolder", root=str(folder), options={})
    params["distill"]["seeds"] = seeds
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # dvc.yaml's commands run `python`: this interpreter's (the venv's), whether or not the venv is activated
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, check=True)
    wall = time.perf_counter() - start
    teachers = {}
    for t in params["distill"]["teachers"]:
        info = read_record(Layout(name, root=work).teacher_details(t), "teacher")
        teachers[t] = {k: info.get(k) for k in ("val_accuracy", "accuracy", "warnings", "schedule")}
    students = {}
    for f in sorted((work / "metrics" / "details").glob("*.json")):
        m = read_record(f, "student")
        students[f.stem] = {"val_accuracy": m.get("val_accuracy"), "accuracy": m["accuracy"]}
    return {"wall_s": round(wall), "teachers": teachers, "students": students}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["fashion", "cifar"], choices=["fashion", "cifar"])
    ap.add_argument("--workdir", default="/tmp/kdcache-small")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    results = {}
    for ds in args.datasets:
        if ds == "cifar" and not CIFAR.exists():
            print(f"skip cifar: {CIFAR} is absent")
            continue
        if ds == "fashion" and not (FASHION / "train-images-idx3-ubyte.gz").exists():
            print(f"skip fashion: {FASHION} is absent")
            continue
        folder = fashion_folder(work / "fashion5k") if ds == "fashion" else cifar_folder(work / "cifar5k", CIFAR)
        results[ds] = run_pipeline(f"{ds}5k", folder, work / f"repo-{ds}", args.seeds)
        print(json.dumps({ds: results[ds]}, indent=1), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
