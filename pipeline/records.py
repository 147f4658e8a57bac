"""Metrics records: what `dvc metrics show` shows (the summary) and everything else (the details), written together.

Every teacher and student of the pipeline leaves one *record*: a JSON object whose top-level keys are the
numbers people compare, under the same names for teachers and students (`SUMMARY_KEYS`), with everything
else nested by topic. `write_record` writes two files from it:

- the **details** (`metrics/details/<id>.json`, `metrics/teachers/details/<t>.json`): the whole record plus
  its `schema` version: what the report, `kdcache compare` and the benchmarks read;
- the **summary** (`metrics/<id>.json`, `metrics/teachers/<t>.json`): only the `SUMMARY_KEYS` present (and
  the `warnings` list): the files dvc.yaml declares as metrics.

Two files because `dvc metrics show` flattens nested keys into columns (it skips only lists), so nesting alone
does not shorten its table; and it sorts the columns by name, which is why top-1 accuracy is `accuracy`:
it sorts first. The summary is a projection of the details, never a second computation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: bump when a record's layout changes; readers refuse other versions with the fix
SCHEMA = 2

#: the numbers `dvc metrics show` compares, in this (alphabetical == DVC's column) order:
#: test top-1, top-1 agreement with the teacher, expected calibration error, mean corruption accuracy,
#: teacher calls the student used, validation top-1 (the value checkpoints are selected on)
SUMMARY_KEYS = ("accuracy", "agreement", "ece", "mca", "teacher_calls", "val_accuracy")

#: lists kept in the summary too: `dvc metrics show` skips lists, a reader of the file sees them
SUMMARY_LISTS = ("warnings",)

KINDS = ("student", "teacher")


class RecordError(ValueError):
    """A metrics file the current code cannot read (another schema, another kind, not a record)."""


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """The summary of a record: its `SUMMARY_KEYS` with a value (in that order), then `SUMMARY_LISTS`."""
    out: dict[str, Any] = {k: record[k] for k in SUMMARY_KEYS if record.get(k) is not None}
    out.update({k: list(record[k]) for k in SUMMARY_LISTS if record.get(k)})
    return out


def write_record(record: dict[str, Any], summary_path: str | Path, details_path: str | Path, kind: str) -> dict:
    """Write `record` (kind 'student' or 'teacher') as its details and its summary; returns the summary.

    The details are written first: a summary never exists without the details it summarises.
    """
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    details = {"schema": SCHEMA, "kind": kind, **{k: v for k, v in record.items() if k not in ("schema", "kind")}}
    summary = summary_of(details)
    for path, data in ((Path(details_path), details), (Path(summary_path), summary)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    return summary


def read_record(details_path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """A record's details; another schema or kind is a `RecordError` naming the file and the fix."""
    path = Path(details_path)
    if not path.is_file():
        raise RecordError(
            f"no metrics details at {path}: run the stage that writes it (`dvc repro`; evaluate for a student, "
            "train_teacher for a teacher)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path} is not valid JSON ({e}); rerun the stage that writes it (`dvc repro`)") from e
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise RecordError(
            f"{path} has metrics schema {data.get('schema', 'none (flat keys: an older kdcache)')}, this code reads "
            f"schema {SCHEMA}: rerun the stage that wrote it (`dvc repro` reruns evaluate/train_teacher after the "
            "code change; a benchmark's results: rerun the benchmark)"
        )
    if kind is not None and data.get("kind") != kind:
        raise RecordError(f"{path} is a {data.get('kind')!r} record where a {kind!r} record was expected")
    return data
