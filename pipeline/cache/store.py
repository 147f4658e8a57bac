"""The logit store: a Zarr v3 group of raw teacher logits, written once, trusted downstream.

Layout (one group per teacher, one sub-group per split)::

    <teacher>.zarr/                 attrs: schema, teacher, dataset, dtype, library, complete
      <split>/                      attrs: n, num_classes, views, view_recipe, shard_rows, teacher_calls
        logits      (N, V, C)       raw logits (never softmaxed), float16 | float32      [dense layout]
        topk_values (N, V, k)       raw logits of the k largest classes                    [top-k layout]
        topk_indices(N, V, k)       their class ids (smallest unsigned int that fits C)
        tail_mass   (N, V)          softmax(z)[classes outside the top k].sum()  (T = 1)
        queried     (N, V) bool     which sample-views the teacher actually saw (budget mode)
        round       (N, V) int16    active queries: the round that selected each sample-view (-1: never) [ordered]
        order       (N, V) int32    active queries: its position in the order of teacher calls (-1: never) [ordered]
        members     (N, V, M, C)    an ensemble's member-teacher logits, M = len(attrs["members"]) [optional]
        done        (S,) bool       per store shard: written completely (resume + concurrent writers)

Row `i` is sample `i` of the split's manifest. A store shard covers exactly one WebDataset shard's
index range, so one tar shard's logits are one contiguous (and one-file) read. Unqueried rows hold
NaN. Writing happens in `<teacher>.zarr.partial/`, renamed into place only when every shard is done:
a partial output is never taken for a finished one. Writers own whole store shards, so any number of
processes (dask workers) can fill disjoint shards of one store safely; one process at a time owns the
store as a whole (`pipeline.lock.exclusive`, taken by teach, the dask driver and import-logits).

The store holds no wall-clock time: equal inputs give a byte-identical store, so DVC sees an
unchanged output (run times go to the teach stage's log file, `Layout.run_log`).

Integrity (schema 2): every chunk of every array ends in a CRC32C checksum (zarr's `crc32c` codec after the
compressor, inside the sharding codec, whose shard index carries its own), and every chunk is written even when
it holds only fill values (`write_empty_chunks`), so a store shard marked done has all its files. A reader
therefore never takes damage for values: a missing file of a done shard, a chunk that fails its checksum, a
queried sample-view that is not finite or an unqueried one that holds numbers are each a `StoreError` naming the
store, the array, the shard file and its rows (`LogitStore` checks the files when it opens and every block it
reads; `pipeline.cache.verify` scans a whole store).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.data.shards import Manifest
from pipeline.errors import UserError
from pipeline.layout import PARTIAL_SUFFIX, partial_path

log = logging.getLogger(__name__)

#: 2: a CRC32C checksum on every chunk and every chunk written (schema 1 stores had neither: re-run teach)
SCHEMA_VERSION = 2
FLOAT16_MAX = 65504.0
COMPRESSORS = ("blosc-zstd", "zstd", "none")


# zarr's LocalStore writes `<file>.<uuid4 hex>.partial` and renames it into place: one left behind (a writer
# killed mid-write) is junk that would change the finished store's bytes.
_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")


class StoreError(UserError, ValueError):
    """A logit store that cannot be used as asked (mismatch, incomplete, corrupt)."""


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def _compressors(name: str) -> tuple[Any, ...]:
    """The bytes-to-bytes codecs of every chunk: the compressor, then a CRC32C of the compressed bytes (so a flipped
    or truncated chunk fails its checksum on read instead of decompressing into other numbers)."""
    if name == "blosc-zstd":
        # Byte shuffle groups the float16 exponent bytes together: ~2x smaller than plain zstd (BENCHMARKS.md).
        return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
    if name == "zstd":
        return (ZstdCodec(level=3), Crc32cCodec())
    if name == "none":
        return (Crc32cCodec(),)
    raise StoreError(f"unknown store compressor '{name}'; available: {list(COMPRESSORS)}")


def _write_every_chunk() -> None:
    """zarr skips chunks equal to the fill value (NaN logits of unqueried rows, False flags); written anyway, every
    store shard marked done has all its files, so a missing file is damage, never "all fill". Process-wide (a
    writer's threads write shards concurrently: a per-call `zarr.config.set` block would race); reads ignore it."""
    zarr.config.set({"array.write_empty_chunks": True})


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds class ids < num_classes."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class SplitSpec:
    """Shape of one split's arrays."""

    n: int
    num_classes: int
    views: int
    shard_rows: int  # rows per store shard == rows per WebDataset shard
    view_recipe: dict[str, Any]

    @property
    def num_shards(self) -> int:
        return (self.n + self.shard_rows - 1) // self.shard_rows

    def shard_range(self, j: int) -> tuple[int, int]:
        return j * self.shard_rows, min((j + 1) * self.shard_rows, self.n)


@dataclass(frozen=True)
class StoreSpec:
    """Everything that identifies a store's content: two writers with equal specs write equal stores."""

    teacher: dict[str, Any]  # name, arch, weights_sha256
    dataset: dict[str, Any]  # name, manifest_sha256
    splits: dict[str, SplitSpec]
    dtype: str = "float16"
    topk: int = 0
    compressor: str = "blosc-zstd"
    chunk_rows: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. budget selection recipe
    # Member teachers whose logits an ensemble store keeps next to the combined ones (`members` array);
    # which members they are is part of the ensemble's identity in `extra`.
    members: tuple[str, ...] = ()
    # Splits whose teacher calls are made in rounds (active queries, `pipeline.active`): they also hold the
    # `round` and `order` arrays, and their shards are marked done when the last round is written.
    ordered: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """The attrs a resumed run must agree on."""
        ident = {
            "schema_version": SCHEMA_VERSION,
            "teacher": self.teacher,
            "dataset": self.dataset,
            "dtype": self.dtype,
            "topk": self.topk,
            "extra": self.extra,
            "splits": {k: _split_attrs(s) for k, s in self.splits.items()},
        }
        if self.ordered:  # only then: the identity (and bytes) of every other store stay what they were
            ident["ordered"] = list(self.ordered)
        return ident


def _split_attrs(s: SplitSpec) -> dict[str, Any]:
    return {
        "n": s.n,
        "num_classes": s.num_classes,
        "views": s.views,
        "shard_rows": s.shard_rows,
        "view_recipe": s.view_recipe,
    }


def same_content(attrs: dict[str, Any], spec: StoreSpec, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a store's recorded identity (its attrs) equals `spec`'s, leaving out the `ignore`d keys."""
    found = attrs.get("identity") or {}
    want = _jsonable(spec.identity())
    return {k: v for k, v in found.items() if k not in ignore} == {k: v for k, v in want.items() if k not in ignore}


# ---------------------------------------------------------------------------------------------
# writing


class StoreWriter:
    """Create or resume `<path>.partial`, fill whole shards, then finalize (rename) into `<path>`.

    Resuming requires the partial store's identity (teacher weights hash, manifest hash, shapes,
    dtype, layout) to equal `spec`'s; anything else is an error rather than a silent mix.
    """

    def __init__(self, path: str | Path, spec: StoreSpec, *, force: bool = False, create: bool = True) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.spec = spec
        if spec.dtype not in ("float16", "float32"):
            raise StoreError(f"store dtype must be float16 or float32, got '{spec.dtype}'")
        _write_every_chunk()
        if self.path.exists():
            if not force:
                raise StoreError(f"{self.path} already exists; pass --force to overwrite it (or delete it)")
            shutil.rmtree(self.path)
        if self.partial.exists():
            if force and create:
                shutil.rmtree(self.partial)
            else:
                self._check_resumable()
        if not self.partial.exists():
            if not create:
                raise StoreError(f"no partial store at {self.partial} to write into; the driver creates it first")
            self._create()
        self.group = zarr.open_group(str(self.partial), mode="r+")

    def _check_resumable(self) -> None:
        try:
            g = zarr.open_group(str(self.partial), mode="r")
            found = g.attrs.get("identity")
        except Exception as e:  # not a zarr group at all
            raise StoreError(f"{self.partial} is not a kdcache partial store ({e}); delete it or pass --force") from e
        want = _jsonable(self.spec.identity())
        if found != want:
            diff = sorted(k for k in set(want) | set(found or {}) if (found or {}).get(k) != want.get(k))
            raise StoreError(
                f"{self.partial} holds a partial store of a different run (differs in {diff}); "
                "delete it or pass --force to start over"
            )
        log.info("resuming partial store %s", self.partial)

    def _create(self) -> None:
        spec = self.spec
        tmp = self.partial.with_name(self.partial.name + ".creating")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w")
        compressors = _compressors(spec.compressor)
        for name, s in spec.splits.items():
            g = root.create_group(name)
            rows = max(1, min(spec.chunk_rows, s.shard_rows))
            if s.shard_rows % rows:
                raise StoreError(f"chunk_rows {rows} must divide the shard size {s.shard_rows}")
            v, c, k = s.views, s.num_classes, spec.topk
            n, shard_rows = s.n, s.shard_rows

            def arr(key: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> None:
                _create_array(g, key, shape, dtype, fill, rows, shard_rows, compressors)  # noqa: B023 (called now)

            if spec.members:
                if k:
                    raise StoreError("member logits are kept dense: an ensemble store with members cannot be top-k")
                arr("members", (n, v, len(spec.members), c), spec.dtype, np.nan)
            if k:
                if k >= c:
                    raise StoreError(f"store.topk={k} must be smaller than the number of classes {c}")
                arr("topk_values", (n, v, k), spec.dtype, np.nan)
                arr("topk_indices", (n, v, k), index_dtype(c), 0)
                arr("tail_mass", (n, v), "float32", np.nan)
            else:
                arr("logits", (n, v, c), spec.dtype, np.nan)
            arr("queried", (n, v), "bool", False)
            if name in spec.ordered:
                arr("round", (n, v), "int16", -1)
                arr("order", (n, v), "int32", -1)
            # One chunk per shard flag so concurrent writers never share a file.
            g.create_array(
                "done", shape=(s.num_shards,), dtype="bool", chunks=(1,), fill_value=False, compressors=(Crc32cCodec(),)
            )
            g.attrs.update({"split": name, **_split_attrs(s), "teacher_calls": 0})
        root.attrs.update(
            {
                "identity": _jsonable(spec.identity()),
                "schema_version": SCHEMA_VERSION,
                "teacher": spec.teacher,
                "dataset": spec.dataset,
                "dtype": spec.dtype,
                "topk": spec.topk,
                "compressor": spec.compressor,
                "library": library_version(),
                "complete": False,
                **({"members": list(spec.members)} if spec.members else {}),
                **spec.extra,
            }
        )
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self.partial)  # a half-created skeleton is never mistaken for a resumable one

    def pending(self, split: str) -> list[int]:
        """Store shard indices of `split` not yet written completely (a shard marked done with a file missing is
        written again: every chunk of a done shard is on disk, so a missing file is damage to repair, not fill)."""
        g = self.group[split]
        done = g["done"][:]
        arrays = [a for name, a in g.arrays() if name != "done"]
        lost = [
            int(j) for j in np.flatnonzero(done) if any(not shard_file(self.partial, a, j).is_file() for a in arrays)
        ]
        if lost:
            log.warning(
                "%s: store shards %s of %s are marked done but miss files: writing them again",
                self.partial,
                _first(np.asarray(lost)),
                split,
            )
        return sorted([int(j) for j in np.flatnonzero(~done)] + lost)

    def write_shard(
        self,
        split: str,
        j: int,
        logits: np.ndarray,
        queried: np.ndarray | None = None,
        keys: list[str] | None = None,
        members: np.ndarray | None = None,
    ) -> None:
        """Write store shard `j` of `split` whole, then mark it done.

        logits: (n_j, V, C) float32 raw logits for the shard's rows (NaN where not queried);
        queried: (n_j, V) bool (default: all True); keys name rows in error messages;
        members: (n_j, V, M, C) member-teacher logits, required exactly when the spec keeps members.
        """
        s = self.spec.splits[split]
        start, stop = s.shard_range(j)
        n = stop - start
        if logits.shape != (n, s.views, s.num_classes):
            raise StoreError(
                f"shard {j} of {split}: logits shape {logits.shape} != expected {(n, s.views, s.num_classes)}"
            )
        if queried is None:
            queried = np.ones((n, s.views), dtype=bool)
        bad = queried & ~np.isfinite(logits).all(-1)  # (n, V)
        if bad.any():
            rows = np.flatnonzero(bad.any(1))[:5] + start
            names = [keys[r - start] for r in rows] if keys else [int(r) for r in rows]
            raise StoreError(
                f"teacher produced NaN/Inf logits for {int(bad.sum())} queried sample-view(s) of {split}, "
                f"e.g. samples {names}; refusing to cache them (check the teacher and its inputs)"
            )
        if (
            self.spec.dtype == "float16"
            and np.abs(np.where(queried[..., None], logits, 0)).max(initial=0) > FLOAT16_MAX
        ):
            raise StoreError(f"logits in shard {j} of {split} exceed float16's range; set teach.dtype: float32")
        logits = np.where(queried[..., None], logits, np.nan).astype(np.float32)
        g = self.group[split]
        if bool(self.spec.members) != (members is not None):
            raise StoreError(
                f"shard {j} of {split}: member logits given: {members is not None}; the spec keeps members "
                f"{list(self.spec.members)}"
            )
        if members is not None:
            g["members"][start:stop] = self._checked_members(split, j, members, queried)
        if self.spec.topk:
            values, indices, tail = topk_compress(logits, self.spec.topk)
            g["topk_values"][start:stop] = values.astype(self.spec.dtype)
            g["topk_indices"][start:stop] = indices.astype(g["topk_indices"].dtype)
            g["tail_mass"][start:stop] = tail
        else:
            g["logits"][start:stop] = logits.astype(self.spec.dtype)
        g["queried"][start:stop] = queried
        g["done"][j] = True  # last: a shard killed mid-write stays pending and is redone

    def _checked_members(self, split: str, j: int, members: np.ndarray, queried: np.ndarray) -> np.ndarray:
        """(n, V, M, C) member logits in the store dtype, NaN where not queried; refuses NaN/Inf or float16 overflow."""
        s = self.spec.splits[split]
        want = (len(queried), s.views, len(self.spec.members), s.num_classes)
        if members.shape != want:
            raise StoreError(f"shard {j} of {split}: members shape {members.shape} != expected {want}")
        q = queried[:, :, None, None]  # (n, V, 1, 1)
        if (q & ~np.isfinite(members)).any():
            raise StoreError(f"member logits of shard {j} of {split} hold NaN/Inf on queried sample-views")
        if self.spec.dtype == "float16" and np.abs(np.where(q, members, 0)).max(initial=0) > FLOAT16_MAX:
            raise StoreError(f"member logits in shard {j} of {split} exceed float16's range; use float32")
        return np.where(q, members, np.nan).astype(self.spec.dtype)

    # -- teacher calls made in rounds (ordered splits: active queries) -----------------------------

    def selection(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(round, order), each (N, V), of an ordered split: which round selected each sample-view and its call's
        position in the order of all calls (-1: not selected)."""
        g = self._ordered_group(split)
        return g["round"][:], g["order"][:]

    def record_selection(self, split: str, round_: np.ndarray, order: np.ndarray) -> None:
        """Replace the (N, V) `round` and `order` arrays of an ordered split (selections are recorded before the
        teacher is called on them, so a killed run knows which calls it still owes)."""
        g = self._ordered_group(split)
        s = self.spec.splits[split]
        if round_.shape != (s.n, s.views) or order.shape != (s.n, s.views):
            raise StoreError(f"{split}: selection shapes {round_.shape}, {order.shape} != {(s.n, s.views)}")
        if ((round_ >= 0) != (order >= 0)).any():
            raise StoreError(f"{split}: a sample-view has a round but no call position, or the reverse")
        made = g["queried"][:]
        if (made & (round_ < 0)).any():
            raise StoreError(f"{split}: the selection drops sample-views whose teacher calls were already made")
        g["round"][:] = round_.astype(np.int16)
        g["order"][:] = order.astype(np.int32)

    def add_calls(self, split: str, j: int, calls: np.ndarray, logits: np.ndarray) -> None:
        """Add teacher calls to store shard `j` of an ordered split, keeping the calls it already holds.

        calls: (n_j, V) bool, the sample-views answered now; logits: (n_j, V, C) float32, read where `calls` is
        set (NaN elsewhere). The logits are written before the `queried` flags: a call counts as made only once
        its logits are in the store, so a writer killed in between makes that call again, never loses one.
        """
        s = self.spec.splits[split]
        self._ordered_group(split)
        start, stop = s.shard_range(j)
        n = stop - start
        if calls.shape != (n, s.views) or logits.shape != (n, s.views, s.num_classes):
            raise StoreError(f"shard {j} of {split}: calls {calls.shape} / logits {logits.shape} do not fit the shard")
        if not np.isfinite(logits[calls]).all():
            raise StoreError(f"teacher produced NaN/Inf logits in shard {j} of {split}; refusing to cache them")
        if self.spec.dtype == "float16" and np.abs(logits[calls]).max(initial=0) > FLOAT16_MAX:
            raise StoreError(f"logits in shard {j} of {split} exceed float16's range; set teach.dtype: float32")
        g = self.group[split]
        queried = g["queried"][start:stop]
        if (queried & calls).any():
            raise StoreError(f"shard {j} of {split}: some of these teacher calls are already in the store")
        rows, views = np.nonzero(calls)
        new = logits[rows, views][:, None, :]  # (k, 1, C)
        if self.spec.topk:  # the calls already held keep their stored values: nothing is recompressed
            keys = ("topk_values", "topk_indices", "tail_mass")
            parts = dict(zip(keys, topk_compress(new, self.spec.topk), strict=True))
            for key, part in parts.items():
                block = g[key][start:stop]
                block[rows, views] = part[:, 0].astype(block.dtype)
                g[key][start:stop] = block
        else:
            block = g["logits"][start:stop]  # (n, V, C) stored dtype
            block[rows, views] = new[:, 0].astype(block.dtype)
            g["logits"][start:stop] = block
        g["queried"][start:stop] = queried | calls

    def mark_done(self, split: str) -> None:
        """Mark every shard of `split` written (an ordered split, once its last round's calls are in)."""
        self._ordered_group(split)["done"][:] = True

    def _ordered_group(self, split: str) -> zarr.Group:
        if split not in self.spec.ordered:
            raise StoreError(f"split {split} of {self.partial} is not written in rounds (no round/order arrays)")
        return self.group[split]

    def read(self, split: str, manifest: Manifest | None = None) -> LogitStore:
        """What this writer has written so far, read back (the rounds of active queries train on it)."""
        return LogitStore(self.partial, split, manifest, partial=True)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Check every shard is done, record call counts, and atomically move into place."""
        calls = {}
        for split in self.spec.splits:
            missing = self.pending(split)
            if missing:
                raise StoreError(f"cannot finalize {self.partial}: split {split} shards {missing[:10]} are not written")
            g = self.group[split]
            calls[split] = int(g["queried"][:].sum())
            g.attrs["teacher_calls"] = calls[split]
        self.group.attrs.update({"teacher_calls": calls, "complete": True, **(extra_attrs or {})})
        for junk in [p for p in self.partial.rglob("*.partial") if p.is_file() and _ZARR_TEMP.search(p.name)]:
            log.info("removing %s (a write interrupted by a killed writer)", junk)
            junk.unlink()
        os.replace(self.partial, self.path)
        log.info("store complete: %s (teacher calls %s)", self.path, calls)
        return self.path


def _create_array(
    g: zarr.Group, key: str, shape: tuple[int, ...], dtype: Any, fill: Any, rows: int, shard_rows: int, compressors: Any
) -> None:
    """An (N, ...) array chunked by `rows` along N and sharded by `shard_rows` (one file per store shard)."""
    tail = shape[1:]
    g.create_array(
        key,
        shape=shape,
        dtype=dtype,
        chunks=(rows, *tail),
        shards=(shard_rows, *tail),
        compressors=compressors,
        fill_value=fill,
    )


def _jsonable(x: Any) -> Any:
    """Round-trip through JSON types so comparisons with stored attrs are exact."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---------------------------------------------------------------------------------------------
# top-k layout


def topk_compress(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, V, C) logits -> top-k values (n, V, k), indices (n, V, k), tail mass (n, V) at T = 1."""
    idx = np.argsort(-np.nan_to_num(logits, nan=-np.inf), axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(logits, idx, -1)
    z = logits - np.nanmax(logits, axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    tail = np.clip(1.0 - np.take_along_axis(p, idx, -1).sum(-1), 0.0, 1.0)
    return vals, idx, tail.astype(np.float32)


def topk_expand(values: np.ndarray, indices: np.ndarray, tail: np.ndarray, num_classes: int) -> np.ndarray:
    """Rebuild dense logits (n, V, C) from the top-k layout.

    The k stored logits are exact. The tail mass is spread evenly over the other C-k classes: with
    Z the softmax normaliser recovered from sum_topk exp(z_i) = (1 - tail) * Z, every tail class
    gets logit log(tail / (C - k) * Z). The softmax at T = 1 is then exact on the top k and uniform
    in the tail; rank-based losses see the tail as ties.
    """
    values = values.astype(np.float32)
    k = values.shape[-1]
    m = values.max(-1, keepdims=True)  # (n, V, 1) stabiliser
    log_top = np.log(np.exp(values - m).sum(-1))  # (n, V): log sum_topk exp(z - m)
    log_z = log_top - np.log(np.clip(1.0 - tail, 1e-12, None))  # log Z - m
    tail_logit = np.log(np.clip(tail, 1e-30, None) / (num_classes - k)) + log_z  # (n, V), minus m
    out = np.broadcast_to((tail_logit[..., None] + m), (*values.shape[:-1], num_classes)).copy()
    np.put_along_axis(out, indices.astype(np.int64), values, -1)
    return out


# ---------------------------------------------------------------------------------------------
# reading


def store_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of the store at `path` (teacher, data set, schema...), without opening any array."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as e:  # noqa: BLE001 (zarr raises several types for "not a group")
        raise StoreError(f"{path} is not a Zarr group ({e}); is it a kdcache logit store?") from e


def shard_file(root: Path, arr: zarr.Array, j: int) -> Path:
    """The file of store shard `j` of `arr` in the store at `root` (zarr's chunk key of the shard grid: c/<j>/0/...)."""
    return Path(root, arr.path, arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1)))


