"""When to turn `train_teacher.augment.flip` off: demo teachers with and without the horizontal flip on digits.

    python -m benchmarks.flip_digits [--seeds 0 1 2] [--out /tmp/kdcache-flip-digits] [--min-steps 200]

Makes a digits-like ImageFolder itself (no download, seeded, byte-identical on every run): classes "0".."9",
28x28 grayscale PNGs of a digit drawn with Pillow's default font at a random size and stroke width, then
rotated, sheared and shifted, dimmed, crossed by up to two stray lines and given Gaussian noise; 360 train
images per class (10% of them become the validation split) and 100 test images per class. The folder goes
through the real `prepare` stage (source imagefolder, mode L, `val: 0.1`), then the default `cnn` teacher
(cnn_small, `teachers.cnn` and `train_teacher` of params.yaml) is trained by the real `train_teacher` stage twice
per seed: `train_teacher.augment` = {recipe: pad_crop_flip, pad: 4, flip: true} (the default) and the same with
flip: false, with `train_teacher.train.seed` = seed. Everything else is the default params' recipe except
`train_teacher.train.min_steps` (`--min-steps`, the same for both arms: 200 raises the 5 epochs to 8 here;
params.yaml's 2000, ~80 epochs of these 3,240 images, takes 10-30 minutes per teacher on 2 shared CPU cores).

The decision is made on validation top-1: per arm mean ± std over seeds and its 95% t-interval, and the paired
difference (flip off - flip on) per seed with its mean and 95% interval (`pipeline.evaluation.stats.mean_ci`
over the per-seed differences); an interval that crosses 0 is "within noise". Test top-1 is shown only in the
final table. Writes `<out>/flip_digits.md` and `<out>/flip_digits.json`; a finished run (its metrics record, trained
with the same params) is read back, not retrained, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.shards import load_manifest
from pipeline.evaluation.report import fmt_ci, fmt_iv
from pipeline.evaluation.stats import Interval, mean_ci
from pipeline.layout import Layout
from pipeline.records import read_record

ROOT = Path(__file__).resolve().parents[1]
DATASET = "digits"
TEACHER = "cnn"
SIZE, CANVAS = 28, 64  # drawn on a 64x64 canvas, then resized to 28x28
PER_CLASS = {"train": 360, "test": 100}
DATA_SEED = 0
ARMS = {"flip on": True, "flip off": False}


# ---------------------------------------------------------------------------------------------
# the data set


def render_digit(digit: int, rng: np.random.Generator, fonts: dict[int, Any]) -> Image.Image:
    """One 28x28 grayscale image of `digit`: random font size, stroke, rotation, shear, shift, contrast, clutter,
    noise."""
    size = int(rng.integers(34, 50))
    if size not in fonts:
        fonts[size] = ImageFont.load_default(size=size)  # Pillow >= 10.1: the bundled scalable font
    img = Image.new("L", (CANVAS, CANVAS), 0)
    stroke = int(rng.integers(0, 3))
    c = CANVAS / 2
    ImageDraw.Draw(img).text((c, c), str(digit), fill=255, font=fonts[size], anchor="mm", stroke_width=stroke,
                             stroke_fill=255)  # fmt: skip
    angle, shear = np.deg2rad(rng.uniform(-18, 18)), rng.uniform(-0.25, 0.25)
    shift = rng.uniform(-7, 7, 2)
    fwd = np.array([[np.cos(angle), -np.sin(angle) + shear], [np.sin(angle), np.cos(angle)]])
    inv = np.linalg.inv(fwd)  # Pillow's AFFINE maps output pixels to input pixels
    off = np.array([c, c]) - inv @ (np.array([c, c]) + shift)
    img = img.transform((CANVAS, CANVAS), Image.Transform.AFFINE, (*inv[0], off[0], *inv[1], off[1]),
                        resample=Image.Resampling.BILINEAR)  # fmt: skip
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # stray strokes
        draw.line(list(rng.uniform(0, CANVAS, 4)), fill=int(rng.integers(60, 200)), width=int(rng.integers(1, 4)))
    a = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float64)
    a = a * rng.uniform(0.5, 1.0) + rng.uniform(0, 60) + rng.normal(0, rng.uniform(10, 35), a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def make_digits(folder: Path, seed: int = DATA_SEED) -> Path:
    """`folder/{train,test}/<digit>/<split>-<digit>-<i>.png`; image (split, digit, i) depends only on those and
    `seed`."""
    done = folder / "done.json"
    spec = {"seed": seed, "per_class": PER_CLASS, "size": SIZE}
    if done.exists() and json.loads(done.read_text()) == spec:
        return folder
    fonts: dict[int, Any] = {}
    for s, (split, n) in enumerate(PER_CLASS.items()):
        for digit in range(10):
            d = folder / split / str(digit)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, s, digit, i])
                render_digit(digit, rng, fonts).save(d / f"{split}-{digit}-{i:04d}.png", optimize=False)
    done.write_text(json.dumps(spec) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# the stages


def arm_params(folder: Path, flip: bool, seed: int, min_steps: int) -> dict[str, Any]:
    """params.yaml with `prepare` pointed at the digits, only the `cnn` teacher, and this arm's augment and seed."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(
        name=DATASET, source="imagefolder", root=str(folder), options={"mode": "L"}, splits=["train", "test"], val=0.1
    )
    params["teachers"] = {TEACHER: params["teachers"][TEACHER]}
    params["ensembles"], params["query"] = {}, {}
    params["distill"]["teachers"] = [TEACHER]
    tt = params["train_teacher"]
    tt["augment"] = {"recipe": "pad_crop_flip", "pad": 4, "flip": flip}
    tt["train"].update(seed=seed, min_steps=min_steps)
    return params


