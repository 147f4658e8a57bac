"""`kdcache import-logits`: a logit store from logits computed elsewhere (e.g. a teacher behind an API).

Accepted files, one per split, rows in the manifest's index order unless keys say otherwise:
- `.npy`: (N, C) or (N, V, C) float array;
- `.npz`: array `logits` of that shape, optional `keys` (N,) (sample keys or integer indices);
- `.parquet`: a key column and a logits column (list of C floats per row; or of V*C, reshaped).

Rules for the values: a row (one sample-view) that is all NaN counts as *not queried* (a budget-limited
teacher); any Inf (an overflow), or NaN mixed with numbers, is an error naming the file, the row and
the sample key. A split with no queried row at all is an error unless `--allow-empty` says it is meant.
Pickled `.npy`/`.npz` files are refused (loading them could run code). The result has the same schema
and attributes as a store written by `teach`, so every downstream stage treats it the same; the
teacher's identity is the files' sha256. The import holds the store's writer lock.

Imported logits are checked like imported checkpoints (`pipeline.models.sanity`): the teacher's top-1 against the
labels of every split imported; near chance (a class order or an input normalisation that is not the data set's)
is an error naming the likely causes, and the class permutation that would agree far better when there is one;
`--accept-low-accuracy` imports it anyway. The test split is required (students are evaluated against it) unless
`--without-test` says it is meant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline.cache.store import StoreError, StoreWriter
from pipeline.cache.teach import build_spec
from pipeline.data.shards import Manifest, load_manifest, sample_key, sha256_file
from pipeline.data.views import PadCropFlip, ViewRecipe
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.lock import exclusive
from pipeline.models.sanity import confusion, near_chance, permutation_hint

log = logging.getLogger(__name__)


def read_logits_file(
    path: Path, key_column: str = "key", logits_column: str = "logits"
) -> tuple[np.ndarray, list | None]:
    """Load (logits, keys or None) from .npy / .npz / .parquet."""
    if not path.exists():
        raise FileNotFoundError(f"logits file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            return _read_numpy(path, suffix)
        except ValueError as e:  # numpy's own errors: pickled objects, a bad header, a truncated file
            if isinstance(e, StoreError):
                raise
            if "allow_pickle" in str(e):
                raise StoreError(
                    f"{path} holds pickled Python objects, not a numeric array; kdcache never unpickles input "
                    "files: save a float array, e.g. np.save(path, logits.astype('float32'))"
                ) from e
            raise StoreError(f"{path}: not a readable {suffix} file ({e})") from e
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 (pyarrow's ArrowInvalid/OSError for a truncated or foreign file)
            raise StoreError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from e
        missing = [c for c in (key_column, logits_column) if c not in table.column_names]
        if missing:
            raise StoreError(
                f"{path}: missing column(s) {missing}; columns: {table.column_names} "
                "(set --key-column / --logits-column)"
            )
        keys = table.column(key_column).to_pylist()
        rows = table.column(logits_column).to_pylist()
        lengths = {len(r) if r is not None else -1 for r in rows}
        if len(lengths) != 1 or -1 in lengths:
            raise StoreError(f"{path}: logits rows have different lengths {sorted(lengths)[:5]}; expected one C")
        return np.asarray(rows, dtype=np.float32), keys
    raise StoreError(f"{path}: unsupported logits file type '{suffix}'; use .npy, .npz or .parquet")


def _read_numpy(path: Path, suffix: str) -> tuple[np.ndarray, list | None]:
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as z:
        if "logits" not in z:
            raise StoreError(f"{path}: .npz needs an array named 'logits' (found {sorted(z.files)})")
        return z["logits"], (z["keys"].tolist() if "keys" in z else None)


def check_values(logits: np.ndarray, keys: list | None, path: Path) -> None:
    """The import rules on (N, V, C) logits in file order: a row (sample-view) is all NaN or all finite.

    An all-NaN row is a sample-view the teacher was not asked (budget); Inf anywhere is an overflow and
    NaN mixed with numbers a broken row: both are errors naming the file, the row and the sample key.
    """
    nan = np.isnan(logits)  # (N, V, C)
    bad = ~np.isfinite(logits).all(-1) & ~nan.all(-1)  # (N, V): not all NaN, yet not all finite
    if bad.any():
        r, v = (int(x) for x in np.argwhere(bad)[0])
        key = keys[r] if keys is not None else sample_key(r)
        what = "Inf (an overflow)" if np.isinf(logits[r, v]).any() else "NaN mixed with numbers"
        view = f", view {v}" if logits.shape[1] > 1 else ""
        raise StoreError(
            f"{path}: row {r} (key {key}{view}) holds {what}; {int(bad.sum())} row(s) like it. A row is either all "
            "NaN (not queried) or all finite logits"
        )


def align(
    logits: np.ndarray, keys: list | None, manifest: Manifest, split: str, views: int | None, path: Path
) -> np.ndarray:
    """Validate against the manifest and return (N, V, C) float32 in index order."""
    n, c = manifest.split(split).n, manifest.num_classes
    if not np.issubdtype(logits.dtype, np.floating):
        raise StoreError(f"{path}: logits dtype {logits.dtype} is not floating point")
    if logits.ndim == 2 and views and views > 1:
        if logits.shape[1] != views * c:
            raise StoreError(f"{path}: rows of {logits.shape[1]} values, expected V*C = {views}*{c}")
        logits = logits.reshape(len(logits), views, c)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    if logits.ndim != 3 or logits.shape[2] != c:
        raise StoreError(f"{path}: logits shape {logits.shape}, expected (N, C) or (N, V, C) with N={n}, C={c}")
    if len(logits) != n:
        raise StoreError(f"{path}: {len(logits)} rows but split '{split}' of {manifest.root} has N={n}")
    check_values(logits, keys, path)  # before reordering: the error names the file's own row
    if keys is not None:
        try:
            idx = np.array([int(k) for k in keys])
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path}: keys must be sample keys like '00000042' or integer indices ({e})") from e
        if sorted(idx.tolist()) != list(range(n)):
            bad = sorted(set(range(n)) - set(idx.tolist()))[:5]
            raise StoreError(
                f"{path}: keys do not cover the split's samples exactly (missing e.g. {[sample_key(b) for b in bad]})"
            )
        out = np.empty_like(logits)
        out[idx] = logits
        logits = out
    return logits.astype(np.float32)


def import_logits(
    files: dict[str, Path],
    manifest: Manifest,
    out: Path,
    name: str,
    *,
    views_recipe: ViewRecipe | None = None,
    dtype: str = "float16",
    topk: int = 0,
    force: bool = False,
    key_column: str = "key",
    logits_column: str = "logits",
    allow_empty: bool = False,
    without_test: bool = False,
    accept_low_accuracy: bool = False,
) -> Path:
    """Build the store at `out` from logits files (one per split); see the module doc for formats and rules.

    `allow_empty`: accept a split in which no sample-view was queried (all NaN); otherwise an error.
    `without_test`: accept files without the test split. `accept_low_accuracy`: import a teacher near chance.
    """
    if "test" not in files and "test" in manifest.splits and not without_test:
        raise StoreError(
            f"no logits for the test split (given: {sorted(files)}): students are evaluated against the teacher on "
            "it. Add --logits test=FILE, or pass --without-test if the store is meant without it"
        )
    with exclusive(out, f"logit store {out}"):
        arrays = {}
        for split, path in files.items():
            logits, keys = read_logits_file(path, key_column, logits_column)
            arrays[split] = align(logits, keys, manifest, split, views_recipe.views if views_recipe else None, path)
            if not allow_empty and np.isnan(arrays[split]).all():
                raise StoreError(
                    f"{path}: every row of split '{split}' is NaN, i.e. the teacher answered none of its samples; "
                    "pass --allow-empty if that is meant"
                )
        check_teacher(arrays, manifest, files, accept_low_accuracy)
        recipes = {}
        for split, arr in arrays.items():
            v = arr.shape[1]
            base = views_recipe or PadCropFlip(views=1)
            if v > 1 and views_recipe is None:
                raise StoreError(
                    f"{files[split]} has {v} views: pass --view-seed/--pad/--flip saying how they were made"
                )
            recipes[split] = dataclasses.replace(base, views=v)  # type: ignore[type-var]
        digest = "+".join(sha256_file(files[s])[:16] for s in sorted(files))
        teacher = {
            "name": name,
            "arch": "external",
            "weights_sha256": digest,
            "source": {s: str(p) for s, p in files.items()},
        }
        spec = build_spec(
            manifest,
            teacher,
            recipes,
            dtype=dtype,
            topk=topk,
            compressor="blosc-zstd",
            chunk_rows=1000,
        )
        spec = dataclasses.replace(spec, extra={"budget": {"n": None, "imported": True}})
        writer = StoreWriter(out, spec, force=force)
        for split, arr in arrays.items():
            s = spec.splits[split]
            for j in writer.pending(split):
                start, stop = s.shard_range(j)
                block = arr[start:stop]  # (n, V, C), checked by `check_values`: each row all NaN or all finite
                writer.write_shard(split, j, block, ~np.isnan(block).all(-1))
        return writer.finalize({"imported_from": {s: str(p) for s, p in files.items()}})


def check_teacher(
    arrays: dict[str, np.ndarray], manifest: Manifest, files: dict[str, Path], accept: bool = False
) -> dict[str, float]:
    """The teacher's top-1 (view 0 of its queried rows) on each imported split; near chance is an error unless
    `accept`. Returns {split: top-1}."""
    top1 = {}
    for split, arr in arrays.items():
        rows = ~np.isnan(arr[:, 0]).all(-1)  # (N,) view 0 queried
        if not rows.any():
            continue
        labels = manifest.iter_labels(split)[rows]
        pred = arr[rows, 0].argmax(-1)
        top1[split] = acc = float((pred == labels).mean())
        log.info("imported teacher: top-1 %.2f%% on %d labelled %s rows", 100 * acc, len(labels), split)
        c = manifest.num_classes
        if not near_chance(acc, c):
            continue
        msg = (
            f"{files[split]}: the imported teacher reaches {acc:.1%} top-1 on the {len(labels)} labelled {split} "
            f"rows, near chance ({1 / c:.1%} for {c} classes): its logits do not match this data set. Likely causes: "
            f"(1) another class order: column i must be class {list(manifest.classes)[:10]}[i]"
            f"{' ...' if c > 10 else ''} of {manifest.root}; (2) rows in another order than the manifest's "
            f"(give sample keys); (3) another input normalisation for the teacher"
            f"{permutation_hint(confusion(pred, labels, c), acc)}. Pass --accept-low-accuracy to import it anyway"
        )
        if not accept:
            raise StoreError(msg)
        log.warning(msg)
    return top1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-logits",
        help="build a logit store from .npy/.npz/.parquet logits computed elsewhere",
        description=__doc__,
    )
    p.add_argument(
        "--logits",
        action="append",
        required=True,
        metavar="SPLIT=FILE",
        help="logits of one split, e.g. --logits train=t.npy --logits test=s.npy",
    )
    p.add_argument("--shards", required=True, help="prepared data set folder (its manifest is checked)")
    p.add_argument("--name", required=True, help="teacher name; store goes to data/logits/<name>.zarr")
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--view-seed", type=int, default=None, help="for V > 1: the views' seed (pipeline.data.views)")
    p.add_argument("--pad", type=int, default=4)
    p.add_argument("--flip", type=int, default=1)
    p.add_argument("--key-column", default="key")
    p.add_argument("--logits-column", default="logits")
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.add_argument("--allow-empty", action="store_true", help="accept a split whose rows are all NaN (nothing queried)")
    p.add_argument("--without-test", action="store_true", help="accept logits without the test split")
    p.add_argument(
        "--accept-low-accuracy", action="store_true", help="import a teacher whose top-1 is near chance anyway"
    )
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from pipeline.runtime import setup_logging

    setup_logging()
    files = {}
    for item in args.logits:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise UserError(f"--logits expects SPLIT=FILE, e.g. --logits train=train.npy; got '{item}'")
        files[split] = Path(path)
    manifest = load_manifest(args.shards)
    recipe = None
    if args.view_seed is not None:
        recipe = PadCropFlip(views=1, seed=args.view_seed, pad=args.pad, flip=bool(args.flip))
    out = Path(args.out or Layout(manifest.dataset).store(args.name))
    import_logits(
        files,
        manifest,
        out,
        args.name,
        views_recipe=recipe,
        dtype=args.dtype,
        topk=args.topk,
        force=args.force,
        key_column=args.key_column,
        logits_column=args.logits_column,
        allow_empty=args.allow_empty,
        without_test=args.without_test,
        accept_low_accuracy=args.accept_low_accuracy,
    )
    print(f"wrote {out}")
    return 0
