"""Active teacher queries against fixed orders (issue 14): which calls should a small teacher budget buy?

    python -m benchmarks.active_sweep [--teacher resnet] [--budgets 100 300]
        [--strategies random class_balanced entropy margin diversity] [--losses kd dist ckd] [--seeds 0 1 2]
        [--steps 500] [--pool-epoch 12800] [--rounds 5] [--round-steps 500] [--round-loss same]
        [--seed-strategy random] [--out benchmarks/results/active] [--params params.yaml]

Run from a project whose teacher is trained (`dvc repro train_teacher@<teacher>`; the project's data is read,
never written). For every budget, strategy and seed the sweep builds a logit store of the teacher's answers with
the library functions the stages call: `random` and `class_balanced` are fixed orders (`teach_store` with
`teach.budget`/`teach.strategy`/`teach.budget_seed`: the `teach` stage), `entropy`, `margin` and `diversity` are
active queries (`query_store`: the `query` stage) in `--rounds` rounds of budget/rounds calls each (round 0 in
`--seed-strategy`'s order, with the same seed: for `random`, exactly the first calls of the random store); the
round students are the distill student with `--round-steps` steps and the loss of the student they serve
(`--round-loss same`; or one fixed loss for every store). Then every loss trains a student on every store
exactly as `distill`/`evaluate` do (`benchmarks.students.run_student`, the queried pool, `--steps` steps for every
student, the checkpoint best on the validation split), scored once on the test split.

Seeds pair the comparisons: seed s is the store's selection seed and its student's seed. Against `random` the
sweep reports, per cell, the mean of the per-seed differences with its 95% t-interval over seeds (the selection's
seed-to-seed variation; significant when the interval excludes 0) and the paired bootstrap over test images
(`pipeline.evaluation.stats.paired_comparison`). Costs: teacher calls, student steps spent on selection and
wall time per store (from the stage's run log). Resumable: finished stores and students are kept; a killed
store resumes in the round it was in. Writes <out>/results.md, <out>/results.json and <out>/active.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.students import run_student, summarize
from pipeline.active.rounds import query_store
from pipeline.cache.store import LogitStore
from pipeline.cache.teach import teach_store
from pipeline.config import (
    DistillConfig,
    PrepareConfig,
    QuerySpec,
    TeachConfig,
    from_dict,
    load_params,
    section,
)
from pipeline.data.shards import load_manifest
from pipeline.evaluation.report import fmt_ci, fmt_p
from pipeline.evaluation.stats import mean_ci, paired_comparison
from pipeline.evaluation.study import read_correct
from pipeline.layout import Layout
from pipeline.runtime import setup_logging

FIXED = ("random", "class_balanced")
ACTIVE = ("entropy", "margin", "diversity")


@dataclasses.dataclass(frozen=True)
class Cell:
    strategy: str
    loss: str
    budget: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.loss}-{self.budget}-{self.seed}"


class Sweep:
    """The sweep's stores and students under `out`, built from the project's params."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.params = load_params(args.params)
        self.layout = Layout(from_dict(PrepareConfig, section(self.params, "prepare"), "prepare").name)
        self.manifest = load_manifest(self.layout.shards)
        self.teach = from_dict(TeachConfig, section(self.params, "teach"), "teach")
        self.overrides = {"train": {"steps": args.steps, "epochs": None}, "pool_epoch_samples": args.pool_epoch}
        distill = {**section(self.params, "distill"), "pool_epoch_samples": args.pool_epoch}
        self.distill = from_dict(DistillConfig, distill, "distill")  # the round students' recipe
        self.checkpoint = self.layout.teacher_checkpoint(args.teacher)
        self.out = Path(args.out)

    def store_key(self, strategy: str, budget: int, seed: int, loss: str) -> str:
        shared = strategy in FIXED or self.args.round_loss != "same"
        return f"{strategy}-{budget}-{seed}" if shared else f"{strategy}-{budget}-{seed}-{loss}"

    def store(self, strategy: str, budget: int, seed: int, loss: str) -> Path:
        """The store of this strategy, budget and seed (built now unless it is complete)."""
        key = self.store_key(strategy, budget, seed, loss)
        path = self.out / "stores" / f"{key}.zarr"
        if path.exists():
            return path
        run_log = self.out / "logs" / f"{key}.json"
        if strategy in FIXED:
            cfg = dataclasses.replace(self.teach, budget=budget, strategy=strategy, budget_seed=seed)
            return teach_store(self.manifest, self.checkpoint, path, cfg, self.args.teacher, run_log=run_log)
        per_round = max(1, budget // self.args.rounds)
        spec = QuerySpec(
            teacher=self.args.teacher,
            budget=budget,
            initial=per_round,
            per_round=per_round,
            seed_strategy=self.args.seed_strategy,
            score=strategy,
            loss=loss if self.args.round_loss == "same" else self.args.round_loss,
            steps=self.args.round_steps,
            seed=seed,
        )
        return query_store(self.manifest, self.checkpoint, path, spec, self.teach, self.distill, key, run_log=run_log)

    def student(self, cell: Cell) -> dict[str, Any]:
        metrics = self.out / "metrics" / f"{cell.name}.json"
        if metrics.exists():
            return json.loads(metrics.read_text())
        path = self.store(cell.strategy, cell.budget, cell.seed, cell.loss)
        m = run_student(
            self.out,
            cell.name,
            teacher=self.args.teacher,
            loss=cell.loss,
            seed=cell.seed,
            budget=cell.budget,
            store=str(path),
            distill_overrides=self.overrides,
            params_path=self.args.params,
        )
        print(f"{cell.name}: top-1 {100 * m['accuracy']:.2f} (teacher calls {m['teacher_calls']})", flush=True)
        return m

    def cost(self, strategy: str, budget: int, seed: int, loss: str) -> dict[str, Any]:
        """Teacher calls, selection steps and wall time of one store (store attrs + its run log)."""
        key = self.store_key(strategy, budget, seed, loss)
        store = LogitStore(self.out / "stores" / f"{key}.zarr", "train")
        rounds = store.group.attrs.get("rounds") or []
        logged = self.out / "logs" / f"{key}.json"
        rec = json.loads(logged.read_text()) if logged.is_file() else {}
        timing = rec.get("rounds") or []
        return {
            "teacher_calls": store.teacher_calls,
            "rounds": len(rounds) or None,
            "selection_steps": sum(r.get("student_steps", 0) for r in rounds),
            "select_s": sum(r.get("select_s", 0.0) for r in timing) if timing else None,
            "teacher_s": sum(r.get("teacher_s", 0.0) for r in timing) if timing else None,
            "seconds": rec.get("seconds"),
        }


def cells(args: argparse.Namespace) -> Iterable[Cell]:
    """Store-major order: every loss of a store right after it is built (a store is reused while it is hot)."""
    for budget in args.budgets:
        for seed in args.seeds:
            for strategy in args.strategies:
                for loss in args.losses:
                    yield Cell(strategy, loss, budget, seed)


def _correct(out: Path, cell: Cell) -> np.ndarray:
    return read_correct(out / "confusion" / f"{cell.name}.csv")


def analyse(sweep: Sweep) -> dict[str, Any]:
    """Means and intervals per cell, paired differences against `random`, costs; JSON-able."""
    a, out = sweep.args, sweep.out
    res: dict[str, Any] = {"cells": {}, "vs_random": {}, "costs": {}}
    for budget in a.budgets:
        for loss in a.losses:
            for strategy in a.strategies:
                accs = [json.loads((out / "metrics" / f"{Cell(strategy, loss, budget, s).name}.json").read_text())
                        ["accuracy"] for s in a.seeds]  # fmt: skip
                res["cells"][f"{strategy}|{loss}|{budget}"] = accs
                if strategy != "random" and "random" in a.strategies:
                    base = res["cells"].get(f"random|{loss}|{budget}")
                    if base is None:
                        base = [json.loads((out / "metrics" / f"{Cell('random', loss, budget, s).name}.json")
                                           .read_text())["accuracy"] for s in a.seeds]  # fmt: skip
                    diffs = [x - y for x, y in zip(accs, base, strict=True)]
                    iv = mean_ci(diffs)
                    pa = np.stack([_correct(out, Cell(strategy, loss, budget, s)) for s in a.seeds])
                    pb = np.stack([_correct(out, Cell("random", loss, budget, s)) for s in a.seeds])
                    paired = paired_comparison(pa, pb)
                    res["vs_random"][f"{strategy}|{loss}|{budget}"] = {
                        "diffs": diffs,
                        "mean": iv.mean,
                        "lo": iv.lo,
                        "hi": iv.hi,
                        "significant_over_seeds": iv.lo is not None and (iv.lo > 0 or iv.hi < 0),
                        "bootstrap": dataclasses.asdict(paired),
                    }
        for strategy in a.strategies:
            losses = a.losses if strategy in ACTIVE and a.round_loss == "same" else a.losses[:1]
            rows = [sweep.cost(strategy, budget, s, loss) for s in a.seeds for loss in losses]
            res["costs"][f"{strategy}|{budget}"] = rows
    return res


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def write_markdown(sweep: Sweep, res: dict[str, Any]) -> Path:
    a = sweep.args
    lines = [
        f"# Active teacher queries: teacher {a.teacher}, data set {sweep.manifest.dataset}",
        "",
        f"Command: `python -m benchmarks.active_sweep {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Students: {sweep.distill.student}, {a.steps} steps each (pool epochs of {a.pool_epoch} draws), checkpoint "
        "best on validation, test top-1 (%) as mean ± std [95% t-interval] over seeds "
        f"{', '.join(map(str, a.seeds))}. Active stores: {a.rounds} rounds of budget/{a.rounds} calls, round 0 in "
        f"`{a.seed_strategy}` order, round students of {a.round_steps} steps with "
        f"{'the loss of the student they serve' if a.round_loss == 'same' else 'loss ' + a.round_loss}.",
        "",
    ]
    for budget in a.budgets:
        lines += [f"## {budget} teacher calls", "", "| loss | " + " | ".join(a.strategies) + " |"]
        lines.append("|---|" + "---:|" * len(a.strategies))
        for loss in a.losses:
            cells_ = [summarize(res["cells"][f"{s}|{loss}|{budget}"]) for s in a.strategies]
            lines.append(f"| {loss} | " + " | ".join(cells_) + " |")
        lines.append("")
        if "random" in a.strategies:
            lines += [
                "Against `random` (points; per-seed differences: mean [95% t-interval over seeds]; paired bootstrap "
                "over test images: p):",
                "",
                "| loss | " + " | ".join(s for s in a.strategies if s != "random") + " |",
                "|---|" + "---:|" * (len(a.strategies) - 1),
            ]
            for loss in a.losses:
                row = []
                for s in a.strategies:
                    if s == "random":
                        continue
                    v = res["vs_random"][f"{s}|{loss}|{budget}"]
                    iv = mean_ci(v["diffs"])
                    mark = "**" if v["significant_over_seeds"] and v["mean"] > 0 else ""
                    row.append(f"{mark}{_pp(v['mean'])}{mark} {fmt_ci(iv)} p={fmt_p(v['bootstrap']['p'])}")
                lines.append(f"| {loss} | " + " | ".join(row) + " |")
            lines.append("")
        lines += ["Cost per store (mean over its stores): teacher calls (train split), rounds, student steps spent on",
                  "selection, wall time of selection and of the teacher's calls (s, this machine, shared cores):", "",
                  "| strategy | teacher calls | rounds | selection steps | selection s | teacher s | whole store s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for s in a.strategies:
            rows = res["costs"][f"{s}|{budget}"]

            def avg(key: str, digits: int = 0, rows: list[dict[str, Any]] = rows) -> str:
                vals = [r[key] for r in rows if r.get(key) is not None]
                return f"{np.mean(vals):.{digits}f}" if vals else "-"

            lines.append(
                f"| {s} | {avg('teacher_calls')} | {avg('rounds')} | {avg('selection_steps')} | {avg('select_s', 1)} | "
                f"{avg('teacher_s', 1)} | {avg('seconds', 1)} |"
            )
        lines.append("")
    lines += ["![student top-1 against teacher calls, one line per strategy](active.png)", ""]
    path = sweep.out / "results.md"
    path.write_text("\n".join(lines))
    return path


def figure(sweep: Sweep, res: dict[str, Any]) -> Path:
    """Top-1 against teacher calls (log x), one panel per loss, one line per strategy, 95% t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = sweep.args
    fig, axes = plt.subplots(1, len(a.losses), figsize=(4.6 * len(a.losses), 4.0), squeeze=False, sharey=True)
    for ax, loss in zip(axes[0], a.losses, strict=True):
        for k, s in enumerate(a.strategies):
            ivs = [mean_ci(res["cells"][f"{s}|{loss}|{b}"]) for b in a.budgets]
            m = [100 * iv.mean for iv in ivs]
            err = None
            if all(iv.lo is not None for iv in ivs):
                err = np.array([[100 * (iv.mean - iv.lo), 100 * (iv.hi - iv.mean)] for iv in ivs]).T
            xs = [b * (1 + 0.03 * (k - len(a.strategies) / 2)) for b in a.budgets]  # dodge the error bars
            style = "--" if s in FIXED else "-"
            ax.errorbar(xs, m, yerr=err, marker="o", ms=4, capsize=3, ls=style, label=s)
        ax.set_xscale("log")
        ax.set_xticks(a.budgets, [str(b) for b in a.budgets])
        ax.minorticks_off()
        ax.set_title(f"loss {loss}", fontsize=10)
        ax.set_xlabel("teacher calls (log)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("student test top-1 (%)")
    axes[0, -1].legend(fontsize=8, title="strategy", title_fontsize=8)
    n = len(a.seeds)
    fig.suptitle(f"Which calls to buy: teacher {a.teacher}, mean of {n} seeds" + (", 95% t-intervals" if n > 1 else ""))
    fig.tight_layout()
    path = sweep.out / "active.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet")
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--strategies", nargs="+", default=[*FIXED, *ACTIVE], choices=[*FIXED, *ACTIVE])
    ap.add_argument("--losses", nargs="+", default=["kd", "dist", "ckd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps of every final student")
    ap.add_argument("--pool-epoch", type=int, default=12800, help="distill.pool_epoch_samples (draws per epoch)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per active store (budget/rounds calls each)")
    ap.add_argument("--round-steps", type=int, default=500, help="optimizer steps of each round's student")
    ap.add_argument("--round-loss", default="same", help="'same' (the final student's loss) or a loss name")
    ap.add_argument("--seed-strategy", default="random", choices=FIXED, help="round 0's order")
    ap.add_argument("--out", default="benchmarks/results/active")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    setup_logging("WARNING")
    sweep = Sweep(args)
    for cell in cells(args):
        sweep.student(cell)
    res = analyse(sweep)
    (sweep.out / "results.json").write_text(json.dumps({"args": vars(args), **res}, indent=1) + "\n")
    figure(sweep, res)
    print(write_markdown(sweep, res).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
