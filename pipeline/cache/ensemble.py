"""Ensemble teachers from cached logits: a new logit store computed from member stores, no model run.

Once several teachers are cached over the same data set and views, their ensemble costs no teacher call:
the `ensemble@<name>` stage reads the members' stores shard by shard and writes a normal kdcache store
(`StoreWriter`, resumable, renamed into place when complete) whose logits are the combination::

    mean_logits:  z = sum_m w_m z_m / sum_m w_m                     (the geometric mean of the softmaxes)
    mean_probs:   z = log(sum_m w_m softmax(z_m) / sum_m w_m)        (softmax(z) = the mean of the softmaxes)

Both are exact at T = 1; a student's temperature then applies to the combined logits, as to any teacher's.
With `keep_members` the store also holds `members (N, V, M, C)`, every member's logits, for losses that
distil from each member (`mtkd`); a member that is itself an ensemble kept with members contributes its
own members (flattened), so nested two-way ensembles give the same per-member view as a flat one.

Members must be cached on the same data set (manifest fingerprint), with the same views (view recipe)
and, for budgets, the same queried sample-views; anything else is an error naming the mismatch.
Size: the combined logits cost one member store; `members` M more (`(1 + M)` x a member store in all).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.cache.store import LogitStore, SplitSpec, StoreError, StoreSpec, StoreWriter
from pipeline.config import EnsembleSpec
from pipeline.data.shards import Manifest
from pipeline.lock import exclusive, reading

log = logging.getLogger(__name__)

COMBINES = ("mean_logits", "mean_probs")


def normalized_weights(weights: Sequence[float] | None, members: int) -> np.ndarray:
    """(M,) float64 weights summing to 1 (None: equal); wrong length, negative or zero-sum weights are errors."""
    w = np.full(members, 1.0) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (members,):
        raise StoreError(f"{len(w)} weight(s) for {members} members; give one weight per member")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise StoreError(f"ensemble weights must be finite, >= 0 and sum to a positive number, got {w.tolist()}")
    return w / w.sum()


def combine_logits(logits: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    """Members' logits (n, V, M, C) -> the ensemble's (n, V, C) float32; `weights` (M,) sum to 1.

    Computed in float64; NaN rows (unqueried sample-views) stay NaN.
    """
    z = logits.astype(np.float64)  # (n, V, M, C)
    w = weights[None, None, :, None]  # (1, 1, M, 1)
    if rule == "mean_logits":
        return (z * w).sum(axis=2).astype(np.float32)
    if rule == "mean_probs":
        # log sum_m w_m softmax(z_m) = logsumexp_m(log w_m + log_softmax(z_m)), stable for large logits;
        # a zero weight adds exp(-inf) = 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            log_p = z - _logsumexp(z, axis=3)  # (n, V, M, C) log-softmax per member
            return _logsumexp(log_p + np.log(w), axis=2)[:, :, 0, :].astype(np.float32)
    raise StoreError(f"unknown ensemble combine rule '{rule}'; available: {list(COMBINES)}")


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def open_members(
    name: str, members: Sequence[str], store_of: Callable[[str], Path], manifest: Manifest, split: str
) -> dict[str, LogitStore]:
    """The members' stores of one split, each checked against the data set (errors name the member)."""
    out = {}
    for m in members:
        try:
            out[m] = LogitStore(store_of(m), split, manifest)
        except StoreError as e:
            raise StoreError(f"member '{m}' of ensemble '{name}': {e}") from e
    return out


def check_members(name: str, stores: dict[str, LogitStore]) -> None:
    """Members of one split must share the data set, the views and the queried sample-views; else a clear error."""
    (first, a), *rest = stores.items()
    for other, b in rest:
        pair = f"ensemble '{name}', split {a.split}: members '{first}' and '{other}'"
        if a.attrs.get("dataset") != b.attrs.get("dataset"):
            raise StoreError(
                f"{pair} were cached on different data: {a.attrs.get('dataset')} vs {b.attrs.get('dataset')}; "
                "re-run teach for both on the same shards"
            )
        if (a.n, a.num_classes, a.shard_rows) != (b.n, b.num_classes, b.shard_rows):
            raise StoreError(
                f"{pair} differ in rows/classes/shard size: {(a.n, a.num_classes, a.shard_rows)} vs "
                f"{(b.n, b.num_classes, b.shard_rows)}"
            )
        if (a.views, a.view_recipe) != (b.views, b.view_recipe):
            raise StoreError(
                f"{pair} cached different views: {a.views} view(s) {a.view_recipe} vs {b.views} view(s) "
                f"{b.view_recipe}; members must share teach.views/test_views, view_seed and augment"
            )
        qa, qb = a.queried(), b.queried()
        if not np.array_equal(qa, qb):
            raise StoreError(
                f"{pair} answered different sample-views ({int(qa.sum())} vs {int(qb.sum())} queried, "
                f"{int((qa != qb).sum())} differ; budgets {a.attrs.get('budget')} vs {b.attrs.get('budget')}): "
                "members must share teach.budget, strategy and budget_seed"
            )


