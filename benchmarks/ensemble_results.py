"""Ensembles and logit standardization (issue 15, item 4): does the ensemble of two cached teachers teach better
than its best member, and does standardization help here as it does on CIFAR-100?

    python -m benchmarks.ensemble_results [--teachers cnn resnet] [--ensemble both] [--seeds 0 1 2]
        [--epochs N] [--losses kd dkd dist cmkd ckd mtkd mtkd:confidence lskd] [--kl-losses kd dkd ckd]
        [--member-losses kd] [--out benchmarks/results/ensembles] [--params params.yaml]

Run from a project whose `dvc repro` has cached the two teachers (the default data set, or the clone that
`benchmarks/cifar10_profile.py` makes with `profiles/cifar10.yaml`). Every student is trained and evaluated
exactly as the `distill`/`evaluate` stages do it (`benchmarks.students.run_student`); the project's data is
read, never written: the ensemble's store is `data/logits/<ensemble>.zarr` when `dvc repro` built it, else
it is built from the two member stores into `<out>/logits/`. Resumable: a student whose metrics exist is
not trained again; interrupt and rerun freely.

Tables (mean and 95% t-interval over seeds of each student's test top-1, %):

1. teachers: `ce` (no teacher) and `kd` from each single teacher and from the ensemble; with `--member-losses`
   beyond kd (e.g. `ce kd dist cmkd ckd`: the project's five-loss table), each single teacher with each of
   them, each loss against CE and KD of the same teacher, and each loss from the stronger teacher (by the
   teacher's own validation top-1) against the weaker (the DIST paper's "KD degrades as the teacher grows");
2. the ensemble with each loss in `--losses` (`mtkd` distils from each member: `mtkd:confidence` is CA-MKD's
   per-sample weighting; `lskd` is logit-standardized KD);
3. every KL-based loss in `--kl-losses` on each teacher and the ensemble, without and with standardization.
   "with" is `standardize: true` plus the paper's CIFAR-100 recipe where it gives one (official code:
   base temperature 2, KD weight x9: kd -> T 2, b 9; dkd -> T 2, alpha and beta x9); for ckd and mtkd
   (no recipe in the paper) the same T 2 and weight x9, by analogy. `--std-recipe plain` switches only
   `standardize` on.

Selection: when a student's curves hold a validation accuracy (`val_acc` per epoch), its test accuracy is
read at the epoch of best validation accuracy; otherwise at the last epoch (the table says which).
Writes `<out>/results.md` (tables + the comparisons the verdict needs) and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.students import find_student, run_student
from pipeline.config import (
    DistillConfig,
    EnsembleSpec,
    PrepareConfig,
    ensembles_section,
    from_dict,
    load_params,
    section,
)
from pipeline.evaluation.stats import mean_ci
from pipeline.layout import Layout
from pipeline.losses import default_params

KL_LOSSES = ("kd", "dkd", "ckd", "mtkd")
# Student's t 0.975 quantiles by degrees of freedom (a 95% two-sided interval of a mean of n = df + 1 seeds).


@dataclass(frozen=True)
class Variant:
    """One loss configuration: a registry loss with parameters (the project's, plus overrides)."""

    key: str  # short name in tables and run names, e.g. "kd", "kd+std", "mtkd:confidence"
    loss: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def params(self, project: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**default_params(self.loss), **(project.get(self.loss) or {}), **dict(self.overrides)}


def variant(key: str) -> Variant:
    """`kd`, `mtkd:confidence` (a weighting), or any loss name."""
    loss, _, weighting = key.partition(":")
    return Variant(key, loss, (("weighting", weighting),) if weighting else ())


def standardized(v: Variant, recipe: str, project: dict[str, dict[str, Any]]) -> Variant:
    """The variant with logit standardization (see the module docstring for the recipe)."""
    over = dict(v.overrides, standardize=True)
    if recipe == "paper":
        p = v.params(project)
        over["T"] = 2.0
        for weight in {"kd": ("b",), "mtkd": ("b",), "dkd": ("alpha", "beta"), "ckd": ("weight",)}[v.loss]:
            over[weight] = 9.0 * float(p[weight])
    return Variant(f"{v.key}+std", v.loss, tuple(sorted(over.items())))


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% t-interval half-width; 0 for one value), by `pipeline.evaluation.stats.mean_ci`."""
    iv = mean_ci(values)
    return iv.mean, (iv.hi - iv.mean) if iv.hi is not None else 0.0


class Runner:
    """Trains (or finds) each student once; remembers every result by run name."""

    def __init__(self, out: Path, params_path: str, epochs: int | None, stores: dict[str, str | None]) -> None:
        self.out, self.params_path, self.stores = out, params_path, stores
        self.overrides = {"train": {"epochs": epochs}} if epochs else {}
        params = load_params(params_path)
        self.project_losses = from_dict(DistillConfig, section(params, "distill"), "distill").loss_params
        self.val: dict[str, list[float]] = {}  # run name without the seed -> validation top-1 per seed

    def accuracy(self, teacher: str, v: Variant, seed: int) -> float:
        name = f"{teacher}-{v.key}-s{seed}".replace(":", "_")
        metrics = find_student(self.out, name)  # resumable
        if metrics is None:
            metrics = run_student(
                self.out,
                name,
                teacher=teacher,
                loss=v.loss,
                loss_params=v.params(self.project_losses),
                seed=seed,
                store=self.stores.get(teacher),
                distill_overrides=self.overrides,
                params_path=self.params_path,
            )
            print(f"{name}: top-1 {100 * metrics['accuracy']:.2f}", flush=True)
        # The checkpoint was chosen on validation during training; its validation top-1 picks between teachers.
        self.val.setdefault(f"{teacher}-{v.key}", []).append(100 * float(metrics.get("val_accuracy", float("nan"))))
        return 100 * float(metrics["accuracy"])


def ensemble_store_for(params: dict[str, Any], teachers: list[str], name: str, out: Path) -> str | None:
    """The ensemble's store path: data/logits/<name>.zarr when built by dvc, else built here into <out>/logits."""
    from pipeline.cache.ensemble import ensemble_store
    from pipeline.data.shards import load_manifest

    layout = Layout(from_dict(PrepareConfig, section(params, "prepare"), "prepare").name)
    if layout.store(name).exists():
        return None  # the layout's store: run_student finds it by name
    spec = ensembles_section(params).get(name) or EnsembleSpec(tuple(teachers))
    if list(spec.members) != teachers:
        raise SystemExit(f"ensemble '{name}' in params.yaml has members {list(spec.members)}, not {teachers}")
    path = out / "logits" / f"{name}.zarr"
    if not path.exists():
        where = {t: layout.store(t) for t in teachers} | {name: path}
        ensemble_store(load_manifest(layout.shards), name, spec, where.__getitem__)
    return str(path)


