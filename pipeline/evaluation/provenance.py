"""What a report was made from: the commit, uncommitted code/params changes, and params that differ from the commit.

After `dvc exp run -S distill.loss_params.kd.T=2` the workspace's params.yaml differs from the commit's in
exactly that value, so the report's header lists `distill.loss_params.kd.T: 2 (commit: 4.0)`; outside a git
checkout it says it cannot tell. Git is asked read-only (`rev-parse`, `status`, `show`).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

#: the tracked paths whose uncommitted edits change what the pipeline computes
CODE_PATHS = ("pipeline", "stages", "dvc.yaml", "params.yaml")


@dataclass(frozen=True)
class Provenance:
    commit: str | None  # short hash of HEAD; None outside a git checkout
    dirty: list[str] = field(default_factory=list)  # tracked code/params files with uncommitted changes
    params_diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, this run, committed)
    note: str = ""  # why something could not be said


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys (`distill.loss_params.kd.T`); lists stay values."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def params_diff(current: dict[str, Any], base: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, current value, base value) for every dotted key whose value differs (absent = None), sorted."""
    a, b = flatten(current), flatten(base)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def provenance(params_path: str | Path, params: dict[str, Any]) -> Provenance:
    """The commit of the repository holding `params_path`, its dirty code/params files, and how `params`
    (the values the report ran with) differ from the committed params file."""
    params_path = Path(params_path).resolve()
    root = params_path.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "--short=10", "HEAD")
    if top is None or commit is None:
        return Provenance(None, note="not a git checkout: the commit and the params' changes are unknown")
    top_path = Path(top.strip())
    status = _git(top_path, "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) or ""
    dirty = sorted(line[3:].strip() for line in status.splitlines() if line.strip())
    rel = params_path.relative_to(top_path).as_posix()
    committed = _git(top_path, "show", f"HEAD:{rel}")
    if committed is None:
        return Provenance(commit.strip(), dirty, note=f"{rel} is not in the commit: its values are all new")
    base = yaml.safe_load(committed) or {}
    return Provenance(commit.strip(), dirty, params_diff(params, base))