def all_finite(block: np.ndarray) -> bool:
    """Whether every value of a float block is finite, in one reduction: float16 by its bits (exponent all ones =
    Inf/NaN: the largest |bits| below 0x7C00), ~6x faster than `np.isfinite`, which converts half floats one by one."""
    if block.size == 0:
        return True
    if block.dtype == np.float16:
        return bool((block.view(np.uint16) & 0x7FFF).max() < 0x7C00)
    return bool(np.isfinite(block).all())


def finite_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(all finite, any finite) over the last axis of a float block (n, V, C) -> two (n, V) bool arrays.

    float16 is tested on its exponent bits (all ones = Inf/NaN): one integer pass, ~4x faster than np.isfinite
    on half floats, which numpy converts element by element.
    """
    half = block.dtype == np.float16
    fin = ((block.view(np.uint16) & 0x7C00) != 0x7C00) if half else np.isfinite(block)
    return fin.all(-1), fin.any(-1)


def _first(rows: np.ndarray, k: int = 5) -> str:
    """The first k of `rows` for a message: '[3, 7, 9] (and 12 more)'."""
    head = [int(r) for r in rows[:k]]
    return f"{head}" + (f" (and {len(rows) - k} more)" if len(rows) > k else "")


class LogitStore:
    """Read-only view of one split of a complete store, checked against the data set it joins."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        manifest: Manifest | None = None,
        *,
        partial: bool = False,
        strict: bool = True,
    ) -> None:
        """`partial=True` (`StoreWriter.read`, `inspect`): read a store still being written; never a user's choice.
        `strict=False` (`verify` only): open a store whose shards miss files, to list every problem."""
        self.path = Path(path)
        if self.path.name.endswith(PARTIAL_SUFFIX) and not partial:
            raise StoreError(f"{self.path} is a partial store (an unfinished teach run); re-run teach to complete it")
        if not self.path.exists():
            hint = " (a partial run exists: re-run teach to resume it)" if partial_path(self.path).exists() else ""
            raise StoreError(f"no logit store at {self.path}{hint}; run `dvc repro teach@<teacher>` first")
        try:
            root = zarr.open_group(str(self.path), mode="r")
            attrs = dict(root.attrs)
        except Exception as e:
            raise StoreError(f"{self.path} is not a Zarr group ({e}); is it a kdcache logit store?") from e
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {attrs.get('schema_version')!r}, this kdcache reads {SCHEMA_VERSION}"
            )
        if not attrs.get("complete") and not partial:
            raise StoreError(f"{self.path} is marked incomplete; re-run teach to finish it")
        if split not in root:
            raise StoreError(f"{self.path} has no split '{split}'; splits: {sorted(k for k, _ in root.groups())}")
        self.root = root
        self.attrs = attrs
        self.split = split
        self.group = root[split]
        sa = dict(self.group.attrs)
        self.n: int = sa["n"]
        self.num_classes: int = sa["num_classes"]
        self.views: int = sa["views"]
        self.shard_rows: int = sa["shard_rows"]
        self.view_recipe: dict[str, Any] = sa["view_recipe"]
        self.teacher_calls: int = sa.get("teacher_calls", 0)
        self.topk: int = attrs.get("topk", 0)
        #: an ensemble store's member teachers, in the order of the `members` array's M axis (else empty)
        self.member_names: tuple[str, ...] = tuple(attrs.get("members") or ())
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._member_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._arrays: dict[str, zarr.Array] = {}
        self._queried: np.ndarray | None = None  # (N, V) flags, read once on first need
        self.done = self._read_done()  # (S,) bool: store shards written completely
        if strict:
            self._check_complete(partial)
        if manifest is not None:
            self.check(manifest)

    def _check_complete(self, partial: bool) -> None:
        """The cheap part of integrity, on every open: all shards done (a complete store), every done shard's files."""
        if not partial and not self.done.all():
            raise StoreError(
                f"{self.path} is marked complete, but {self.split} store shards {_first(np.flatnonzero(~self.done))} "
                f"are not marked done: the store is damaged. {self.rewrite_hint}"
            )
        missing = self.missing_files()
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} file(s) of written store shards are missing, e.g. "
                f"{self.path / missing[0]}: the store is damaged (a missing file would read as fill values). "
                f"{self.rewrite_hint}"
            )

    @property
    def teacher(self) -> dict[str, Any]:
        return self.attrs["teacher"]

    @property
    def rewrite_hint(self) -> str:
        """How to get an undamaged store: rewrite it with the command that made it."""
        name = (self.attrs.get("teacher") or {}).get("name") or self.path.name.removesuffix(".zarr")
        return (
            f"Rewrite it: `dvc repro -f teach@{name}` (or the ensemble/query/import-logits command that made it); "
            f"`kdcache verify {self.path}` lists every problem"
        )

    # -- checked reads: a damaged store is an error naming the file, never values ---------------------------

    def shard_range(self, j: int) -> tuple[int, int]:
        """Rows [start, stop) of store shard `j`."""
        return j * self.shard_rows, min((j + 1) * self.shard_rows, self.n)

    def _array(self, name: str) -> zarr.Array:
        """Array `name` of the split, opened once (each `group[name]` reads its metadata file again)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    def shard_file(self, name: str, j: int) -> Path:
        """The file holding store shard `j` of array `name` of this split (zarr's chunk key `c/<j>/0/...`)."""
        return shard_file(self.path, self._array(name), j)

    def _read_done(self) -> np.ndarray:
        try:
            return np.asarray(self._array("done")[:], dtype=bool)
        except Exception as e:  # noqa: BLE001 (zarr raises ValueError, KeyError, ...: any of them is damage)
            raise StoreError(
                f"{self.path}: the done flags of split {self.split} cannot be read ({type(e).__name__}: {e}): the "
                f"store is damaged. {self.rewrite_hint}"
            ) from e

    def arrays(self) -> list[str]:
        """The split's per-row arrays (all but the `done` flags), in a fixed order."""
        return sorted(name for name, _ in self.group.arrays() if name != "done")

    def missing_files(self, shards: np.ndarray | None = None) -> list[str]:
        """Files of written (done) store shards that are not on disk, relative to the store (cheap: one stat each)."""
        js = np.flatnonzero(self.done) if shards is None else shards
        out = []
        for name in self.arrays():
            for j in js:
                f = self.shard_file(name, int(j))
                if not f.is_file():
                    out.append(str(f.relative_to(self.path)))
        return out

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, checked: every done shard's file present (one stat each), every chunk's
        CRC32C checked by zarr as it decodes. One zarr read for the whole range (each read costs ~2.5 ms of zarr's
        async round trip); only when it fails, shard by shard to name the damaged file."""
        arr = self._array(name)
        shards = range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1) if stop > start else range(0)
        for j in shards:
            if j < len(self.done) and self.done[j] and not self.shard_file(name, j).is_file():
                a, b = self.shard_range(j)
                raise StoreError(
                    f"{self.path}: store shard file {self.shard_file(name, j)} (rows [{a}, {b}) of "
                    f"{self.split}/{name}) is missing: the store is damaged. {self.rewrite_hint}"
                )
        try:
            return arr[start:stop]
        except Exception as first:  # noqa: BLE001 (a checksum mismatch is a ValueError, a truncated index others)
            for j in shards:
                a, b = max(start, j * self.shard_rows), min(stop, (j + 1) * self.shard_rows)
                try:
                    arr[a:b]
                except Exception as e:  # noqa: BLE001
                    raise StoreError(
                        f"{self.path}: store shard file {self.shard_file(name, j)} (rows [{a}, {b}) of "
                        f"{self.split}/{name}) is damaged ({type(e).__name__}: {' '.join(str(e).split())}). "
                        f"{self.rewrite_hint}"
                    ) from e
            raise StoreError(
                f"{self.path}: {self.split}/{name} cannot be read ({first}). {self.rewrite_hint}"
            ) from first

    def _queried_rows(self, start: int, stop: int) -> np.ndarray:
        """(n, V) `queried` flags of rows [start, stop), from the whole split's flags read once (N x V bools): the
        value rule needs them for every block, and a zarr read per block would cost more than the rule itself."""
        if self._queried is None:
            if self.teacher_calls == self.n * self.views and self.done.all():
                # A full split (its recorded calls = N x V): every flag is set, no read needed. A count that lies
                # cannot hide damage: a row that is really unqueried holds NaN, which the value rule refuses.
                self._queried = np.ones((self.n, self.views), dtype=bool)
            else:
                self._queried = self.read_array("queried", 0, self.n)
        return self._queried[start:stop]

    def check_values(
        self, name: str, start: int, block: np.ndarray, tail: np.ndarray | None = None, q: np.ndarray | None = None
    ) -> None:
        """The value rule on rows [start, start + n) of array `name` (block (n, V, ...), tail (n, V) for top-k) against
        their `queried` flags q (n, V; default: this split's, read once): one cheap reduction when every row is
        queried and finite (the usual case), the per-row check (`_check_rows`) otherwise."""
        q = self._queried_rows(start, start + len(block)) if q is None else q
        if q.all() and all_finite(block) and (tail is None or bool(np.isfinite(tail).all())):
            return
        flat = block.reshape(*block.shape[:2], -1)  # (n, V, C) or an ensemble's (n, V, M * C)
        every, some = finite_rows(flat)
        if tail is not None:
            every, some = every & np.isfinite(tail), some | np.isfinite(tail)
        self._check_rows(name, start, q, every, some)

    def _check_rows(self, name: str, start: int, q: np.ndarray, every: np.ndarray, some: np.ndarray) -> None:
        """Every queried sample-view of rows [start, start + n) is finite, every unqueried one all NaN.

        q, every, some: (n, V) bool: queried; all values finite; any value finite. A queried NaN row is a lost value
        (a shard that read as fill); an unqueried row with numbers means the `queried` flags and the logits disagree:
        either way the store is damaged, and reading on would train on (or skip) the wrong rows.
        """
        bad_q = q & ~every
        bad_u = ~q & some
        if not (bad_q.any() or bad_u.any()):
            return
        rows = np.flatnonzero((bad_q | bad_u).any(1)) + start
        what = (
            f"{int(bad_q.sum())} queried sample-view(s) hold NaN/Inf"
            if bad_q.any()
            else f"{int(bad_u.sum())} sample-view(s) not marked queried hold logits"
        )
        files = sorted({str(self.shard_file(name, int(r) // self.shard_rows)) for r in rows[:50]})
        raise StoreError(
            f"{self.path}: {what} in {self.split}/{name}, rows {_first(rows)} (shard file {files[0]}"
            f"{f' and {len(files) - 1} more' if len(files) > 1 else ''}): the store is damaged. {self.rewrite_hint}"
        )

    def check(self, manifest: Manifest) -> None:
        """Refuse to join with shards of another data set (hash, N, C, shard size): name both sides."""
        ours = self.attrs["dataset"]
        theirs = {"name": manifest.dataset, "manifest_sha256": manifest.sha256}
        problems = []
        if ours.get("manifest_sha256") != manifest.sha256:
            problems.append(f"manifest sha256 {ours.get('manifest_sha256', '?')[:12]} != {manifest.sha256[:12]}")
        split = manifest.split(self.split)
        if self.n != split.n:
            problems.append(f"N {self.n} != {split.n}")
        if self.num_classes != manifest.num_classes:
            problems.append(f"C {self.num_classes} != {manifest.num_classes}")
        if self.shard_rows != manifest.shard_size:
            problems.append(f"shard rows {self.shard_rows} != {manifest.shard_size}")
        if problems:
            raise StoreError(
                f"logit store {self.path} (data set {ours}) does not match shards {manifest.root} ({theirs}): "
                + "; ".join(problems)
                + ". Re-run `dvc repro teach@<teacher>` on these shards."
            )

    def _dense(self, start: int, stop: int, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        if self.topk:  # the expansion computes in float32 anyway
            values = self.read_array("topk_values", start, stop)  # (n, V, k)
            tail = self.read_array("tail_mass", start, stop)  # (n, V)
            self.check_values("topk_values", start, values, tail)
            return topk_expand(values, self.read_array("topk_indices", start, stop), tail, self.num_classes)
        block = self.read_array("logits", start, stop)  # (n, V, C) stored dtype
        self.check_values("logits", start, block)
        return block if dtype is None else block.astype(dtype, copy=False)

    def read_block(self, start: int, stop: int, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """Rows [start, stop) as dense logits (n, V, C); NaN where not queried.

        dtype: float32 by default. ``None`` keeps the stored dtype (float16 by default): half the
        memory and no conversion pass over all V views; the loader converts only the (B, C) rows and
        views it batches, which is where half of a float32 block read's time went (BENCHMARKS.md).
        """
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n}) of {self.path}/{self.split}")
        return self._dense(start, stop, dtype)

    def queried(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, V) bool: which sample-views the teacher saw."""
        return self._queried_rows(start, self.n if stop is None else stop).copy()

    def query_order(self) -> np.ndarray | None:
        """(N, V) int32: each call's position in the order the teacher was asked (-1: never); None unless the store
        was written in rounds (active queries), whose order only the store knows."""
        return self.read_array("order", 0, self.n) if "order" in self.group else None

    def query_rounds(self) -> np.ndarray | None:
        """(N, V) int16: the round that selected each sample-view (-1: never); None unless written in rounds."""
        return self.read_array("round", 0, self.n) if "round" in self.group else None

    def read_rows(self, rows: np.ndarray, cache_shards: int = 4) -> np.ndarray:
        """Random rows (B,) -> (B, V, C) float32, reading whole store shards and indexing in numpy.

        zarr's per-element fancy indexing decodes a chunk per request; decoding each shard once and
        keeping a few in an LRU makes random batches ~100x faster (BENCHMARKS.md).
        """
        return self._gather(rows, cache_shards, self._cache, lambda a, b: self._dense(a, b, dtype=None))

    def _gather(self, rows: np.ndarray, cache_shards: int, cache: OrderedDict, block_of: Any) -> np.ndarray:
        """Rows (B,) of whole-shard blocks `block_of(start, stop)` (stored dtype), kept in the LRU `cache`."""
        rows = np.asarray(rows, dtype=np.int64)
        out: np.ndarray | None = None
        shard = rows // self.shard_rows
        for j in np.unique(shard):
            block = cache.get(int(j))
            if block is None:
                start = int(j) * self.shard_rows
                block = block_of(start, min(start + self.shard_rows, self.n))  # stored dtype
                cache[int(j)] = block
                if len(cache) > cache_shards:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(int(j))
            if out is None:
                out = np.empty((len(rows), *block.shape[1:]), dtype=np.float32)
            sel = shard == j
            out[sel] = block[rows[sel] - int(j) * self.shard_rows]
        if out is None:  # no rows
            out = np.empty((0, *block_of(0, 0).shape[1:]), dtype=np.float32)
        return out

    def read_members(self, start: int, stop: int, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """Rows [start, stop) of an ensemble store's member logits (n, V, M, C); NaN where not queried.

        dtype as in `read_block` (None: the stored dtype, what the loader reads per shard).
        """
        if not self.member_names:
            raise StoreError(f"{self.path} holds no member logits (not an ensemble store kept with keep_members)")
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n}) of {self.path}/{self.split}")
        block = self.read_array("members", start, stop)  # (n, V, M, C)
        self.check_values("members", start, block)
        return block if dtype is None else block.astype(dtype, copy=False)

    def read_member_rows(self, rows: np.ndarray, cache_shards: int = 4) -> np.ndarray:
        """Random rows (B,) -> member logits (B, V, M, C) float32 (whole-shard reads, as `read_rows`)."""
        return self._gather(rows, cache_shards, self._member_cache, lambda a, b: self.read_members(a, b, dtype=None))

    def read_all(self) -> np.ndarray:
        return self.read_block(0, self.n)
