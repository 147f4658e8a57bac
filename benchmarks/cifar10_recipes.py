"""Which view recipe teaches better on CIFAR-10: `rrc_flip` at 32 px next to `pad_crop_flip` (issue 26 item 5, CPU).

    python -m benchmarks.cifar10_recipes [--workdir /tmp/kdcache-c10-recipes] [--archive PATH] [--seeds 0 1 2]

Two arms, each in its own git clone of this repository's committed code under `--workdir` (`pad/`, `rrc/`; one
DVC cache `cache/` shared between them, so the identical `prepare` and `corrupt` outputs are computed once and the
second arm restores them from DVC's run-cache). Each applies `profiles/cifar10.yaml` with `prepare.root` = the
archive, `prepare.encode: keep` (both arms read the same JPEG shards), one teacher `resnet8` (4 epochs, as in the
profile), no ensembles, `distill.teachers: [resnet8]`, `distill.losses: [ce, kd]`, `distill.seeds` = `--seeds`
(default 0 1 2), and the arm's recipe in both `train_teacher.augment` (the teacher's fresh views) and
`teach.augment` (the 2 cached views, as the profile):

- `pad`: `{recipe: pad_crop_flip, pad: 4, flip: true}` (view 0 = the plain image);
- `rrc`: `{recipe: rrc_flip, size: 32, scale: [0.35, 1.0], crop_pct: 1.0, flip: true}` (view 0 and the test
  split: resize 32 + centre crop 32, i.e. the plain image).

Everything else (epochs, schedules, student `cnn_tiny`, corruptions) is the profile's, the same for both arms. Then
`dvc repro` in each clone, one after the other (resumable: rerunning continues where it stopped). The teacher is
one run per arm (`train_teacher.train.seed: 0`); the seeds are the students'. Prints, per arm, the teacher's
validation and test top-1 and, for the ce and kd students, validation top-1 mean ± std and 95% t-interval over
seeds and test top-1 mean ± std; then the paired difference rrc - pad per loss (paired by student seed) with its
95% t-interval, "within noise" where it crosses 0. Choices are made on validation (the 5,000 images `prepare` holds
out of train); test is reported alongside. About 2 h on 2 busy CPU cores for 3 seeds (per arm: teacher ~25 min,
teach a few min, 6 students ~2-4 min each).

The archive is `../shared/datasets/cifar10-jpeg.tar.gz` from the project root; where it is absent the benchmark
says so in one line and exits 0 (nothing downloads a data set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.cifar10_profile import ROOT, archive_args
from pipeline.evaluation.stats import Interval, mean_ci

TEACHER = "resnet8"
LOSSES = ("ce", "kd")
SEEDS = [0, 1, 2]
ARMS = {  # arm -> the view recipe of both train_teacher.augment and teach.augment
    "pad": {"recipe": "pad_crop_flip", "pad": 4, "flip": True},
    "rrc": {"recipe": "rrc_flip", "size": 32, "scale": [0.35, 1.0], "crop_pct": 1.0, "flip": True},
}


def arm_params(archive: Path, seeds: list[int], augment: dict) -> dict:
    """`profiles/cifar10.yaml` with the archive, JPEG shards, one teacher, ce + kd over `seeds`, and `augment`."""
    p = yaml.safe_load((ROOT / "profiles" / "cifar10.yaml").read_text())
    p["prepare"]["root"] = str(archive)
    p["prepare"]["encode"] = "keep"
    p["teachers"] = {TEACHER: p["teachers"][TEACHER]}
    p["ensembles"] = {}
    p["train_teacher"]["augment"] = dict(augment)
    p["teach"]["augment"] = dict(augment)
    p["distill"]["teachers"] = [TEACHER]
    p["distill"]["losses"] = list(LOSSES)
    p["distill"]["seeds"] = list(seeds)
    return p


def run_arm(work: Path, cache: Path, params: dict) -> float:
    """Clone (once), point DVC at the shared cache, write params.yaml (if changed), `dvc repro`; its wall seconds."""
    if not (work / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    # dvc.yaml's commands run `python`: this interpreter's (the venv's), whether or not the venv is activated
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "cache", "dir", "--local", str(cache)], cwd=work, env=env, check=True)
    new = yaml.safe_dump(params, sort_keys=False)
    target = work / "params.yaml"
    if not target.exists() or target.read_text() != new:
        target.write_text(new)
    start = time.perf_counter()
    subprocess.run([*dvc, "repro"], cwd=work, env=env, check=True)
    return time.perf_counter() - start


def collect(work: Path, seeds: list[int]) -> dict:
    """Top-1 (%) from the clone's metrics: the teacher's val/test, and each loss's per-seed student val/test lists."""
    t = json.loads((work / "metrics" / "teachers" / f"{TEACHER}.json").read_text())
    out: dict = {"teacher": (100 * t["val_accuracy"], 100 * t["accuracy"])}
    for loss in LOSSES:
        recs = [json.loads((work / "metrics" / f"{TEACHER}-{loss}-full-{s}.json").read_text()) for s in seeds]
        out[loss] = {"val": [100 * r["val_accuracy"] for r in recs], "test": [100 * r["accuracy"] for r in recs]}
    return out