def _leaves(stores: dict[str, LogitStore], weights: np.ndarray) -> list[tuple[str, float]]:
    """(name, weight) of the teachers whose logits the `members` array holds: a member ensemble kept with its
    members contributes them (its weights times its own), any other member itself."""
    out: list[tuple[str, float]] = []
    for (m, store), w in zip(stores.items(), weights, strict=True):
        inner = store.attrs.get("ensemble", {}).get("leaves") if store.member_names else None
        if inner:
            out += [(leaf["name"], float(w) * float(leaf["weight"])) for leaf in inner]
        else:
            out.append((m, float(w)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise StoreError(f"the members' teachers {names} repeat one; an ensemble counts each teacher once")
    return out


def _identity_sha(store: LogitStore) -> str:
    return hashlib.sha256(json.dumps(store.attrs.get("identity"), sort_keys=True).encode()).hexdigest()


def ensemble_spec(
    name: str, spec: EnsembleSpec, stores: dict[str, LogitStore], splits: dict[str, SplitSpec]
) -> StoreSpec:
    """The ensemble store's identity: its members' fingerprints, the combine rule and the weights."""
    if spec.combine not in COMBINES:
        raise StoreError(f"ensembles.{name}.combine: unknown rule '{spec.combine}'; available: {list(COMBINES)}")
    weights = normalized_weights(spec.weights, len(stores))
    first = next(iter(stores.values()))
    members = [{"name": m, "teacher": s.teacher, "identity_sha256": _identity_sha(s)} for m, s in stores.items()]
    leaves = _leaves(stores, weights) if spec.keep_members else []
    digest = hashlib.sha256(
        json.dumps([members, spec.combine, weights.tolist()], sort_keys=True, default=str).encode()
    ).hexdigest()
    return StoreSpec(
        teacher={
            "name": name,
            "arch": "ensemble",
            "members": [m["name"] for m in members],
            "combine": spec.combine,
            "weights_sha256": digest,  # what identifies this teacher: its members, rule and weights
        },
        dataset=first.attrs["dataset"],
        splits=splits,
        # float16 when every member is float16 (the default): the combination is no more precise than its inputs
        dtype="float16" if all(s.attrs.get("dtype") == "float16" for s in stores.values()) else "float32",
        compressor=first.attrs.get("compressor", "blosc-zstd"),
        chunk_rows=int(first.group["queried"].chunks[0]),
        extra={
            "budget": first.attrs.get("budget"),
            "ensemble": {
                "members": members,
                "combine": spec.combine,
                "weights": weights.tolist(),
                "keep_members": spec.keep_members,
                "leaves": [{"name": n, "weight": w} for n, w in leaves],
            },
        },
        members=tuple(n for n, _ in leaves),
    )


def ensemble_store(
    manifest: Manifest,
    name: str,
    spec: EnsembleSpec,
    store_of: Callable[[str], Path],
    *,
    force: bool = False,
) -> Path:
    """The `ensemble` stage: write teacher `name`'s store at `store_of(name)` from its members' stores.

    `store_of(teacher)` is where a teacher's store lives (`Layout.store`). Reads each member's shard block
    (one contiguous read per store shard), combines, writes the shard; resumes a partial run shard by shard.
    Holds the output's writer lock and its members' reader locks (`pipeline.lock`).
    """
    members = list(spec.members)
    if name in members:
        raise StoreError(f"ensemble '{name}' names itself as a member")
    with contextlib.ExitStack() as held:
        held.enter_context(exclusive(store_of(name), f"logit store {store_of(name)}"))
        for m in members:
            held.enter_context(reading(store_of(m), f"logit store {store_of(m)} (member of ensemble {name})"))
        return _write_ensemble(manifest, name, spec, store_of, members, force)


def _write_ensemble(
    manifest: Manifest,
    name: str,
    spec: EnsembleSpec,
    store_of: Callable[[str], Path],
    members: list[str],
    force: bool,
) -> Path:
    per_split: dict[str, dict[str, LogitStore]] = {}
    splits: dict[str, SplitSpec] = {}
    for split in manifest.splits:
        stores = per_split[split] = open_members(name, members, store_of, manifest, split)
        check_members(name, stores)
        s = stores[members[0]]
        splits[split] = SplitSpec(s.n, s.num_classes, s.views, s.shard_rows, s.view_recipe)
    store_spec = ensemble_spec(name, spec, per_split[next(iter(splits))], splits)
    weights = np.asarray(store_spec.extra["ensemble"]["weights"])
    writer = StoreWriter(store_of(name), store_spec, force=force)
    for split, stores in per_split.items():
        todo = writer.pending(split)
        for j in todo:
            start, stop = splits[split].shard_range(j)
            blocks = np.stack([s.read_block(start, stop) for s in stores.values()], axis=2)  # (n, V, M, C)
            queried = next(iter(stores.values())).queried(start, stop)  # (n, V): equal for all members (checked)
            kept = _member_block(stores, start, stop, blocks) if store_spec.members else None
            writer.write_shard(split, j, combine_logits(blocks, weights, spec.combine), queried, members=kept)
        log.info("ensemble %s: split %s, %d shard(s) written", name, split, len(todo))
    calls = {split: {m: s.teacher_calls for m, s in stores.items()} for split, stores in per_split.items()}
    return writer.finalize({"member_teacher_calls": calls})


def _member_block(stores: dict[str, LogitStore], start: int, stop: int, blocks: np.ndarray) -> np.ndarray:
    """(n, V, leaves, C): each member's logits, or its own members' when it is an ensemble that kept them."""
    parts = [
        s.read_members(start, stop) if s.member_names else blocks[:, :, k : k + 1]
        for k, s in enumerate(stores.values())
    ]
    return np.concatenate(parts, axis=2)
