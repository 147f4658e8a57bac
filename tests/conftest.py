"""Shared fixtures: tiny data sets in temp dirs, in the same formats the pipeline uses for real data."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from pipeline.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before numpy/torch load: the tests compute with the kernels every stage runs (pipeline/kernels.py)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.data.shards import Manifest, write_dataset  # noqa: E402
from pipeline.data.sources import load_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # the CI machine has 2 cores; tests must not fight over them

# params.yaml for a tiny end-to-end run: synthetic 16x16 images, 2 tiny teachers, one epoch.
TINY_PARAMS: dict = {
    "runtime": {"reproducible": True},
    "prepare": {
        "name": "tiny",
        "source": "synthetic",
        "root": "unused",
        "options": {"n": 256, "size": 16, "channels": 1, "num_classes": 4, "seed": 0},
        "shard_size": 64,
        "splits": ["train", "test"],
        "limit": None,
        "shuffle_seed": 0,
    },
    "teachers": {
        "small": {"arch": "cnn_tiny", "epochs": 4, "lr": 0.1, "batch_size": 32},
    },
    "ensembles": {},
    "query": {},
    "train_teacher": {"train": {"workers": 0, "shuffle_buffer": 64, "seed": 0, "threads": 1}},
    "teach": {
        "views": 2,
        "test_views": 1,
        "view_seed": 0,
        "augment": {"pad": 2, "flip": True},
        "dtype": "float16",
        "batch_size": 64,
        "chunk_rows": 32,
        "compressor": "blosc-zstd",
        "topk": 0,
        "budget": None,
        "strategy": "random",
        "budget_seed": 0,
        "threads": 1,
        "cluster": "none",
        "workers": 2,
    },
    "distill": {
        "teachers": ["small"],
        "losses": ["ce", "kd"],
        "budgets": ["full"],
        "seeds": [0],
        "student": "cnn_tiny",
        "student_preprocess": "data",
        "unqueried": "drop",
        "pool_epoch_samples": None,
        "teacher_source": "cache",
        "train": {"epochs": 1, "batch_size": 32, "workers": 0, "shuffle_buffer": 64, "threads": 1},
        "loss_params": {
            "ce": {},
            "kd": {"T": 4.0, "a": 0.1, "b": 0.9},
            "dkd": {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 1},
            "dist": {"beta": 1.0, "gamma": 1.0, "T": 4.0, "w": 2.0},
            "cmkd": {"T": 4.0, "scale": 4.0},
            "ckd": {"T": 4.0},
            "lskd": {"T": 2.0, "a": 0.1, "b": 9.0},
            "mtkd": {"T": 4.0, "a": 0.1, "b": 0.9, "weighting": "mean"},
        },
    },
    "corrupt": {
        "corruptions": [
            "gaussian_noise",
            "shot_noise",
            "gaussian_blur",
            "contrast",
            "brightness",
            "haze",
            "pixelate",
            "jpeg",
        ],
        "severities": [1, 2, 3, 4, 5],
        "seed": 0,
        "limit": 32,
    },
    "evaluate": {"batch_size": 128, "topk": [1, 2]},
    "report": {"title": None},  # the title comes from the manifest
}


def tiny_params(**overrides: dict) -> dict:
    """A deep copy of TINY_PARAMS with per-section overrides merged in (one level deep)."""
    p = copy.deepcopy(TINY_PARAMS)
    for sec, vals in overrides.items():
        if isinstance(vals, dict) and isinstance(p.get(sec), dict):
            p[sec].update(vals)
        else:
            p[sec] = vals
    return p


def make_project(root: Path, params: dict | None = None) -> Path:
    """A runnable kdcache project folder: dvc.yaml + params.yaml (tiny); stages run from it as cwd."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    for code in ("pipeline", "stages"):  # dvc.yaml lists code files as deps, relative to the project
        shutil.copytree(ROOT / code, root / code, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copytree(ROOT / "weights", root / "weights", dirs_exist_ok=True)  # a dep of the `teachers` stage
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = a fresh tiny project."""
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def synthetic_splits(n_train: int = 256, n_test: int = 96, size: int = 16, channels: int = 1, classes: int = 4):
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = load_split("synthetic", None, split, n=n, size=size, channels=channels, num_classes=classes, seed=0)
        out[split] = (d.images, d.labels)
    return out, [f"class_{k}" for k in range(classes)]


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """A prepared tiny data set (read-only: tests that modify shards make their own)."""
    splits, classes = synthetic_splits()
    return write_dataset(tmp_path_factory.mktemp("shards") / "tiny", "tiny", splits, classes, shard_size=64)


@pytest.fixture
def fresh_manifest(tmp_path: Path) -> Manifest:
    splits, classes = synthetic_splits()
    return write_dataset(tmp_path / "shards", "tiny", splits, classes, shard_size=64)


def file_digests(root: Path) -> dict[str, str]:
    """Every file under `root` (or `root` itself) -> its sha256: what DVC's hash of an output depends on."""
    import hashlib

    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    names = [str(p.relative_to(root)) if p != root else p.name for p in files]
    return {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in zip(names, files, strict=True)}


def assert_same_files(a: Path, b: Path) -> None:
    """Byte for byte: the same files (names and contents) under `a` and `b` (stores, student folders, metrics)."""
    da, db = file_digests(a), file_digests(b)
    assert sorted(da) == sorted(db), f"different files: {sorted(set(da) ^ set(db))}"
    differ = sorted(k for k in da if da[k] != db[k])
    assert not differ, f"files differ between {a} and {b}: {differ}"


def cached_tiny(root: Path, n_train: int = 300, n_test: int = 64) -> tuple[Manifest, Path, torch.nn.Module]:
    """Synthetic shards of 64 (the last one short) cached by a fixed random cnn_tiny teacher, 2 views, float16.

    Returns (manifest, store path, teacher)."""
    from pipeline.cache.budget import BudgetSpec
    from pipeline.cache.teach import build_spec, run_teach
    from pipeline.data.views import PadCropFlip

    splits, classes = synthetic_splits(n_train=n_train, n_test=n_test)
    m = write_dataset(root / "shards", "tiny", splits, classes, shard_size=64)
    teacher = linear_teacher(m, seed=1)
    recipes = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}
    info = {"name": "lin", "arch": "cnn_tiny", "weights_sha256": "0"}
    spec = build_spec(
        m, info, recipes, dtype="float16", topk=0, compressor="blosc-zstd", chunk_rows=64, budget=BudgetSpec()
    )
    run_teach(m, teacher, root / "lin.zarr", spec, recipes, batch_size=256)
    return m, root / "lin.zarr", teacher