def _ci(i: Interval) -> str:
    """`mean ± std [lo, hi]` (points), or the one value."""
    if i.std is None:
        return f"{i.mean:.2f}"
    return f"{i.mean:.2f} ± {i.std:.2f} [{i.lo:.2f}, {i.hi:.2f}]"


def _ms(i: Interval) -> str:
    return f"{i.mean:.2f}" if i.std is None else f"{i.mean:.2f} ± {i.std:.2f}"


def _diff(i: Interval) -> str:
    if i.lo is None:
        return f"{i.mean:+.2f} (one seed: no interval)"
    noise = "within noise" if i.lo <= 0 <= i.hi else ("rrc better" if i.lo > 0 else "pad better")
    return f"{i.mean:+.2f} [{i.lo:+.2f}, {i.hi:+.2f}] {noise}"


def table(res: dict, seeds: list[int]) -> str:
    """The markdown tables: per arm teacher and students, then the paired differences rrc - pad."""
    lines = [
        f"Top-1 (%), teacher {TEACHER} one run per arm (seed 0); students cnn_tiny over seeds {seeds}: "
        "mean ± std [95% t-interval]",
        "",
        "| arm | teacher val | teacher test | ce val | ce test | kd val | kd test |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in res.items():
        cells = [f"{r['teacher'][0]:.2f}", f"{r['teacher'][1]:.2f}"]
        for loss in LOSSES:
            cells += [_ci(mean_ci(r[loss]["val"])), _ms(mean_ci(r[loss]["test"]))]
        lines.append(f"| {arm} ({ARMS[arm]['recipe']}) | " + " | ".join(cells) + " |")
    if set(res) == set(ARMS):
        lines += [
            "",
            "Paired by student seed, rrc - pad (points): mean [95% t-interval]",
            "",
            "| loss | val top-1 | test top-1 |",
            "|---|---:|---:|",
        ]
        teach = [res["rrc"]["teacher"][k] - res["pad"]["teacher"][k] for k in (0, 1)]
        lines.append(f"| teacher (one run) | {teach[0]:+.2f} | {teach[1]:+.2f} |")
        for loss in LOSSES:
            cells = []
            for split in ("val", "test"):
                d = [b - a for a, b in zip(res["pad"][loss][split], res["rrc"][loss][split], strict=True)]
                cells.append(_diff(mean_ci(d)))
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, archive = archive_args(__doc__, "/tmp/kdcache-c10-recipes", argv, seeds=True)
    if archive is None:
        return 0
    seeds = args.seeds or SEEDS  # this benchmark's default: 3 seeds (not the profile's one)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    for arm, augment in ARMS.items():
        wall = run_arm(work / arm, work / "cache", arm_params(archive, seeds, augment))
        print(f"{arm}: dvc repro {wall:.0f} s wall in {work / arm}", flush=True)
        res[arm] = collect(work / arm, seeds)
    print(table(res, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
