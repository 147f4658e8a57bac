"""Hugging Face ``datasets`` as a source: ``Dataset``/``DatasetDict.save_to_disk`` folders and Parquet files.

``prepare.source: hf`` with ``prepare.root`` one of

- a folder written by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one folder per split) or by
  ``Dataset.save_to_disk`` (one split: ``Dataset.split`` if it recorded one, else ``train``);
- Parquet files: one ``.parquet`` file, or a folder of them whose splits come from the file names by the Hub's
  conventions (``train-00000-of-00002.parquet``, ``test.parquet``, ``data/validation/...``; what
  ``load_dataset("parquet", data_dir=root)`` would find), e.g. a Hub snapshot.

A split is *streamed* (:class:`HFStream`): rows are fetched in windows of at most ``window_mb`` (default 64) MB of
stored bytes and decoded one image at a time while the shards are written, so memory holds a window, never the split.
``save_to_disk`` folders are memory-mapped Arrow, so any row order costs nothing extra; Parquet is read by row
group, so a shuffled order (``prepare.shuffle_seed``) reads each row group once per window that needs it (the
whole split per ~64 MB of images: set ``shuffle_seed: null`` for an already shuffled, very large Parquet set, or
``save_to_disk`` it first).

Labels come from an integer column; class names from its ``ClassLabel`` feature when it has one (else ``"0"``,
``"1"``, ... up to the largest label of any split). Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sources.base import Entry, OptionError, SplitData, check_choice, check_resize, decode_entry
from pipeline.errors import InputError

log = logging.getLogger(__name__)

#: Default of ``window_mb``: most stored MB one window of rows may hold (what a streamed split keeps in memory).
WINDOW_MB = 64.0
_PARQUET = ".parquet"


def _fix(option: str, example: str) -> str:
    return f"Set prepare.options.{option} in params.yaml (e.g. {option}: {example})"


@dataclass
class _Rows:
    """One split of the dataset as rows addressable by index: ``take(sorted rows, columns) -> pyarrow.Table``."""

    location: str  # for messages
    split: str  # the dataset's name of the split
    num_rows: int
    features: Any  # datasets.Features
    bytes_per_row: float
    take: Callable[[np.ndarray, Sequence[str]], Any]
    read_column: Callable[[str], Any]  # the whole of one (small) column, e.g. the labels, as a pyarrow array


def _arrow_rows(ds: Any, location: str, split: str) -> _Rows:
    """A ``save_to_disk`` split: memory-mapped Arrow, so taking rows in any order only copies those rows."""
    table = ds.with_format("arrow")

    def take(rows: np.ndarray, columns: Sequence[str]) -> Any:
        return table.select_columns(list(columns))[rows.tolist()]

    def read_column(name: str) -> Any:
        return table.select_columns([name])[:].column(0).combine_chunks()

    n = ds.num_rows
    return _Rows(location, split, n, ds.features, ds.data.nbytes / max(n, 1), take, read_column)


def _parquet_rows(files: Sequence[Path], location: str, split: str) -> _Rows:
    """Parquet files of one split, read a row group at a time (the last one read is kept for the next window)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    handles = [pq.ParquetFile(f) for f in files]
    groups = [(h, g) for h in handles for g in range(h.metadata.num_row_groups)]  # in row order
    sizes = [h.metadata.row_group(g).num_rows for h, g in groups]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (G + 1,)
    stored = sum(h.metadata.row_group(g).total_byte_size for h, g in groups)
    schema = handles[0].schema_arrow
    for f, h in zip(files, handles, strict=True):
        if not h.schema_arrow.equals(schema, check_metadata=False):
            raise InputError(f"{f}: its columns {h.schema_arrow.names} differ from {files[0]}'s {schema.names}")
    cache: dict[tuple[int, tuple[str, ...]], Any] = {}

    def take(rows: np.ndarray, columns: Sequence[str]) -> Any:
        which = np.searchsorted(starts, rows, side="right") - 1  # (n,) row group of each row
        parts = []
        for g in np.unique(which):
            key = (int(g), tuple(columns))
            if key not in cache:
                cache.clear()  # one row group in memory at a time
                h, rg = groups[g]
                cache[key] = h.read_row_group(rg, columns=list(columns))
            local = rows[which == g] - starts[g]
            parts.append(cache[key].take(pa.array(local)))
        return pa.concat_tables(parts) if parts else schema.empty_table().select(list(columns))

    def read_column(name: str) -> Any:
        return pa.chunked_array([h.read(columns=[name]).column(0) for h in handles]).combine_chunks()

    n = int(starts[-1])
    return _Rows(location, split, n, Features.from_arrow_schema(schema), stored / max(n, 1), take, read_column)