def linear_teacher(manifest: Manifest, seed: int = 0) -> torch.nn.Module:
    """A deterministic small teacher for store tests (no training needed)."""
    from pipeline.models import build_for

    torch.manual_seed(seed)
    return build_for("cnn_tiny", manifest).eval()


os.environ.setdefault("DVC_NO_ANALYTICS", "1")
np.set_printoptions(precision=4)


def teacher_inputs(
    manifest: Manifest, spec, recipes, calls: list[torch.Tensor]
) -> dict[tuple[str, int, int], torch.Tensor]:
    """(split, index, view) -> the input the teacher saw, from the batches `run_teach` fed it in order: shards in
    order, views in order, one call per (shard, view) (batch_size >= shard size)."""
    seen, k = {}, 0
    for split in spec.splits:
        for shard in manifest.split(split).shards:
            for v in range(recipes[split].views):
                for row, x in enumerate(calls[k]):
                    seen[(split, shard.start + row, v)] = x
                k += 1
    return seen


def check_student_inputs(ds, seen: dict, batch_size: int, epochs: tuple[int, ...] = (0, 1)) -> int:
    """Assert every training input the loader gives over `epochs` is bit for bit the teacher's input for that
    (index, view); returns how many were checked."""
    from pipeline.models import to_input
    from pipeline.training.transport import make_loader

    checked = 0
    for epoch in epochs:
        ds.set_epoch(epoch)
        for batch in make_loader(ds, batch_size, workers=0):
            x = to_input(batch["image"])
            for j in range(len(x)):
                key = ("train", int(batch["index"][j]), int(batch["view"][j]))
                assert torch.equal(x[j], seen[key]), key
                checked += 1
    return checked


def bump_export_schema(src: Path, dst: Path) -> Path:
    """A copy of the `.pt2` archive `src` at `dst` whose model says a newer torch.export schema (major + 1): what a
    program saved by a newer torch looks like to this one."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("models/model.json"):
                model = json.loads(data)
                model["schema_version"]["major"] += 1
                data = json.dumps(model).encode()
            zout.writestr(item, data)
    return dst


def taught_project(root: Path, params: dict | None = None) -> Path:
    """A tiny project at `root` with its shards, the demo teacher `small` trained and its store cached (the stages
    themselves, run from the project folder)."""
    from stages import prepare, teach, train_teacher

    make_project(root, params)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare.main([])
        train_teacher.main(["--name", "small"])
        teach.main(["--name", "small"])
    finally:
        os.chdir(cwd)
    return root
