"""What kdcache checks about a logit store's values: `kdcache verify STORE`, and the teacher sanity rules.

`verify_store` scans a whole store and lists every problem it finds rather than stopping at the first:

- metadata: schema version, the `complete` flag, every split's `done` flags all set;
- completeness: every file of every written store shard present (a missing file would read as fill values);
- checksums: every chunk of every array read and decoded, so zarr checks each chunk's CRC32C and each shard
  index's (`pipeline.cache.store`, schema 2);
- values: every queried sample-view finite, every unqueried one all NaN, the recorded call count equal to the
  `queried` flags;
- fingerprints against the data set's manifest (hash, N, C, shard rows) when its shards are at hand;
- the teacher's top-1 on every labelled split (view 0 of its queried rows), flagged when near chance.

Memory: one store shard at a time. A clean store exits 0, any problem 2 (`kdcache verify`). The cheap part of
this (metadata, files present, fingerprints) runs whenever a store is opened (`LogitStore`), so `distill`,
`evaluate` and `query` refuse a damaged store before they start; the values are checked block by block as the
loader reads them.

The teacher's top-1 is judged by the rules every teacher check shares (`pipeline.models.sanity`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from pipeline.cache.store import SCHEMA_VERSION, LogitStore, StoreError, finite_rows, topk_expand
from pipeline.data.shards import Manifest
from pipeline.layout import PARTIAL_SUFFIX
from pipeline.models.sanity import confusion, near_chance, permutation_hint

#: problems listed on the screen (the JSON output has all)
SHOWN = 20


@dataclass
class SplitReport:
    """What the scan found in one split."""

    split: str
    n: int = 0
    views: int = 0
    num_classes: int = 0
    shards_done: str = ""
    calls: int = 0
    calls_recorded: int | None = None
    files: int = 0
    bytes: int = 0
    teacher_top1: float | None = None


@dataclass
class VerifyReport:
    """The result of `verify_store`: per-split facts and every problem found (empty: the store is sound)."""

    path: str
    schema_version: Any = None
    complete: bool = False
    teacher: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    fingerprints: str = "not checked (no shards)"
    splits: list[SplitReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "schema_version": self.schema_version,
            "complete": self.complete,
            "teacher": self.teacher,
            "dataset": self.dataset,
            "fingerprints": self.fingerprints,
            "splits": [vars(s) for s in self.splits],
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }


def verify_store(path: str | Path, manifest: Manifest | None = None, *, progress: bool = True) -> VerifyReport:
    """Scan the store at `path` (complete or `.partial`) whole; `manifest` adds fingerprints and teacher top-1."""
    t0 = time.perf_counter()
    path = Path(path)
    report = VerifyReport(str(path))
    if not path.exists():
        raise FileNotFoundError(f"no logit store at {path}")
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
        names = sorted(name for name, _ in root.groups())
    except Exception as e:  # noqa: BLE001 (not a zarr group at all: the one problem there is)
        report.problems.append(f"not a Zarr group ({type(e).__name__}: {e}); is it a kdcache logit store?")
        report.seconds = time.perf_counter() - t0
        return report
    report.schema_version = attrs.get("schema_version")
    report.complete = bool(attrs.get("complete"))
    report.teacher = attrs.get("teacher") or {}
    report.dataset = attrs.get("dataset") or {}
    partial = path.name.endswith(PARTIAL_SUFFIX)
    if report.schema_version != SCHEMA_VERSION:
        report.problems.append(
            f"schema version {report.schema_version!r}, this kdcache reads {SCHEMA_VERSION} (schema 1 stores have "
            "no chunk checksums): rewrite the store with this version"
        )
        report.seconds = time.perf_counter() - t0
        return report
    if not report.complete and not partial:
        report.problems.append("marked incomplete, yet not a .partial store: an interrupted write; rewrite the store")
    if manifest is not None:
        report.fingerprints = "match the shards"
    for split in names:
        report.splits.append(_verify_split(path, split, manifest, report, partial or not report.complete, progress))
    report.seconds = time.perf_counter() - t0
    return report


def _verify_split(
    path: Path, split: str, manifest: Manifest | None, report: VerifyReport, partial: bool, progress: bool
) -> SplitReport:
    """Every check of one split, problems appended to `report` (prefixed with the split)."""
    out = SplitReport(split)
    problems = report.problems
    try:
        store = LogitStore(path, split, partial=True, strict=False)  # every problem below, not the first
    except StoreError as e:
        problems.append(f"{split}: {e}")
        return out
    out.n, out.views, out.num_classes = store.n, store.views, store.num_classes
    out.shards_done = f"{int(store.done.sum())}/{len(store.done)}"
    if not partial and not store.done.all():
        problems.append(f"{split}: store shards {np.flatnonzero(~store.done)[:10].tolist()} are not marked done")
    missing = store.missing_files()
    problems.extend(f"{split}: missing file {m}" for m in missing)
    if manifest is not None:
        try:
            store.check(manifest)
        except StoreError as e:
            problems.append(f"{split}: {e}")
            report.fingerprints = "DIFFER from the shards"
    labels = _labels(manifest, split, store.n)
    pred, label_rows = [], []
    calls = 0
    lost = {m.split("/")[1] for m in missing}  # arrays with a missing file: their shards are reported already
    for j in tqdm(np.flatnonzero(store.done), desc=f"verify {split}", unit="shard", disable=not progress or None):
        a, b = store.shard_range(int(j))
        for name in store.arrays():
            f = store.shard_file(name, int(j))
            if f.is_file():
                out.files += 1
                out.bytes += f.stat().st_size
        if lost:
            missing_here = any(not store.shard_file(name, int(j)).is_file() for name in store.arrays())
            if missing_here:
                continue
        try:  # shard by shard (not the reader's cached flags): one damaged file is one problem, not one per shard
            q = store.read_array("queried", a, b)  # (n, V)
            calls += int(q.sum())
            if store.topk:
                values, tail = store.read_array("topk_values", a, b), store.read_array("tail_mass", a, b)
                store.check_values("topk_values", a, values, tail, q=q)
                block = topk_expand(values, store.read_array("topk_indices", a, b), tail, store.num_classes)
            else:
                block = store.read_array("logits", a, b)  # every chunk's checksum
                store.check_values("logits", a, block, q=q)  # queried rows finite, unqueried empty
            if store.member_names:
                store.check_values("members", a, store.read_array("members", a, b), q=q)
            for name in ("round", "order"):
                if name in store.arrays():
                    store.read_array(name, a, b)  # their checksums (no value rule)
        except StoreError as e:
            problems.append(f"{split}: {e}")
            continue
        if labels is not None:
            ok = q[:, 0] & finite_rows(block[:, :1])[0][:, 0]  # (n,) view 0 queried
            pred.append(np.asarray(block[ok, 0], dtype=np.float32).argmax(-1))
            label_rows.append(labels[a:b][ok])
    out.calls = calls
    out.calls_recorded = store.group.attrs.get("teacher_calls")
    if not partial and out.calls_recorded is not None and out.calls_recorded != calls:
        problems.append(f"{split}: {calls} sample-views are marked queried, the store records {out.calls_recorded}")
    if pred:
        p, y = np.concatenate(pred), np.concatenate(label_rows)
        if len(y):
            out.teacher_top1 = float((p == y).mean())
            if near_chance(out.teacher_top1, store.num_classes):
                hint = permutation_hint(confusion(p, y, store.num_classes), out.teacher_top1)
                problems.append(
                    f"{split}: teacher top-1 {out.teacher_top1:.1%} on {len(y)} labelled rows is near chance "
                    f"({1 / store.num_classes:.1%}): its class order or input normalisation does not match these "
                    f"shards{hint}"
                )
    return out


def _labels(manifest: Manifest | None, split: str, n: int) -> np.ndarray | None:
    if manifest is None or split not in manifest.splits or manifest.split(split).n != n:
        return None
    return manifest.iter_labels(split)


def format_report(r: VerifyReport) -> str:
    """One screen: the store, one line per split, the problems (the first `SHOWN`), the verdict."""
    t = r.teacher
    lines = [
        f"store {r.path}: schema {r.schema_version}, {'complete' if r.complete else 'INCOMPLETE'}; teacher "
        f"{t.get('name', '?')} ({t.get('arch', '?')}), data set {r.dataset.get('name', '?')}; "
        f"fingerprints {r.fingerprints}"
    ]
    for s in r.splits:
        top1 = "" if s.teacher_top1 is None else f", teacher top-1 {s.teacher_top1:.2%}"
        lines.append(
            f"  {s.split:<6} N={s.n:,} V={s.views} C={s.num_classes}: shards {s.shards_done}, {s.calls:,} calls, "
            f"{s.files} files ({s.bytes / 1e6:.1f} MB) checked{top1}"
        )
    for p in r.problems[:SHOWN]:
        lines.append(f"  problem: {p}")
    if len(r.problems) > SHOWN:
        lines.append(f"  ... and {len(r.problems) - SHOWN} more (--json lists all)")
    verdict = "ok" if r.ok else f"DAMAGED: {len(r.problems)} problem(s)"
    lines.append(f"{verdict} ({r.seconds:.1f} s)")
    return "\n".join(lines)