def run_stage(cwd: Path, params: dict[str, Any], *args: str) -> None:
    """`python -m stages.<args>` in `cwd` (its own params.yaml, logs/ and data/), output to `cwd/stage.log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(cwd / "stage.log", "a") as log:
        res = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed in {cwd} (exit {res.returncode}); see {cwd / 'stage.log'}")


def train_arm(work: Path, shards: Path, folder: Path, arm: str, seed: int, min_steps: int) -> dict[str, Any]:
    """The teacher of one (arm, seed): its metrics record (read back if this run finished before)."""
    cwd = work / "runs" / f"{arm.replace(' ', '_')}-s{seed}"
    details = Layout(DATASET, root=cwd).teacher_details(TEACHER)
    params = arm_params(folder, ARMS[arm], seed, min_steps)
    done = details.exists() and yaml.safe_load((cwd / "params.yaml").read_text()) == params  # same recipe as asked
    if not done:
        run_stage(cwd, params, "stages.train_teacher", "--name", TEACHER, "--shards", str(shards), "--restart")
    return read_record(details, "teacher")


# ---------------------------------------------------------------------------------------------
# the table


def _diff(iv: Interval) -> str:
    """A mean difference in points with its 95% interval (none with one seed)."""
    return f"{100 * iv.mean:+.2f}" + (f" {fmt_ci(iv)}" if iv.lo is not None else "")


def table(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int], min_steps: int, shards: Path) -> str:
    on, off = ([results[a][s] for s in seeds] for a in ARMS)
    manifest = load_manifest(shards)
    n = {split: f"{manifest.split(split).n:,}" for split in ("train", "val", "test")}
    sched = on[0].get("schedule", {})
    lines = [
        f"flip_digits: `{TEACHER}` (cnn_small) teachers on a rendered-digits ImageFolder ({n['train']} train / "
        f"{n['val']} val / {n['test']} test, 28x28 L), {sched.get('steps')} steps ({sched.get('rule')}, "
        f"min_steps {min_steps}), seeds {seeds}; top-1 (%), mean ± std [95% t-interval over seeds]. "
        "Decided on validation.",
        "",
        "| augment | val top-1 | val 95% interval | test top-1 | test 95% interval |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        val = mean_ci([results[arm][s]["val_accuracy"] for s in seeds])
        test = mean_ci([results[arm][s]["accuracy"] for s in seeds])
        lines.append(f"| pad_crop_flip, {arm} | {fmt_iv(val)} | {fmt_ci(val)} | {fmt_iv(test)} | {fmt_ci(test)} |")
    lines += ["", "| seed | val: flip on | val: flip off | val: off - on | test: off - on |"]
    lines.append("|---|---:|---:|---:|---:|")
    dval = [b["val_accuracy"] - a["val_accuracy"] for a, b in zip(on, off, strict=True)]
    dtest = [b["accuracy"] - a["accuracy"] for a, b in zip(on, off, strict=True)]
    for s, a, b, dv, dt in zip(seeds, on, off, dval, dtest, strict=True):
        lines.append(f"| {s} | {100 * a['val_accuracy']:.2f} | {100 * b['val_accuracy']:.2f} | {100 * dv:+.2f} | "
                     f"{100 * dt:+.2f} |")  # fmt: skip
    iv, it = mean_ci(dval), mean_ci(dtest)
    lines.append(f"| mean [95%] | | | {_diff(iv)} | {_diff(it)} |")
    lines.append("")
    if iv.lo is None:
        verdict = "one seed, so no interval and no verdict (run --seeds 0 1 2)"
    elif iv.lo <= 0 <= iv.hi:
        verdict = "within noise (the paired interval crosses 0)"
    else:
        verdict = f"flip off {'raises' if iv.mean > 0 else 'lowers'} validation top-1 (the interval excludes 0)"
    lines.append(f"Paired validation difference, flip off - flip on: {_diff(iv)} points: {verdict}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n")
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.flip_digits",
        description=first,
        epilog=rest.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    ap.add_argument("--out", default="/tmp/kdcache-flip-digits", help="work folder and results (default: %(default)s)")
    ap.add_argument(
        "--min-steps", type=int, default=200, help="train_teacher.train.min_steps of both arms (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    work = Path(args.out).resolve()
    folder = make_digits(work / "imagefolder")
    prep = work / "prepare"
    shards = Layout(DATASET, root=prep).shards
    if not (shards / "manifest.json").exists():
        run_stage(prep, arm_params(folder, True, 0, args.min_steps), "stages.prepare", "--out", str(shards))
    results: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            m = train_arm(work, shards, folder, arm, seed, args.min_steps)
            results[arm][seed] = m
            print(f"seed {seed}, {arm}: val top-1 {100 * m['val_accuracy']:.2f}, test top-1 "
                  f"{100 * m['accuracy']:.2f} ({m.get('schedule', {}).get('steps')} steps)", flush=True)  # fmt: skip
    text = table(results, args.seeds, args.min_steps, shards)
    (work / "flip_digits.md").write_text(text)
    keep = ("val_accuracy", "accuracy", "top5", "schedule", "selected_epoch", "warnings")
    summary = {arm: {s: {k: m.get(k) for k in keep} for s, m in r.items()} for arm, r in results.items()}
    (work / "flip_digits.json").write_text(json.dumps({"min_steps": args.min_steps, "results": summary}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