def _parquet_splits(root: Path) -> dict[str, list[Path]]:
    """Split name -> Parquet files, by the Hub's file-naming conventions (as ``load_dataset("parquet")`` finds them)."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    base = root.parent if root.is_file() else root
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(base)), base_path=str(base))
    except EmptyDatasetError:  # a folder without any file
        return {}
    splits = {str(name): sorted(Path(f) for f in files if f.endswith(_PARQUET)) for name, files in found.items()}
    if root.is_file():  # one file: the split its name says (e.g. test-00000-of-00001.parquet), else train
        mine = [name for name, files in splits.items() if root.resolve() in {f.resolve() for f in files}]
        return {mine[0] if mine else "train": [root]}
    return {name: files for name, files in splits.items() if files}


def _open_rows(root: Path) -> dict[str, Callable[[], _Rows]]:
    """Split name -> a function opening it, for whatever ``root`` is (see the module docstring)."""
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: no such folder or file; set prepare.root to a `save_to_disk` folder or to Parquet files"
        )
    if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
        import datasets

        loaded = datasets.load_from_disk(str(root))  # memory-mapped: nothing is read yet
        if isinstance(loaded, datasets.DatasetDict):
            return {
                name: (lambda ds=ds, name=name: _arrow_rows(ds, f"{root}/{name}", name)) for name, ds in loaded.items()
            }
        name = str(loaded.split) if loaded.split is not None else "train"
        return {name: lambda: _arrow_rows(loaded, str(root), name)}
    if root.is_file() and root.suffix != _PARQUET:
        raise InputError(f"{root}: not a Parquet file; set prepare.root to a `save_to_disk` folder or to Parquet files")
    splits = _parquet_splits(root)
    if not splits:
        raise FileNotFoundError(
            f"{root}: neither a `save_to_disk` folder (dataset_dict.json or state.json) nor a folder of "
            f"{_PARQUET} files; write the dataset with DatasetDict.save_to_disk(...) or Dataset.to_parquet(...)"
        )
    return {
        name: (lambda files=files, name=name: _parquet_rows(files, f"{root} ({name})", name))
        for name, files in splits.items()
    }


def _resolve_split(available: Sequence[str], split: str, split_names: dict[str, str] | None, root: Path) -> str:
    """The dataset's split that serves kdcache's ``split``: ``split_names`` first, then the same name, then for
    ``test`` the dataset's ``validation`` split (as ImageFolders fall back to ``val/``)."""
    if split_names is not None and not isinstance(split_names, dict):
        raise OptionError(
            f"option split_names={split_names!r} is invalid; expected a mapping such as {{test: validation}}"
        )
    wanted = (split_names or {}).get(split, split)
    if wanted in available:
        return wanted
    if split == "test" and split not in (split_names or {}) and "validation" in available:
        log.info("%s has no test split: using validation as the test split", root)
        return "validation"
    others = sorted(set(available) - {"train"}) if split != "train" else sorted(available)
    fix = (
        _fix("split_names", f"{{{split}: {others[0]}}}")
        if others
        else f"Save the dataset with a {split} split (DatasetDict({{..., {split!r}: ...}}).save_to_disk(root)), or "
        "leave it out of prepare.splits"
    )
    raise InputError(
        f"{root}: no split {wanted!r} for kdcache's {split!r} split; the dataset's splits: {sorted(available)}. {fix}"
    )


def _feature_type(features: Any, name: str) -> str:
    feature = features.get(name)
    return type(feature).__name__ if feature is not None else "?"


def _pick_column(features: Any, rows: _Rows, kind: str, wanted: str | None, auto: Callable[[Any], bool]) -> str:
    """``wanted`` if the split has it, else the one column ``auto`` accepts; errors list the columns and the option."""
    option, example = f"{kind}_column", "img" if kind == "image" else "label"
    columns = {c: _feature_type(features, c) for c in features}
    if wanted is not None:
        if wanted not in features:
            raise InputError(
                f"{rows.location}: no column {wanted!r} (option {option}); columns: {columns}. "
                + _fix(option, next((c for c in features if auto(features[c])), example))
            )
        return wanted
    hits = [c for c in features if auto(features[c])]
    if kind == "label" and not hits and "label" in features:
        hits = ["label"]
    if len(hits) != 1:
        found = f"{len(hits)} candidate {kind} columns {hits}" if hits else f"no {kind} column"
        raise InputError(f"{rows.location}: {found} among {columns}; " + _fix(option, hits[0] if hits else example))
    return hits[0]


