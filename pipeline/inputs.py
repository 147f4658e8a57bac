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
still says "up to date" when nothing changed. A model given as your own code (`arch: py:<module>:<callable>`) is built
from one more file, the one defining it: it must lie in `weights/` too (or be linked from there), and joins the
teacher's fingerprint; the student's (`distill.student: py:...`) goes to `data/students/inputs.json`, which every
`distill@*` and `query@*` stage depends on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, TeacherSpec
from pipeline.layout import WEIGHTS_DIR

WEIGHTS = Path(WEIGHTS_DIR)  # relative to the project root (`Layout.weights`)


PY_PREFIX = "py:"


@dataclass(frozen=True)
class PyArch:
    """A parsed ``py:<module>:<callable>`` architecture (your own model code, `pipeline.models.usercode`)."""

    arch: str  # as written (stripped)
    module: str  # a .py path or a dotted module name
    attr: str  # the callable's (dotted) name in the module

    @property
    def is_file(self) -> bool:
        return self.module.endswith(".py") or "/" in self.module or "\\" in self.module


def parse_py_arch(arch: str) -> PyArch:
    """Split ``py:<module>:<callable>``; a malformed one is a ``ConfigError`` showing both spellings."""
    body = arch.strip()[len(PY_PREFIX) :].strip()
    module, sep, attr = body.rpartition(":")
    if not sep or not module.strip() or not attr.strip() or not all(p.isidentifier() for p in attr.split(".")):
        raise ConfigError(
            f"architecture {arch!r}: expected 'py:<module>:<callable>', e.g. 'py:weights/mynet.py:MyNet' (a .py file) "
            "or 'py:mymodels.resnet:resnet18' (a module on PYTHONPATH)"
        )
    return PyArch(f"{PY_PREFIX}{module.strip()}:{attr.strip()}", module.strip(), attr.strip())


def is_py_arch(arch: str | None) -> bool:
    return isinstance(arch, str) and arch.strip().lower().startswith(PY_PREFIX)


def source_file(spec: PyArch) -> Path:
    """The file that defines ``spec``'s module (found, not run: a module spec's origin); a ``ConfigError`` if none."""
    if spec.is_file:
        path = Path(spec.module)
        if not path.is_file():
            raise ConfigError(f"architecture {spec.arch!r}: {path} is not a file; give your model's .py file")
        return path
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError) as exc:  # a parent package that fails to import
        why = " ".join(str(exc).split())
        raise ConfigError(f"architecture {spec.arch!r}: cannot import {spec.module!r}: {why}") from exc
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ConfigError(
            f"architecture {spec.arch!r}: no module {spec.module!r} on PYTHONPATH; add its folder to PYTHONPATH "
            f"or give the file's path (py:path/to/{spec.module.rpartition('.')[2]}.py:{spec.attr})"
        )
    return Path(found.origin)


def teacher_files(spec: TeacherSpec) -> list[tuple[str, str]]:
    """The files outside the pipeline that teacher `spec` is built from, as `(key, path)`: its `checkpoint` and, for
    `arch: py:...`, the file defining the model (a demo teacher of the zoo: none)."""
    files = [("checkpoint", spec.checkpoint)] if spec.checkpoint else []
    if is_py_arch(spec.arch):
        files.append(("arch", str(source_file(parse_py_arch(spec.arch)))))
    return files


def in_weights(path: str | Path, weights: str | Path = WEIGHTS) -> bool:
    """Whether `path`, as written (links not followed: a link inside the folder is tracked by DVC like a file),
    lies inside the folder `weights`, or is the target of a link there (a module imported from PYTHONPATH is found
    at its real path)."""
    p, w = Path(os.path.abspath(path)), Path(os.path.abspath(weights))
    if w in p.parents:
        return True
    real = os.path.realpath(path)
    return w.is_dir() and any(q.is_symlink() and os.path.realpath(q) == real for q in w.rglob("*"))


def fingerprint(path: str | Path) -> dict[str, Any]:
    """`{"path", "bytes", "sha256"}` of one file (its content, through links), read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"path": str(path), "bytes": size, "sha256": h.hexdigest()}


def _fingerprints(files: list[tuple[str, str]], where: str, stage: str, weights: str | Path) -> list[dict[str, Any]]:
    """Fingerprint each `(key, path)`, checking it lies in `weights` (else DVC could not see it change) and exists."""
    out = []
    for key, path in files:
        here = f"{where}.{key}"
        if not in_weights(path, weights):
            link = Path(weights) / Path(path).name
            fix = f"set {here}: {link}" if key == "checkpoint" else "name the linked file or keep the link"
            raise ConfigError(
                f"{here}: {path} is outside {weights}/, the folder DVC tracks for the files your models are built "
                f"from, so DVC could not rerun {stage} when the file changes; move or link it there (`ln -s "
                f"{os.path.abspath(path)} {link}`) and {fix}",
                where=here,
            )
        if not Path(path).is_file():
            raise ConfigError(f"{here}: {path} is not a file; put the teacher's checkpoint there", where=here)
        out.append(fingerprint(path))
    return out


def teacher_inputs(name: str, spec: TeacherSpec, weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """The fingerprint record of teacher `name`: the files it is built from, each checked to lie in `weights`.

    Raises ConfigError naming `teachers.<name>.checkpoint` (or `.arch`) when a file is outside the folder (DVC could
    not see it change: move or link it into the folder) or missing."""
    files = _fingerprints(teacher_files(spec), f"teachers.{name}", f"train_teacher@{name}", weights)
    return {"teacher": name, "files": files}


def student_inputs(arch: str, weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """The fingerprint record of `distill.student`: for `py:` code, the file defining it (else no file), so editing
    your student's code reruns the students (`distill@*` and the `query` rounds depend on this record)."""
    files = [("student", str(source_file(parse_py_arch(arch))))] if is_py_arch(arch) else []
    return {"student": arch, "files": _fingerprints(files, "distill", "distill", weights)}


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """`record` as indented JSON with sorted keys (no time or host: equal inputs, equal bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def write_teacher_inputs(
    zoo: dict[str, TeacherSpec], out_dir: str | Path, weights: str | Path = WEIGHTS
) -> dict[str, Path]:
    """Write `out_dir/<name>.json` (`teacher_inputs`) for every teacher of the zoo; returns name -> path.

    Every file is checked before any is written, so a misplaced checkpoint fails the stage without output. The
    records hold no time or host: equal files give byte-identical fingerprints, so a teacher whose files did not
    change is never rerun."""
    records = {name: teacher_inputs(name, spec, weights) for name, spec in sorted(zoo.items())}
    return {name: write_json(Path(out_dir) / f"{name}.json", record) for name, record in records.items()}
