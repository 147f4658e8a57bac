"""Does the committed dvc.lock match the committed pipeline? Exit 1 (listing what differs) when it does not.

    python scripts/check_lock.py [PROJECT]        # default: the current folder (a fresh clone in CI)

In a fresh clone `dvc status` always reports the DVC-cached artifacts (shards, checkpoints, stores, students)
as absent: that is expected and ignored. What must match `dvc.lock` is everything git holds:

- code and params dependencies: a change to a stage's code or params that was committed without rerunning the
  stage (`dvc repro`) and committing the refreshed dvc.lock;
- the outputs kept in git (`cache: false`: metrics, curves, predictions, the report): committed files that are
  not the ones dvc.lock records;
- a stage whose command changed, or one dvc.lock has never seen (reported as such, not dependency by dependency).

A dependency counts as a pipeline artifact (ignored while absent) when it is, contains or lies inside a
stage's output. `tests/test_dvc_lock.py` runs this on a clone of HEAD; `.ci/run` runs it on the CI clone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

IGNORED_STATES = ("always changed",)


def _overlaps(path: str, outs: set[str]) -> bool:
    p = PurePosixPath(path)
    for o in outs:
        q = PurePosixPath(o)
        if p == q or q in p.parents or p in q.parents:
            return True
    return False


def lock_problems(
    status: dict[str, list[Any]], outs: set[str], git_outs: set[str], locked: set[str] | None = None
) -> list[str]:
    """What `dvc status --json` (`status`) says differs from dvc.lock in what git holds.

    outs: every stage output path; git_outs: the outputs with `cache: false` (kept in git); locked: the stages
    dvc.lock records (None: unknown), so a stage it has never seen is one problem, not one per dependency.
    """
    problems = []
    for stage, entries in sorted(status.items()):
        if locked is not None and stage not in locked and entries not in ([], ["always changed"]):
            problems.append(f"{stage}: not in dvc.lock (a new stage, never run)")
            continue
        for entry in entries:
            if isinstance(entry, str):
                if entry not in IGNORED_STATES:
                    problems.append(f"{stage}: {entry}")
                continue
            for path, state in (entry.get("changed deps") or {}).items():
                if isinstance(state, dict):  # a params file: {key: modified | new | deleted}
                    problems += [f"{stage}: param {key} {s} ({path})" for key, s in sorted(state.items())]
                elif not _overlaps(path, outs):
                    problems.append(f"{stage}: code dependency {path} {state}")
            for path, state in (entry.get("changed outs") or {}).items():
                if path in git_outs:
                    problems.append(f"{stage}: output kept in git {path} {state}")
            for key in set(entry) - {"changed deps", "changed outs"}:
                problems.append(f"{stage}: {key} {entry[key]}")
    return problems


def check(project: str | Path = ".") -> list[str]:
    """`lock_problems` of the DVC project at `project` (its `dvc status`, computed by DVC's own API)."""
    import yaml
    from dvc.repo import Repo

    lock = Path(project) / "dvc.lock"
    locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()
    here = Path.cwd()
    os.chdir(project)  # DVC names stages and paths relative to the working directory: make them the project's
    try:
        with Repo(".") as repo:
            outs = {str(PurePosixPath(o.def_path)) for o in repo.index.outs}
            git_outs = {str(PurePosixPath(o.def_path)) for o in repo.index.outs if not o.use_cache}
            status = repo.status()
    finally:
        os.chdir(here)
    return lock_problems(status, outs, git_outs, locked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", nargs="?", default=".")
    args = ap.parse_args(argv)
    problems = check(args.project)
    if problems:
        by_what: dict[str, list[str]] = {}
        for p in problems:
            stage, what = p.split(": ", 1)
            by_what.setdefault(what, []).append(stage)
        print(f"dvc.lock does not match the committed pipeline ({len(problems)} difference(s)):")
        for what, stages in by_what.items():
            more = f", ... ({len(stages)} stages)" if len(stages) > 3 else ""
            print(f"  {what}: {', '.join(stages[:3])}{more}")
        print("fix: `dvc repro` (it reruns what changed and rewrites dvc.lock), then commit dvc.lock and the outputs")
        return 1
    print("dvc.lock matches the committed code, params and git-kept outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