def _is_image(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _is_classlabel(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel)


def _labels(rows: _Rows, column: str) -> np.ndarray:
    """(N,) int64 labels of a split; a non-integer column is an error naming it and how to encode it."""
    import pyarrow as pa

    arr = rows.read_column(column)
    if not pa.types.is_integer(arr.type):
        kind = _feature_type(rows.features, column)
        encode = f"ds = ds.class_encode_column({column!r}); ds.save_to_disk(...)"
        raise InputError(
            f"{rows.location}: label column {column!r} holds {arr.type} values ({kind}), not integer class ids. "
            f"Encode it once ({encode}) or " + _fix("label_column", "<an integer or ClassLabel column>")
        )
    if arr.null_count:
        raise InputError(f"{rows.location}: label column {column!r} has {arr.null_count} missing (null) labels")
    labels = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    if labels.size and labels.min() < 0:
        first = int(np.flatnonzero(labels < 0)[0])
        raise InputError(
            f"{rows.location}: label column {column!r} has label {int(labels[first])} at row {first} (Hugging Face "
            "marks unlabelled rows with -1): kdcache needs labelled rows; map this split to a labelled one with "
            "prepare.options.split_names"
        )
    return labels


@dataclass
class HFStream:
    """One split of a Hugging Face dataset as a stream of decoded ``(image (H, W, C) uint8, label)`` pairs.

    The streamed counterpart of :class:`~pipeline.data.sources.imagefolder.SplitStream` (same
    ``permute``/``__iter__``/``len`` contract, so ``prepare`` shards both alike): rows are fetched a window at a
    time, in ``order``.
    """

    classes: list[str]
    rows: _Rows
    image_column: str
    labels: np.ndarray  # (N,) int64, read (and checked) when the split is opened
    mode: str | None
    resize: int | None
    order: np.ndarray | None = None  # (N,) row order; None: the dataset's
    window_bytes: int = int(WINDOW_MB * 2**20)
    location: str = field(init=False)

    def __post_init__(self) -> None:
        self.location = self.rows.location
        feature = self.rows.features.get(self.image_column)
        if self.mode is None and _is_image(feature) and feature.mode in ("RGB", "L"):
            self.mode = feature.mode  # the dataset says what its images are

    def __len__(self) -> int:
        return self.rows.num_rows if self.order is None else len(self.order)

    def _rows_in_order(self) -> np.ndarray:
        return np.arange(self.rows.num_rows) if self.order is None else self.order

    def permute(self, seed: int) -> None:
        """Reorder by ``default_rng(seed).permutation`` (the same order an ImageFolder of the same rows would get)."""
        self.order = self._rows_in_order()[np.random.default_rng(seed).permutation(len(self))]

    def split_labels(self) -> np.ndarray:
        """(len,) int64 labels of the stream's rows, in its order (no decoding)."""
        return self.labels[self._rows_in_order()]

    def subset(self, index: np.ndarray) -> HFStream:
        """The stream's rows at `index` (positions in its order), in that order; nothing decoded."""
        return dataclasses.replace(self, order=self._rows_in_order()[np.asarray(index, dtype=np.int64)])

    def window_rows(self) -> int:
        """Rows per fetch: as many as fit in :attr:`window_bytes` of stored bytes (at least one)."""
        return max(1, min(len(self), int(self.window_bytes // max(self.rows.bytes_per_row, 1.0))))

    def _image(self, value: Any, row: int) -> np.ndarray:
        """One stored image -> (H, W) or (H, W, 3) uint8: an Image feature's {bytes, path}, or raw encoded bytes."""
        name = f"{self.location}[{row}].{self.image_column}"
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        else:
            kind = _feature_type(self.rows.features, self.image_column)
            raise InputError(
                f"{self.location}: column {self.image_column!r} ({kind}) does not hold images (row {row} is a "
                f"{type(value).__name__}); " + _fix("image_column", "<the column of Image feature>")
            )
        if data is None and (not path or not Path(path).is_file()):
            raise FileNotFoundError(f"{name}: the image has no bytes and its path {path!r} does not exist")
        # ImageFolder's decoder: same mode / resize semantics
        entry = Entry(int(self.labels[row]), name, ("", ""), path=None if data else Path(path), data=data)
        try:
            return decode_entry(entry, self.mode, self.resize)
        except Exception as e:  # Pillow raises many types
            raise InputError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        order = self.order if self.order is not None else np.arange(len(self))
        step = self.window_rows()
        first: tuple[int, int] | None = None  # (row, ndim) of the first image when the mode is inferred
        for start in range(0, len(order), step):
            want = order[start : start + step]  # (w,) rows in output order
            rows = np.sort(want)
            values = self.rows.take(rows, [self.image_column]).column(0).to_pylist()
            for row in want.tolist():
                arr = self._image(values[int(np.searchsorted(rows, row))], row)
                if self.mode is None:  # every image decoded as it is: they must agree on gray vs colour
                    if first is None:
                        first = (row, arr.ndim)
                    elif arr.ndim != first[1]:
                        kinds = {2: "grayscale", 3: "colour"}
                        raise InputError(
                            f"{self.location}: row {row} of column {self.image_column!r} is {kinds[arr.ndim]} but row "
                            f"{first[0]} is {kinds[first[1]]}; " + _fix("mode", "RGB")
                        )
                yield (arr[..., None] if arr.ndim == 2 else arr), int(self.labels[row])
            del values


def open_hf_split(
    root: Path,
    split: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    split_names: dict[str, str] | None = None,
    mode: str | None = None,
    resize: int | None = None,
    window_mb: float = WINDOW_MB,
) -> HFStream:
    """Open one split of a Hugging Face dataset at ``root`` for streaming (see the module docstring).

    Args:
        image_column: the column of images (an ``Image`` feature, or encoded image bytes); default: the one
            ``Image`` column.
        label_column: the column of integer labels; default: the one ``ClassLabel`` column, else ``label``.
        split_names: kdcache split -> the dataset's split, e.g. ``{test: validation}`` (default: the same names;
            ``test`` falls back to ``validation``).
        mode: ``"RGB"``, ``"L"`` or ``None`` (the Image feature's mode, else as stored: all images must agree).
        resize: resize every image to ``resize x resize`` (needed when sizes differ).
        window_mb: stored megabytes fetched at a time: the memory the stream holds (about twice this, with the
            decoded copies), and for a shuffled Parquet split the read cost (every window reads the row groups
            holding its rows). Any value gives the same shards.
    """
    check_choice("mode", mode, ("RGB", "L", None))
    check_resize(resize)
    if isinstance(window_mb, bool) or not isinstance(window_mb, (int, float)) or window_mb <= 0:
        raise OptionError(f"option window_mb={window_mb!r} is invalid; expected a positive number of megabytes")
    openers = _open_rows(Path(root))
    rows = openers[_resolve_split(list(openers), split, split_names, Path(root))]()
    features = rows.features
    image = _pick_column(features, rows, "image", image_column, _is_image)
    label = _pick_column(features, rows, "label", label_column, _is_classlabel)
    labels = _labels(rows, label)
    if _is_classlabel(features[label]):
        classes = list(features[label].names)
    else:  # plain integers: the class count must not depend on which split is read, so look at every split
        top = max(int(lab.max()) for lab in (_labels(open_(), label) for open_ in openers.values()) if lab.size)
        classes = [str(k) for k in range(top + 1)]
    if labels.size and labels.max() >= len(classes):
        raise InputError(
            f"{rows.location}: label column {label!r} has label {int(labels.max())} but its ClassLabel names "
            f"{len(classes)} classes"
        )
    log.info("%s: %d rows, image column %r, label column %r, %d classes", rows.location, rows.num_rows, image,
                label, len(classes))  # fmt: skip
    return HFStream(classes, rows, image, labels, mode, resize, window_bytes=int(window_mb * 2**20))


def load_hf_split(root: Path, split: str, **options: Any) -> SplitData:
    """:func:`open_hf_split`, decoded into memory (tests, small data sets; ``prepare`` streams instead)."""
    stream = open_hf_split(root, split, **options)
    pairs = list(stream)
    if not pairs:
        raise InputError(f"{stream.location}: the split has no rows")
    images = np.stack([img for img, _ in pairs])
    return SplitData(images, np.asarray([y for _, y in pairs], dtype=np.int64), stream.classes, [stream.location])
