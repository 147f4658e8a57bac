"""The training loop's resume state: tensors in safetensors, the rest in JSON, never unpickled, and only for its run.

A resume state is what an interrupted run needs to end byte-identical to an uninterrupted one: the model and
optimizer, every rank's RNG and loss state, the best-validation selection, the history, the epoch. It is written
after every epoch into the run's *state folder* (`Layout.resume_state`: outside every DVC output, so a killed
`dvc repro` finds it on its next run) as two files:

    resume-<epoch>.safetensors   every tensor of the state, flat keys (safetensors: a header and raw bytes)
    resume.json                  the rest (numbers, strings, lists; tensors as {"__tensor__": key}), the run's
                                 fingerprint, the tensor file's name and sha256

written tensors first, then the JSON (atomically); the JSON names the tensor file it belongs to, so a run killed
between the two writes resumes from the previous epoch's consistent pair. Reading never runs code: safetensors
holds raw tensors, JSON holds data (a crafted state can at most be refused).

The *fingerprint* names the run a state belongs to (architecture, training recipe, loss and its parameters, data
and store fingerprints, the library's code): a state of another run is refused with the keys that differ
(explicit `--resume`) or set aside with a warning (automatic resume, the stages' default), never continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline.models.checkpoint import CheckpointError, atomic_write

log = logging.getLogger(__name__)

STATE_JSON = "resume.json"
FORMAT = 1
_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def code_fingerprint() -> str:
    """sha256 of the library's source (`pipeline/**/*.py`): a state written by other code is not continued."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON data, its tensors moved to `tensors` under dotted keys (ints, tuples and dict keys kept exact)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {_DICT: [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"resume state: {key} is a {type(obj).__name__}; only tensors and JSON data are kept")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _DICT in obj:
            return {k if not isinstance(k, list) else tuple(k): _unflatten(v, tensors) for k, v in obj[_DICT]}
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(folder: str | Path, state: dict[str, Any], fingerprint: dict[str, Any], epoch: int) -> None:
    """Write `state` (tensors and JSON data) for `epoch` into `folder`; the previous epoch's files are removed after."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "s", tensors)
    blob = save_tensors(tensors)
    name = f"resume-{epoch:05d}.safetensors"
    atomic_write(folder / name, lambda f: f.write(blob))
    doc = {
        "format": FORMAT,
        "epoch": epoch,
        "fingerprint": fingerprint,
        "tensors": name,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "state": tree,
    }
    atomic_write(folder / STATE_JSON, lambda f: f.write((json.dumps(doc, sort_keys=True) + "\n").encode()))
    for old in folder.glob("resume-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The fingerprint of the state in `folder` (None: no state there)."""
    path = Path(folder) / STATE_JSON
    if not path.is_file():
        return None
    return _read_json(path).get("fingerprint") or {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"resume state {path} is not readable JSON ({e}); delete its folder to start over") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise CheckpointError(
            f"{path} is not a kdcache resume state (format {FORMAT}); delete its folder to start over"
        )
    return doc


def load_state(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state saved in `folder` (tensors on `device`); a missing, altered or foreign file is a `CheckpointError`."""
    folder = Path(folder)
    doc = _read_json(folder / STATE_JSON)
    tensor_file = folder / str(doc.get("tensors", ""))
    if not tensor_file.is_file() or tensor_file.parent != folder:
        raise CheckpointError(f"resume state {folder}: its tensor file {tensor_file.name} is missing")
    blob = tensor_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise CheckpointError(f"resume state {tensor_file} does not match its sha256 in {STATE_JSON}: it was altered")
    try:
        tensors = load_tensors(blob)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a bad header)
        raise CheckpointError(f"resume state {tensor_file} is not a safetensors file ({e})") from e
    state = _unflatten(doc["state"], {k: v.to(device) for k, v in tensors.items()})
    return {"epoch": doc.get("epoch"), "fingerprint": doc.get("fingerprint") or {}, **state}


def differing_keys(found: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """The fingerprint keys (dotted paths into nested sections) where a saved run differs from this one."""
    out = []
    for k in sorted(set(found) | set(want)):
        a, b = found.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def discard(folder: str | Path) -> None:
    """Remove a state folder (a finished run's, or another run's set aside)."""
    shutil.rmtree(folder, ignore_errors=True)
