"""Where every artifact of the pipeline lives: one object, used by every stage, tool and benchmark.

`dvc.yaml` spells the same paths with `${prepare.name}` and `${key}`/`${item...}` in its outs; a test
(`tests/test_architecture.py`) holds the two against each other, so a path changes in both places or neither.

    Layout("fashion_mnist").store("cnn")      -> data/logits/cnn.zarr
    Layout("fashion_mnist", root=tmp).shards  -> <tmp>/data/shards/fashion_mnist
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

PARTIAL_SUFFIX = ".partial"
#: Model checkpoints are safetensors files (`pipeline.models.checkpoint`), and so is the tensor part of the training
#: loop's resume state (`pipeline.training.resume`: safetensors + JSON, never pickled).
CHECKPOINT_SUFFIX = ".safetensors"
STUDENT_MODEL = "model" + CHECKPOINT_SUFFIX  # in the student's folder
#: your teachers' own files (`teachers.<t>.checkpoint`), in the project: the folder DVC tracks for them
WEIGHTS_DIR = "weights"


def partial_path(path: str | Path) -> Path:
    """Where an output is written until it is complete: `<path>.partial` (renamed into place at the end)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


class TeacherFiles(NamedTuple):
    checkpoint: Path  # <name>.safetensors: what teach and online distillation load
    metrics: Path  # <name>.json: the summary `dvc metrics show` lists (pipeline.records)
    details: Path  # details/<name>.json: the whole record (accuracy, warnings, training history)
    run: Path  # <name>.run/: a demo teacher's training history (its resume state: `Layout.resume_state`)


@dataclass(frozen=True)
class Layout:
    """The artifact paths of one data set's pipeline, relative to `root` (the project folder)."""

    dataset: str
    root: Path = Path(".")

    def _p(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    # -- prepare / corrupt
    @property
    def shards(self) -> Path:
        """Shards + manifest.json of the prepared data set."""
        return self._p("data", "shards", self.dataset)

    @property
    def corrupt(self) -> Path:
        """Corrupted copies of the test split (the `corrupt` stage)."""
        return self._p("data", "corrupt", self.dataset)

    # -- teachers
    @property
    def teachers(self) -> Path:
        """Teacher checkpoints (DVC-cached, git-ignored)."""
        return self._p("data", "teachers")

    @property
    def weights(self) -> Path:
        """Your teachers' own files (the checkpoints `teachers.<t>.checkpoint` names): a folder of the project that
        the `teachers` stage depends on, so overwriting a file reruns its teacher (`pipeline.inputs`)."""
        return self._p(WEIGHTS_DIR)

    @property
    def teacher_inputs_dir(self) -> Path:
        """One fingerprint per teacher of the files it is built from (the `teachers` stage's output, DVC-cached)."""
        return self.teachers / "inputs"

    def teacher_inputs(self, teacher: str) -> Path:
        """What `train_teacher@<teacher>` depends on instead of its checkpoint file (`pipeline.inputs`)."""
        return self.teacher_inputs_dir / f"{teacher}.json"

    @property
    def teacher_metrics_dir(self) -> Path:
        """Teacher metrics: in git (like the students'), so `dvc metrics diff` compares them across commits."""
        return self.metrics / "teachers"

    @staticmethod
    def teacher_files(folder: str | Path, teacher: str, metrics_folder: str | Path | None = None) -> TeacherFiles:
        """A teacher's files: checkpoint and run folder in `folder`, metrics in `metrics_folder` (default `folder`)."""
        folder = Path(folder)
        summary = Path(metrics_folder or folder) / f"{teacher}.json"
        checkpoint = folder / f"{teacher}{CHECKPOINT_SUFFIX}"
        return TeacherFiles(checkpoint, summary, Layout.details(summary), folder / f"{teacher}.run")

    def teacher_checkpoint(self, teacher: str) -> Path:
        return self.teacher_files(self.teachers, teacher).checkpoint

    def teacher_metrics(self, teacher: str) -> Path:
        return self.teacher_files(self.teachers, teacher, self.teacher_metrics_dir).metrics

    def teacher_details(self, teacher: str) -> Path:
        return self.teacher_files(self.teachers, teacher, self.teacher_metrics_dir).details

    def store(self, teacher: str) -> Path:
        """The teacher's logit store."""
        return self._p("data", "logits", f"{teacher}.zarr")

    # -- students
    @property
    def student_inputs(self) -> Path:
        """The fingerprint of the files `distill.student` is built from (`py:` code; the `teachers` stage writes it,
        `distill@*` and `query@*` depend on it)."""
        return self._p("data", "students", "inputs.json")

    def student(self, sid: str) -> Path:
        """The student's folder (model.safetensors, epoch checkpoint, history)."""
        return self._p("data", "students", sid)

    def student_model(self, sid: str) -> Path:
        """The student's checkpoint (what `evaluate` loads)."""
        return self.student(sid) / STUDENT_MODEL

    def student_metrics(self, sid: str) -> Path:
        """The student's summary metrics (what `dvc metrics show` lists)."""
        return self.metrics / f"{sid}.json"

    def student_details(self, sid: str) -> Path:
        """The student's whole evaluation record (what the report reads)."""
        return self.details(self.student_metrics(sid))

    @staticmethod
    def details_dir(metrics_folder: str | Path) -> Path:
        """Where the details of the summaries in `metrics_folder` live: `<metrics_folder>/details`."""
        return Path(metrics_folder) / "details"

    @staticmethod
    def details(summary: str | Path) -> Path:
        """The details file of a summary metrics file: `<folder>/details/<name>.json`."""
        summary = Path(summary)
        return Layout.details_dir(summary.parent) / summary.name

    def curves(self, sid: str) -> Path:
        """The student's training curves (one row per epoch)."""
        return self.curves_dir / f"{sid}.json"

    def confusion(self, sid: str) -> Path:
        """`actual,predicted` per test image in index order: DVC's confusion plot and the report's paired tests."""
        return self.confusion_dir / f"{sid}.csv"

    @property
    def curves_dir(self) -> Path:
        return self._p("plots", "curves")

    @property
    def confusion_dir(self) -> Path:
        return self._p("plots", "confusion")

    @property
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def reports(self) -> Path:
        return self._p("reports")

    # -- what varies from run to run (never a DVC output)
    def resume_state(self, stage: str, item: str) -> Path:
        """An unfinished training run's resume state: `checkpoints/<stage>/<item>/` (git-ignored, in no DVC output, so a
        killed `dvc repro` finds it again: DVC deletes a stage's outputs before running it). Removed when the run ends.
        """
        return self._p("checkpoints", stage, item)

    def run_log(self, stage: str, item: str) -> Path:
        """Wall-clock times and throughput of one stage run: `logs/<stage>/<item>.json` (git-ignored, untracked)."""
        return self._p("logs", stage, f"{item}.json")
