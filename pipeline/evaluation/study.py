"""What a report is about: the students and teachers of one run on one data set, read and checked once.

`load_study` reads every student record (`metrics/details/<id>.json`), the teachers' records
(`metrics/teachers/details/<t>.json`), the data set's manifest and the per-image predictions
(`plots/confusion/<id>.csv`), and refuses what would make a table lie: records of another schema,
students evaluated on another data set, a student without its accuracy. Tables (`report`) and figures
(`figures`) then read the `Study`; every statistic comes from `pipeline.evaluation.stats`, every loss is
listed in one order (`loss_order`), and every number says how many seeds it pools.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.stats import Interval, Paired, mean_ci, paired_comparison
from pipeline.layout import Layout
from pipeline.records import RecordError, read_record

log = logging.getLogger(__name__)

FULL = "full"
NO_TEACHER_LOSS = "ce"  # the baseline: trained on labels only, the teacher's logits unused
HINTON_LOSS = "kd"  # the second reference every loss is compared with
ALPHA = 0.05  # the level of every test the report states

#: the held-out accuracy per epoch in a curves file: validation when the run had a validation split, else test
CURVE_KEYS = (("val_acc", "val"), ("test_acc", "test"))


#: a teacher must beat a CE student on validation by this much (top-1) to be worth distilling from
CE_MARGIN = 0.005

#: a recorded schedule rule (`schedule.rule` in a record) whose epochs `min_steps` raised, as
#: `pipeline.training.schedule.resolve_schedule` writes it (tests/test_report.py ties the two)
RAISED_RULE = re.compile(r"epochs=(?P<asked>\d+) raised to (?P<got>\d+) by min_steps=(?P<min_steps>\d+)")


class StudyError(ValueError):
    """Metrics that cannot be reported together (another data set or schema, missing keys)."""


def read_correct(path: str | Path) -> np.ndarray:
    """Per-image correctness (N,) bool from a `metrics.write_confusion_csv` file (index order): actual == predicted.

    The paired tests compare two students image by image with it. (Here, not beside the writer, so the report
    stage does not import the evaluation-time code: torch models, loaders.)
    """
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["actual", "predicted"]:
        raise ValueError(f"{path}: expected a header 'actual,predicted' (written by the evaluate stage)")
    return np.array([a == p for a, p in rows[1:]], dtype=bool)


def loss_order(losses: set[str] | list[str]) -> list[str]:
    """The one order of losses in every table and figure: the registry's (ce, kd, dkd, dist, cmkd, ckd),
    then any other (combinations such as dkd+cmkd) alphabetically."""
    from pipeline.losses import LOSSES

    known = list(LOSSES)
    return sorted(set(losses), key=lambda x: (known.index(x), "") if x in known else (len(known), x))


def get(record: dict[str, Any], key: str) -> Any:
    """A (possibly nested) value: `get(r, "teacher.pearson")` = r["teacher"]["pearson"]; None when absent."""
    v: Any = record
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def number(record: dict[str, Any], key: str) -> float | None:
    v = get(record, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        return None
    return float(v)


@dataclass(frozen=True)
class DataSet:
    """The data set a study ran on, from its manifest (title, class count, split sizes, image size)."""

    name: str
    classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    splits: dict[str, int]
    sha256: str

    @classmethod
    def from_manifest(cls, manifest: Any) -> DataSet:
        return cls(
            name=manifest.dataset,
            classes=manifest.num_classes,
            image_shape=tuple(manifest.image_shape),
            splits={name: s.n for name, s in manifest.splits.items()},
            sha256=manifest.sha256,
        )

    def describe(self) -> str:
        h, w, c = self.image_shape
        order = [s for s in ("train", "val", "test") if s in self.splits] + sorted(
            s for s in self.splits if s not in ("train", "val", "test")
        )
        sizes = " / ".join(f"{s} {self.splits[s]:,}" for s in order)
        return f"{self.classes} classes, {h}x{w} images with {c} channel(s); {sizes}"


@dataclass
class Teacher:
    name: str
    record: dict[str, Any]
    params: int | None = None

    @property
    def accuracy(self) -> float | None:
        return number(self.record, "accuracy")

    @property
    def val_accuracy(self) -> float | None:
        return number(self.record, "val_accuracy")

    @property
    def arch(self) -> str | None:
        return self.record.get("arch")

    @property
    def warnings(self) -> list[str]:
        return [str(w) for w in self.record.get("warnings") or []]


@dataclass
class Student:
    sid: str
    teacher: str
    loss: str
    budget: str
    seed: int
    record: dict[str, Any]
    path: Path
    correct: np.ndarray | None = None  # (N,) per-image correctness on the test split

    def value(self, key: str) -> float | None:
        return number(self.record, key)


@dataclass
class Study:
    """The students and teachers of one report, with the statistics every table and figure shares."""

    data: DataSet
    students: list[Student]
    teachers: dict[str, Teacher]
    missing: list[str] = field(default_factory=list)  # students of the matrix without metrics
    no_predictions: list[str] = field(default_factory=list)  # students without per-image predictions

    def __post_init__(self) -> None:
        self._paired: dict[tuple[str, str, str, str], Paired | None] = {}
        self._cells: dict[tuple[str, str, str], list[Student]] = defaultdict(list)
        for s in sorted(self.students, key=lambda s: s.seed):
            self._cells[(s.teacher, s.loss, s.budget)].append(s)

    # -- the axes
    @property
    def losses(self) -> list[str]:
        return loss_order({s.loss for s in self.students})

    @property
    def teacher_names(self) -> list[str]:
        return sorted({s.teacher for s in self.students})

    def budgets(self, teacher: str | None = None) -> list[str]:
        got = {s.budget for s in self.students if teacher is None or s.teacher == teacher}
        return sorted(got, key=lambda b: (b == FULL, float(b) if b != FULL else 0.0))

    def cell(self, teacher: str, loss: str, budget: str = FULL) -> list[Student]:
        """The students of one (teacher, loss, budget), sorted by seed."""
        return self._cells.get((teacher, loss, budget), [])

    def seed_counts(self, budget: str = FULL) -> set[int]:
        return {len(v) for (_, _, b), v in self._cells.items() if b == budget and v}

    # -- statistics
    def values(self, students: list[Student], key: str) -> list[float]:
        return [v for s in students if (v := s.value(key)) is not None]

    def interval(self, students: list[Student], key: str = "accuracy") -> Interval | None:
        vals = self.values(students, key)
        return mean_ci(vals) if vals else None

    def paired(self, teacher: str, loss_a: str, loss_b: str, budget: str = FULL) -> Paired | None:
        """loss_a vs loss_b with the same teacher and budget, over the seeds both have, image by image.

        None when either has no per-image predictions for a shared seed (or no shared seed). Computed once."""
        key = (teacher, loss_a, loss_b, budget)
        if key not in self._paired:
            self._paired[key] = self._compare(*key)
        return self._paired[key]

    def _compare(self, teacher: str, loss_a: str, loss_b: str, budget: str) -> Paired | None:
        a = {s.seed: s for s in self.cell(teacher, loss_a, budget)}
        b = {s.seed: s for s in self.cell(teacher, loss_b, budget)}
        seeds = sorted(set(a) & set(b))
        if not seeds or any(a[k].correct is None or b[k].correct is None for k in seeds):
            return None
        ca = np.stack([a[k].correct for k in seeds])  # (S, N)
        cb = np.stack([b[k].correct for k in seeds])
        return paired_comparison(ca, cb)

    def significantly_best(self, teacher: str, budget: str = FULL) -> str | None:
        """The loss of the row with the highest mean top-1 if it beats *every* other loss of the row in the
        paired test at level `ALPHA` (an intersection-union test: no multiplicity correction needed), else None."""
        means = {
            loss: iv.mean for loss in self.losses if (iv := self.interval(self.cell(teacher, loss, budget))) is not None
        }
        if len(means) < 2:
            return None
        best = max(means, key=means.get)
        for other in means:
            if other == best:
                continue
            p = self.paired(teacher, best, other, budget)
            if p is None or not (p.diff > 0 and p.significant(ALPHA)):
                return None
        return best

    def below_ce(self, budget: str = FULL) -> list[tuple[str, str, Paired]]:
        """(teacher, loss, test) for every distillation loss significantly below CE (same teacher, budget)."""
        out = []
        for t in self.teacher_names:
            for loss in self.losses:
                if loss == NO_TEACHER_LOSS:
                    continue
                p = self.paired(t, loss, NO_TEACHER_LOSS, budget)
                if p is not None and p.diff < 0 and p.significant(ALPHA):
                    out.append((t, loss, p))
        return out

    def weak_teachers(self, margin: float = CE_MARGIN) -> list[tuple[str, float, float]]:
        """(teacher, its validation top-1, the CE students' mean validation top-1) for every teacher not
        `margin` better than a CE student on validation: the cheap reference of the teacher check (a student
        trained on labels alone), read off validation, never test."""
        out = []
        for t in self.teacher_names:
            teacher = self.teachers.get(t)
            ce = self.values(self.cell(t, NO_TEACHER_LOSS), "val_accuracy")
            if teacher is None or teacher.val_accuracy is None or not ce:
                continue
            ce_mean = float(np.mean(ce))
            if teacher.val_accuracy < ce_mean + margin:
                out.append((t, teacher.val_accuracy, ce_mean))
        return out

    def teacher_accuracy(self, teacher: str) -> float | None:
        t = self.teachers.get(teacher)
        return t.accuracy if t else None

    def single_seed_cells(self) -> int:
        """How many (teacher, loss, budget) cells hold one seed: their comparisons make no verdict (`MIN_SEEDS`)."""
        return sum(1 for v in self._cells.values() if len(v) == 1)

    def raised_schedules(self) -> dict[str, list[str]]:
        """Schedule rule -> who trained longer than asked because `min_steps` raised their `epochs` (students by id,
        teachers as `teacher <name>`), from the `schedule.rule` their records hold."""
        out: dict[str, list[str]] = defaultdict(list)
        for name, t in sorted(self.teachers.items()):
            rule = get(t.record, "schedule.rule")
            if isinstance(rule, str) and RAISED_RULE.search(rule):
                out[rule].append(f"teacher {name}")
        for s in sorted(self.students, key=lambda s: s.sid):
            rule = get(s.record, "student.schedule.rule")
            if isinstance(rule, str) and RAISED_RULE.search(rule):
                out[rule].append(s.sid)
        return dict(out)


# ---------------------------------------------------------------------------------------------
# loading


def _student(path: Path, record: dict[str, Any]) -> Student:
    who = record.get("student")
    if not isinstance(who, dict):
        raise StudyError(f"{path}: no 'student' section: not an evaluate record; rerun `dvc repro`")
    missing = [k for k in ("teacher", "loss", "seed") if k not in who] + (
        ["accuracy"] if number(record, "accuracy") is None else []
    )
    if missing:
        raise StudyError(f"{path}: missing {missing}; rerun the evaluate stage (`dvc repro`) that writes it")
    return Student(
        sid=str(who.get("student_id", path.stem)),
        teacher=str(who["teacher"]),
        loss=str(who["loss"]),
        budget=str(who.get("budget", FULL)),
        seed=int(who["seed"]),
        record=record,
        path=path,
    )


def _check_data(students: list[Student], data: DataSet) -> None:
    """Every student was evaluated on the data set the report describes (same manifest)."""
    other = defaultdict(list)
    for s in students:
        d = s.record.get("data") or {}
        if d.get("manifest_sha256") != data.sha256:
            other[(d.get("dataset"), d.get("manifest_sha256"))].append(s.sid)
    if other:
        desc = "; ".join(
            f"{len(ids)} student(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}) on data set {name!r} "
            f"(manifest {str(sha)[:12]})"
            for (name, sha), ids in other.items()
        )
        raise StudyError(
            f"the report describes data set {data.name!r} (manifest {data.sha256[:12]}), but {desc}: metrics of "
            "another data set or preparation cannot share its tables; rerun `dvc repro` (it re-evaluates them) or "
            "remove the stale metrics files"
        )


def teacher_parameters(record: dict[str, Any], data: DataSet) -> int | None:
    """A teacher's parameter count: `params` in its record, else counted on a fresh `arch` sized for the data."""
    if isinstance(record.get("params"), int):
        return int(record["params"])
    arch = record.get("arch")
    if not arch:
        return None
    try:
        from pipeline.models.registry import build_model, count_parameters

        return count_parameters(build_model(arch, data.classes, data.image_shape[2]))
    except Exception as e:  # an architecture this install cannot build must not break the report
        log.warning("cannot count the parameters of %s: %s", arch, e)
        return None


def load_study(
    metrics_dir: Path,
    teachers_dir: Path,
    manifest: Any,
    confusion_dir: Path | None = None,
    only: set[str] | None = None,
) -> Study:
    """Read and check one report's students (`metrics_dir/details/*.json`) and teachers (`teachers_dir/details`).

    only: the student ids of the run (the distill matrix); metrics files of others (an earlier configuration)
    are left out with a log line, and ids without metrics are listed in `Study.missing`.
    manifest: the data set's `Manifest`; a student evaluated on another data set is a `StudyError`.
    """
    data = DataSet.from_manifest(manifest)
    metrics_dir = Path(metrics_dir)
    paths = sorted(Layout.details_dir(metrics_dir).glob("*.json"))
    if only is not None:
        extra = [p.stem for p in paths if p.stem not in only]
        if extra:
            log.info("report: leaving out %d metrics file(s) not in the distill matrix: %s", len(extra), extra[:5])
        paths = [p for p in paths if p.stem in only]
    if not paths:
        raise FileNotFoundError(
            f"no student metrics in {Layout.details_dir(metrics_dir)}: run the evaluate stages first (`dvc repro`)"
        )
    students = []
    for p in paths:
        try:
            students.append(_student(p, read_record(p, "student")))
        except RecordError as e:
            raise StudyError(str(e)) from e
    _check_data(students, data)
    no_pred = []
    n_test = data.splits.get("test")
    for s in students:
        csv = Path(confusion_dir) / f"{s.sid}.csv" if confusion_dir is not None else None
        if csv is None or not csv.is_file():
            no_pred.append(s.sid)
            continue
        s.correct = read_correct(csv)
        if n_test is not None and len(s.correct) != n_test:
            raise StudyError(
                f"{csv}: {len(s.correct)} per-image predictions, the test split has {n_test}: stale predictions of "
                "another data set; rerun the evaluate stage (`dvc repro`)"
            )
    teachers = {}
    for name in sorted({s.teacher for s in students}):
        path = Layout.teacher_files(Path(teachers_dir), name, Path(teachers_dir)).details
        if not path.is_file():
            log.warning("no record of teacher %s at %s: its accuracy is left out", name, path)
            continue
        try:
            rec = read_record(path, "teacher")
        except RecordError as e:
            raise StudyError(str(e)) from e
        teachers[name] = Teacher(name, rec, teacher_parameters(rec, data))
    missing = sorted(only - {p.stem for p in paths}) if only is not None else []
    return Study(data, students, teachers, missing=missing, no_predictions=no_pred)