def teacher_val(params: dict[str, Any], teachers: list[str]) -> dict[str, float]:
    """Each teacher's own validation top-1 (its `metrics/teachers/<name>.json`): which one is the stronger. A teacher
    without that record (a checkpoint put in place by hand) is left out."""
    layout = Layout(from_dict(PrepareConfig, section(params, "prepare"), "prepare").name)
    records = {t: layout.teacher_metrics(t) for t in teachers}
    return {t: float(json.loads(p.read_text())["val_accuracy"]) for t, p in records.items() if p.exists()}


def member_pairs(
    members: dict[str, list[float]], teachers: list[str], losses: list[str], val: dict[str, float]
) -> list[tuple[str, list[float], list[float]]]:
    """Paired comparisons of the per-teacher table: each loss against CE and KD of the same teacher, then each
    loss from the stronger teacher against the same loss from the weaker (same seeds on both sides)."""
    pairs = []
    for t in teachers:
        for key in losses:
            pairs.append((f"{t}: {key} vs ce", members[f"{t}: {key}"], members[f"{t}: ce (no teacher)"]))
            if key != "kd":
                pairs.append((f"{t}: {key} vs kd", members[f"{t}: {key}"], members[f"{t}: kd"]))
    if len(val) < len(teachers):
        return pairs  # which teacher is the stronger is unknown
    weak, strong = sorted(teachers, key=val.__getitem__)
    for key in losses:
        pairs.append((f"{key}: from {strong} vs from {weak}", members[f"{strong}: {key}"], members[f"{weak}: {key}"]))
    return pairs


