"""CMKD ablation (Niu et al. 2024, Table VI) on the default data set, teacher and student.

    python -m benchmarks.ablation_cmkd [--teacher resnet] [--seeds 0 1 2] [--epochs N] [--strengths 0.1 0.01]
        [--out benchmarks/results]

Rows: KL (plain KD) | Pearson | Pearson + z-score | + Spearman | + entropy weighting (Spearman-heavy
on low-entropy samples) | + entropy weighting (Spearman-heavy on high-entropy samples). Each row is a
student trained exactly as `dvc repro` trains it (stages.distill / stages.evaluate): mean ± std
and 95% interval of the validation top-1 (what a choice between rows is made on: the
`spearman_heavy_when` default is the better of the last two rows on validation) and, for the record,
the test top-1. Needs `dvc repro teach@<teacher>` first. Prints a markdown table and writes it to
<out>/ablation_cmkd.md. Resumable: a row-seed whose metrics exist is read, not retrained.

`--strengths`: more "+ Spearman" rows with these soft-rank regularization strengths. At strength >= 1 the
soft rank of z-scored logits is exactly affine in them for C >= 4 classes (tests/test_losses_cmkd_rank.py),
so the default "+ Spearman" row matches the Pearson correlation of the logits, not of their ranks; smaller
strengths make the soft ranks approach the hard ranks.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from benchmarks.students import find_student, run_student, summarize

T = 4.0


def rows(cmkd_defaults: dict, strengths: tuple[float, ...] = ()) -> list[tuple[str, str, dict | None]]:
    base = {**cmkd_defaults, "T": T}
    spearman = {**base, "entropy_weighting": False}
    return [
        ("KL (KD, T=4)", "kd", None),
        ("Pearson", "cmkd", {**base, "use_zscore": False, "use_spearman": False, "entropy_weighting": False}),
        ("Pearson + z-score", "cmkd", {**base, "use_spearman": False, "entropy_weighting": False}),
        ("+ Spearman", "cmkd", {**base, "entropy_weighting": False}),
        (
            "+ entropy weighting (Spearman-heavy: low entropy)",
            "cmkd",
            {**base, "entropy_weighting": True, "spearman_heavy_when": "low_entropy"},
        ),
        (
            "+ entropy weighting (Spearman-heavy: high entropy)",
            "cmkd",
            {**base, "entropy_weighting": True, "spearman_heavy_when": "high_entropy"},
        ),
        *(
            (f"+ Spearman, soft-rank strength {eps:g}", "cmkd", {**spearman, "regularization_strength": eps})
            for eps in strengths
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override distill.train.epochs")
    ap.add_argument(
        "--strengths", type=float, nargs="*", default=[], help="extra '+ Spearman' rows at these soft-rank strengths"
    )
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    overrides = {"train": {"epochs": args.epochs}} if args.epochs else {}
    epochs = args.epochs or params["distill"]["train"]["epochs"]
    work = Path(args.out) / "ablation_cmkd"
    lines = [
        f"CMKD ablation: teacher `{args.teacher}`, student `{params['distill']['student']}`, {epochs} epochs, "
        f"seeds {args.seeds}; top-1 (%) mean ± std [95% interval]; choices are read off validation.",
        "",
        "| variant | validation top-1 | test top-1 | agreement with teacher |",
        "|---|---:|---:|---:|",
    ]
    cmkd_defaults = params["distill"]["loss_params"].get("cmkd", {})
    for k, (label, loss, lp) in enumerate(rows(cmkd_defaults, tuple(args.strengths))):
        vals, accs, agrees = [], [], []
        for seed in args.seeds:
            m = find_student(work, f"row{k}-s{seed}")  # resumable
            if m is None:
                m = run_student(
                    work,
                    f"row{k}-s{seed}",
                    teacher=args.teacher,
                    loss=loss,
                    loss_params=lp,
                    seed=seed,
                    distill_overrides=overrides,
                )
            vals.append(m["val_accuracy"])
            accs.append(m["accuracy"])
            agrees.append(100 * m.get("agreement", float("nan")))
        row = f"| {label} | {summarize(vals)} | {summarize(accs)} | {statistics.mean(agrees):.2f} |"
        lines.append(row)
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "ablation_cmkd.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
