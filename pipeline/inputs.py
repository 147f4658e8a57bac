"""Files the params name that no stage writes (your teachers' checkpoints): where they live, and their fingerprints.

Every file a stage reads must be a DVC dependency, or overwriting it leaves `dvc status` "up to date" and every
result built from it stale (issue 32). A teacher given by `teachers.<t>.checkpoint: PATH` is read by
`train_teacher@<t>`, one item of a `foreach` over the `teachers` zoo, and DVC (3.x) cannot give one item of a
`foreach` a dependency the others lack: a demo teacher has no checkpoint, so `${item.checkpoint}` does not render for
it, and a templated list (`deps: ${item.deps}`, even an empty one) is refused ("expected a list"; DVC's list
interpolation, iterative/dvc#9148, was closed unmerged). So the dependency goes through one folder every project has,
`weights/` (`Layout.weights`):

- your teachers' files live in `weights/` (a file there, or a link to one elsewhere: DVC follows links);
- the `teachers` stage depends on the whole folder and writes one fingerprint per teacher, `data/teachers/inputs/
  <t>.json` (path, size and sha256 of each file the entry names; none for a demo teacher);
- `train_teacher@<t>` depends on its own fingerprint.

Overwriting a checkpoint changes the folder, so `dvc status` names the `teachers` stage at once; it reruns (it only
hashes the named files), only that teacher's fingerprint changes, and DVC reruns that teacher and what it feeds (its
store, its students, the report) and nothing else. A static dependency: no `always_changed` stage, so `dvc status`
still says "up to date" when nothing changed. Any other file a teacher is built from (the `py:` model code of issue
28) joins `teacher_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, TeacherSpec
from pipeline.layout import WEIGHTS_DIR

WEIGHTS = Path(WEIGHTS_DIR)  # relative to the project root (`Layout.weights`)


def teacher_files(spec: TeacherSpec) -> list[str]:
    """The files outside the pipeline that teacher `spec` is built from, as its entry names them: its `checkpoint`
    (a demo teacher, trained by the pipeline: none)."""
    return [spec.checkpoint] if spec.checkpoint else []


def in_weights(path: str | Path, weights: str | Path = WEIGHTS) -> bool:
    """Whether `path`, as written (links not followed: a link inside the folder is tracked by DVC like a file),
    lies inside the folder `weights`."""
    p, w = Path(os.path.abspath(path)), Path(os.path.abspath(weights))
    return w in p.parents


def fingerprint(path: str | Path) -> dict[str, Any]:
    """`{"path", "bytes", "sha256"}` of one file (its content, through links), read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"path": str(path), "bytes": size, "sha256": h.hexdigest()}


def teacher_inputs(name: str, spec: TeacherSpec, weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """The fingerprint record of teacher `name`: the files it is built from, each checked to lie in `weights`.

    Raises ConfigError naming `teachers.<name>.checkpoint` when a file is outside the folder (DVC could not see it
    change: move or link it into the folder) or missing."""
    where = f"teachers.{name}.checkpoint"
    files = []
    for path in teacher_files(spec):
        if not in_weights(path, weights):
            link = Path(weights) / Path(path).name
            raise ConfigError(
                f"{where}: {path} is outside {weights}/, the folder DVC tracks for your teachers' files, so DVC could "
                f"not rerun train_teacher@{name} when the file changes; move or link it there (`ln -s "
                f"{os.path.abspath(path)} {link}`) and set {where}: {link}",
                where=where,
            )
        if not Path(path).is_file():
            raise ConfigError(f"{where}: {path} is not a file; put the teacher's checkpoint there", where=where)
        files.append(fingerprint(path))
    return {"teacher": name, "files": files}


def write_teacher_inputs(
    zoo: dict[str, TeacherSpec], out_dir: str | Path, weights: str | Path = WEIGHTS
) -> dict[str, Path]:
    """Write `out_dir/<name>.json` (`teacher_inputs`) for every teacher of the zoo; returns name -> path.

    Every file is checked before any is written, so a misplaced checkpoint fails the stage without output. The
    records hold no time or host: equal files give byte-identical fingerprints, so a teacher whose files did not
    change is never rerun."""
    records = {name: teacher_inputs(name, spec, weights) for name, spec in sorted(zoo.items())}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, record in records.items():
        out[name] = out_dir / f"{name}.json"
        out[name].write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out