def table(title: str, rows: list[tuple[str, list[float]]]) -> list[str]:
    lines = [f"### {title}", "", "| | top-1 (%) | seeds |", "|---|---:|---:|"]
    for label, accs in rows:
        mean, half = interval(accs)
        lines.append(f"| {label} | {mean:.2f} ± {half:.2f} | {len(accs)} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--teachers", nargs=2, default=None, help="the two members (default: the first two distill.teachers)"
    )
    ap.add_argument("--ensemble", default=None, help="ensemble name (default: the ensembles entry of the two, or a+b)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="distill.train.epochs override (default: params.yaml's)")
    ap.add_argument(
        "--losses", nargs="+", default=["kd", "dkd", "dist", "cmkd", "ckd", "mtkd", "mtkd:confidence", "lskd"]
    )
    ap.add_argument("--kl-losses", nargs="+", default=["kd", "dkd", "ckd"], choices=list(KL_LOSSES))
    ap.add_argument(
        "--member-losses", nargs="+", default=["kd"], help="losses trained from each single teacher (table 1)"
    )
    ap.add_argument("--std-recipe", choices=["paper", "plain"], default="paper")
    ap.add_argument("--out", default="benchmarks/results/ensembles")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    distill = from_dict(DistillConfig, section(params, "distill"), "distill")
    teachers = list(args.teachers or [t for t in distill.teachers if t in (params.get("teachers") or {})][:2])
    if len(teachers) != 2:
        raise SystemExit(f"need two cached teachers (--teachers a b); distill.teachers is {list(distill.teachers)}")
    named = [n for n, s in ensembles_section(params).items() if list(s.members) == teachers]
    ens = args.ensemble or (named[0] if named else "+".join(teachers))
    out = Path(args.out)
    runner = Runner(out, args.params, args.epochs, {ens: ensemble_store_for(params, teachers, ens, out)})
    everyone = [*teachers, ens]

    def accs(teacher: str, v: Variant) -> list[float]:
        return [runner.accuracy(teacher, v, s) for s in args.seeds]

    kd = variant("kd")
    results: dict[str, dict[str, list[float]]] = {"teachers": {}, "members": {}, "ensemble": {}, "standardization": {}}
    ce = accs(teachers[0], variant("ce"))  # no teacher: the same students whichever teacher names the run
    results["teachers"]["ce (no teacher)"] = ce
    for t in everyone:
        results["teachers"][f"kd from {t}" + (" (ensemble)" if t == ens else "")] = accs(t, kd)
    member_losses = [key for key in args.member_losses if key not in ("ce", "kd")]
    if member_losses:
        for t in teachers:
            results["members"][f"{t}: ce (no teacher)"] = ce
            for key in ["kd", *member_losses]:
                results["members"][f"{t}: {key}"] = accs(t, variant(key))
    for key in args.losses:
        results["ensemble"][f"{ens}: {key}"] = accs(ens, variant(key))
    for t in everyone:
        for key in args.kl_losses:
            v = variant(key)
            results["standardization"][f"{t}: {key}"] = accs(t, v)
            results["standardization"][f"{t}: {key} + standardization"] = accs(
                t, standardized(v, args.std_recipe, runner.project_losses)
            )

    how = "best-validation"
    lines = [
        f"## Ensembles and logit standardization ({len(args.seeds)} seed(s), test top-1 at the {how} epoch)",
        "",
        "`" + " ".join(["python -m benchmarks.ensemble_results", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        *table("Single teachers and their ensemble (kd)", list(results["teachers"].items())),
        *(table("Each single teacher with each loss", list(results["members"].items())) if member_losses else []),
        *table(f"The ensemble {ens} with each loss", list(results["ensemble"].items())),
        *table(
            f"KL-based losses without / with standardization ({args.std_recipe} recipe)",
            list(results["standardization"].items()),
        ),
        "### Comparisons (difference of means, 95% interval of the paired difference over seeds)",
        "",
    ]
    # the best member by validation top-1 (never by test)
    best = max(teachers, key=lambda t: statistics.fmean(runner.val[f"{t}-{variant('kd').key}"]))
    pairs = [(f"ensemble {ens} vs its best member {best} (kd)", results["teachers"][f"kd from {ens} (ensemble)"],
              results["teachers"][f"kd from {best}"])]  # fmt: skip
    std = results["standardization"]
    pairs += [(f"{label} + standardization vs without", std[f"{label} + standardization"], std[label])
              for label in std if not label.endswith("standardization")]  # fmt: skip
    if member_losses:
        pairs += member_pairs(results["members"], teachers, ["kd", *member_losses], teacher_val(params, teachers))
    for label, a, b in pairs:
        mean, half = interval([x - y for x, y in zip(a, b, strict=True)])
        verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else "no clear difference"
        lines.append(f"- {label}: {mean:+.2f} ± {half:.2f} points ({verdict})")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"selection": how, **results}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
