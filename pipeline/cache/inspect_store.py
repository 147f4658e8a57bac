"""`kdcache inspect STORE`: what a logit store holds, computed out of core with dask.array.

Reductions (teacher accuracy, entropy, calibration) stream over the Zarr arrays chunk by chunk, so
inspecting an ImageNet-sized store needs memory for a few chunks, not the whole array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.cache.store import PARTIAL_SUFFIX, LogitStore, StoreError, partial_path

ENTROPY_BINS = 20


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _softmax(z: da.Array) -> da.Array:
    z = z - z.max(axis=-1, keepdims=True)
    e = da.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _dense_logits(g: zarr.Group, rows: int, num_classes: int) -> da.Array:
    """(N, C) view-0 logits as a dask array (the top-k layout is expanded block by block)."""
    if "logits" in g:
        arr = da.from_zarr(g["logits"], chunks=(rows, -1, -1))
        return arr[:, 0].astype(np.float32)
    from pipeline.cache.store import topk_expand

    v = da.from_zarr(g["topk_values"], chunks=(rows, -1, -1))
    i = da.from_zarr(g["topk_indices"], chunks=(rows, -1, -1))
    t = da.from_zarr(g["tail_mass"], chunks=(rows, -1))
    dense = da.map_blocks(
        lambda a, b, c: topk_expand(a, b, c[..., 0], num_classes),  # c: (n, V, 1), a block of t[..., None]
        v,
        i,
        t[..., None],
        dtype=np.float32,
        chunks=(v.chunks[0], v.chunks[1], (num_classes,)),
    )
    return dense[:, 0]


def inspect_store(
    path: str | Path,
    split: str = "train",
    labels: np.ndarray | None = None,
    chunk_rows: int | None = None,
    bins: int = 15,
) -> dict[str, Any]:
    """Summary of one split of a (complete or partial) store; `labels` (N,) adds accuracy and ECE.

    chunk_rows: dask block rows (default: the store's shard rows); small values prove out-of-core.
    """
    path = Path(path)
    target = path if path.exists() else partial_path(path)
    if not target.exists():
        raise FileNotFoundError(f"no store at {path} (nor {partial_path(path)})")
    # The cheap integrity checks (schema, done flags, every written shard's files): a damaged store is an error,
    # never a summary computed from fill values.
    store = LogitStore(target, split, partial=True)
    try:
        return _summary(target, store, split, labels, chunk_rows, bins)
    except StoreError:
        raise
    except Exception as e:  # a chunk that fails its checksum surfaces inside dask: name the damage, or it is a bug
        from pipeline.cache.verify import verify_store

        found = verify_store(target, progress=False).problems
        if found:
            raise StoreError(f"{found[0]} (`kdcache verify {target}` lists all {len(found)} problem(s))") from e
        raise


def _summary(
    target: Path, store: LogitStore, split: str, labels: np.ndarray | None, chunk_rows: int | None, bins: int
) -> dict[str, Any]:
    attrs, g = store.attrs, store.group
    sa = dict(g.attrs)
    n, v, c = sa["n"], sa["views"], sa["num_classes"]
    done = g["done"][:]
    rows = chunk_rows or sa["shard_rows"]
    info: dict[str, Any] = {
        "path": str(target),
        "partial": target.name.endswith(PARTIAL_SUFFIX),
        "complete": bool(attrs.get("complete")),
        "schema_version": attrs.get("schema_version"),
        "teacher": attrs.get("teacher"),
        "dataset": attrs.get("dataset"),
        "dtype": attrs.get("dtype"),
        "layout": f"top-{attrs['topk']}" if attrs.get("topk") else "dense",
        "compressor": attrs.get("compressor"),
        "library": attrs.get("library"),
        "split": split,
        "shape": {"N": n, "V": v, "C": c},
        "view_recipe": sa.get("view_recipe"),
        "shards_done": f"{int(done.sum())}/{len(done)}",
        "budget": attrs.get("budget"),
    }
    queried = da.from_zarr(g["queried"], chunks=(rows, -1))
    info["teacher_calls"] = int(queried.sum().compute())
    if "round" in g:  # written in rounds (active queries): calls per round, and what each round cost
        made = da.from_zarr(g["round"], chunks=(rows, -1))[queried].astype(np.int64)
        per_round = da.bincount(made, minlength=len(sa.get("rounds") or [])).compute()
        info["queries_per_round"] = {int(r): int(c) for r, c in enumerate(per_round)}
        info["rounds"] = sa.get("rounds")
    if labels is not None and len(labels) == n:  # teacher calls per class (sample-views of rows of that class)
        y = da.from_array(np.asarray(labels), chunks=rows)
        per_class = da.bincount(y, weights=queried.sum(axis=1), minlength=c).compute()
        info["queries_per_class"] = {int(k): int(v) for k, v in enumerate(per_class)}
    disk = _disk_bytes(target / split)
    info["disk_bytes"] = disk
    info["bytes_per_sample_view"] = round(disk / max(1, info["teacher_calls"]), 3)
    z = _dense_logits(g, rows, c)  # (N, C)
    q0 = queried[:, 0]
    p = _softmax(z)
    ent = -(p * da.log(da.clip(p, 1e-12, None))).sum(axis=-1)  # (N,) nats
    ent_q = ent[q0]
    hist, edges = da.histogram(ent_q, bins=ENTROPY_BINS, range=(0.0, float(np.log(c))))
    nonfinite = (q0 & ~da.isfinite(z).all(axis=-1)).sum()
    mean_ent, hist, nonfinite = da.compute(ent_q.mean(), hist, nonfinite)
    if nonfinite:
        raise StoreError(
            f"{target}: {int(nonfinite)} queried row(s) of {split} hold NaN/Inf logits: the store is damaged "
            f"(`kdcache verify {target}` lists every problem)"
        )
    info["entropy_mean"] = float(mean_ent)
    info["entropy_hist"] = {"counts": hist.tolist(), "edges": [round(float(e), 4) for e in edges]}
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for a store of N={n}")
        y = da.from_array(np.asarray(labels), chunks=rows)
        pred = z.argmax(axis=-1)
        conf = da.where(q0, p.max(axis=-1), 0.0)  # unqueried rows hold NaN logits: keep them out of the sums
        correct = (pred == y) & q0
        # ECE (Guo et al. 2017) from per-bin sums: one streaming pass, then a tiny numpy reduction.
        which = da.clip(da.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
        sel = q0.astype(np.float64)
        cnt = da.bincount(which, weights=sel, minlength=bins)
        acc_sum = da.bincount(which, weights=correct.astype(np.float64), minlength=bins)
        conf_sum = da.bincount(which, weights=conf * sel, minlength=bins)
        cnt, acc_sum, conf_sum, n_correct = da.compute(cnt, acc_sum, conf_sum, correct.sum())
        nq = max(1.0, cnt.sum())
        info["teacher_top1"] = float(n_correct / nq)
        info["ece"] = float(np.sum(np.abs(acc_sum - conf_sum)) / nq)
    return info


def format_info(info: dict[str, Any]) -> str:
    """Human-readable multi-line rendering for the CLI."""
    lines = []
    for k, val in info.items():
        if k == "rounds" and val:
            lines.append("rounds (calls, pool the round's student trained on, its steps and validation top-1):")
            for r in val:
                acc = "-" if r.get("val_accuracy") is None else f"{100 * r['val_accuracy']:.2f}%"
                lines.append(
                    f"  round {r['round']:3d}: {r['calls']:7d} calls  pool {r['pool']:7d}  "
                    f"steps {r['student_steps']:6d}  val top-1 {acc}"
                )
        elif k == "entropy_hist":
            counts, edges = val["counts"], val["edges"]
            peak = max(counts) or 1
            lines.append("entropy histogram (nats):")
            for cnt, lo, hi in zip(counts, edges[:-1], edges[1:], strict=False):
                lines.append(f"  [{lo:6.3f}, {hi:6.3f}) {cnt:9d} {'#' * int(40 * cnt / peak)}")
        else:
            lines.append(f"{k}: {val}")
    return "\n".join(lines)
