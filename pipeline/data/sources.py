"""Data set readers: one split of a data set -> a :class:`SplitData` of uint8 images and int64 labels.

Sources (the keys of :data:`SOURCES`, used by the ``prepare`` stage via :func:`load_split`):

- ``fashion_mnist`` / ``mnist``: the IDX files of LeCun et al. (``train-images-idx3-ubyte[.gz]``, ...),
  gzip-compressed or raw; Fashion-MNIST (Xiao et al., 2017) ships in Debian's ``dataset-fashion-mnist``.
- ``cifar10`` / ``cifar100``: Krizhevsky's python-pickle layout as torchvision downloads it
  (``cifar-10-batches-py/``, ``cifar-100-python/``); ``download=True`` fetches it with torchvision.
- ``imagefolder``: ``root/{train,test|val}/<class>/<image>`` in any Pillow-readable format, either a
  directory or a ``.tar[.gz|.bz2|.xz]`` archive of one, read in one streaming pass without extracting.
- ``hf``: a Hugging Face ``datasets`` dataset on disk: a ``Dataset``/``DatasetDict.save_to_disk`` folder or
  Parquet files (:mod:`pipeline.data.hf`), with options for the image and label columns and the split names.
- ``synthetic``: small deterministic, learnable images for tests and demos.

``imagefolder`` and ``hf`` also open as streams (:data:`STREAMED`), which ``prepare`` shards while decoding.

Every reader takes ``(root, split, *, <its options>)``; options are keyword-only so a misspelt option
is a ``TypeError`` (:class:`OptionError`) naming the valid ones instead of being silently ignored. Bad
options and sources are :class:`~pipeline.config.ConfigError`; unreadable or malformed files are
:class:`~pipeline.errors.InputError` (both ValueErrors, and user errors: one clean line at the command line).
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import io
import logging
import os
import pickle
import posixpath
import struct
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.hf import load_hf_split, open_hf_split
from pipeline.errors import InputError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")

#: Where a source's files live when the user installed them the documented way.
DEFAULT_ROOTS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}


class OptionError(ConfigError, TypeError):
    """An option (`prepare.options`) the source does not take: a ConfigError, and a TypeError like a bad keyword."""


FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays field-wise would raise, identity is what we want
class SplitData:
    """One split of a data set, fully decoded in memory.

    Attributes:
        images: ``(N, H, W, C)`` uint8, ``C`` in {1, 3}.
        labels: ``(N,)`` int64 in ``[0, len(classes))``.
        classes: class names; ``classes[label]`` names a label.
        source_files: where the data came from, for error messages and provenance: the IDX / pickle
            files read, or for ``imagefolder`` one entry per image aligned with ``labels``
            (``path`` or ``archive.tar.gz::member``).
        skipped: images dropped as undecodable (``on_corrupt="skip"``); always 0 otherwise.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source_files: list[str] = field(default_factory=list)
    skipped: int = 0

    def subset(self, index: np.ndarray) -> SplitData:
        """The images at `index`, in that order."""
        files = [self.source_files[i] for i in index] if len(self.source_files) == len(self.labels) else []
        return SplitData(self.images[index], self.labels[index], self.classes, files or list(self.source_files))

    def __post_init__(self) -> None:
        # Validate once here so every consumer (shards, views, store) can trust shapes and dtypes.
        im, lb = self.images, self.labels
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] not in (1, 3):
            desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"SplitData.images must be a uint8 array (N, H, W, C) with C in {{1, 3}}, got {desc}")
        if not isinstance(lb, np.ndarray) or lb.dtype != np.int64 or lb.shape != (im.shape[0],):
            desc = f"{lb.dtype} {lb.shape}" if isinstance(lb, np.ndarray) else type(lb).__name__
            raise ValueError(f"SplitData.labels must be int64 of shape ({im.shape[0]},), got {desc}")
        if lb.size and (lb.min() < 0 or lb.max() >= len(self.classes)):
            raise ValueError(
                f"SplitData.labels span [{lb.min()}, {lb.max()}] but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_split(source: str, split: str, valid: tuple[str, ...] = SPLITS) -> None:
    if split not in valid:
        raise ConfigError(f"source {source!r} has no split {split!r}; valid splits: {list(valid)}")


def _check_choice(name: str, value: object, valid: tuple[object, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"option {name}={value!r} is invalid; valid values: {list(valid)}")


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

# IDX type codes (third magic byte) -> numpy dtype; multi-byte types are big-endian by the format's spec.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes_maybe_gzip(path: Path) -> bytes:
    """File contents, gunzipped if the file starts with the gzip magic (extensions lie; magic bytes don't)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a truncated stream raises EOFError
        raise InputError(f"{path}: corrupt or truncated gzip file ({e}); re-download or reinstall it") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or raw) into an array of the shape and dtype its header declares.

    Header: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes.
    The payload length must match the sizes exactly, which catches truncated downloads.
    """
    path = Path(path)
    raw = _read_bytes_maybe_gzip(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise InputError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'none'}; expected 0000 + a type code in "
            f"{[hex(c) for c in _IDX_DTYPES]} + ndim)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: IDX header declares {ndim} dims but the file ends after {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            f"{path}: IDX header declares shape {tuple(dims)} ({expected} bytes) but the file holds {len(raw)} "
            "bytes; it is truncated or corrupt: re-download it"
        )
    # frombuffer over bytes is read-only; copy so callers may modify the arrays in place.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).copy()


_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip


def _find_idx_file(root: Path, stem: str, torchvision_dir: str) -> Path | None:
    """Find ``stem`` (.gz or raw) in ``root`` or torchvision's ``<root>/<Name>/raw`` layout.

    Also accepts the ``t10k-images.idx3-ubyte`` spelling used by some mirrors (e.g. Kaggle).
    """
    names = (stem, stem.replace("-idx", ".idx"))
    for folder in (root, root / "raw", root / torchvision_dir / "raw"):
        for name in names:
            for suffix in (".gz", ""):
                candidate = folder / (name + suffix)
                if candidate.is_file():
                    return candidate
    return None


def _load_idx_split(source: str, root: Path, split: str, classes: list[str], fix: str, tv_dir: str) -> SplitData:
    _check_split(source, split)
    stems = _IDX_STEMS[split]
    found = {stem: _find_idx_file(root, stem, tv_dir) for stem in stems}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"{source}: missing IDX file(s) {', '.join(s + '[.gz]' for s in missing)} in {root}. {fix}"
        )
    img_path, lbl_path = found[stems[0]], found[stems[1]]
    assert img_path is not None and lbl_path is not None  # for type checkers: ensured just above
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(f"{img_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise InputError(f"{lbl_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise InputError(
            f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels; "
            "the pair is mismatched or one file is from another data set"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"{lbl_path}: labels span [{labels.min()}, {labels.max()}], expected [0, {len(classes)})")
    return SplitData(images[..., None], labels, list(classes), [str(img_path), str(lbl_path)])


def load_fashion_mnist(root: Path, split: str) -> SplitData:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 28x28 grayscale, 10 classes, IDX files in ``root``."""
    fix = (
        "Install them with `apt-get install dataset-fashion-mnist` (puts the four .gz files in "
        f"{DEFAULT_ROOTS['fashion_mnist']}), or set `prepare.root` in params.yaml to a folder holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz."
    )
    return _load_idx_split("fashion_mnist", root, split, FASHION_MNIST_CLASSES, fix, "FashionMNIST")


def load_mnist(root: Path, split: str) -> SplitData:
    """MNIST (LeCun et al., 1998): 28x28 grayscale digits, IDX files in ``root``."""
    fix = (
        "Download the four IDX files (e.g. with torchvision.datasets.MNIST(root, download=True), which puts them in "
        "<root>/MNIST/raw) and set `prepare.root` in params.yaml to their folder."
    )
    return _load_idx_split("mnist", root, split, [str(d) for d in range(10)], fix, "MNIST")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)
# --------------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR pickle needs (numpy arrays).

    A pickle can run arbitrary code on load; CIFAR batches hold nothing but dicts, lists, bytes and
    numpy arrays, so refusing every other global costs nothing and makes loading a stray file safe.
    """

    _ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a CIFAR pickle holds only arrays")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path, expected: list[str]) -> dict[str, Any]:
    """Load a CIFAR pickle as a dict with str keys, checking that ``expected`` keys are present."""
    try:
        with open(path, "rb") as f:
            # The original files are Python 2 pickles: encoding="bytes" keeps their str keys/values as bytes.
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise InputError(f"{path}: not a readable CIFAR pickle ({e}); re-download the data set") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    out = {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    absent = [k for k in expected if k not in out]
    if absent:
        raise InputError(
            f"{path}: pickle lacks key(s) {absent}; found keys {sorted(out)}, expected {expected} "
            "(is this the CIFAR python version, and the right one of CIFAR-10/CIFAR-100?)"
        )
    return out


@dataclass(frozen=True)
class _CifarLayout:
    name: str
    folder: str
    files: dict[str, list[str]]
    meta: str
    url: str


_CIFAR10 = _CifarLayout(
    "cifar10", "cifar-10-batches-py",
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "batches.meta", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)  # fmt: skip
_CIFAR100 = _CifarLayout(
    "cifar100", "cifar-100-python", {"train": ["train"], "test": ["test"]},
    "meta", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)  # fmt: skip


def _cifar_folder(layout: _CifarLayout, root: Path) -> Path:
    """``root`` may be the folder holding ``cifar-10-batches-py`` or that folder itself (possibly renamed)."""
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if root.name == layout.folder or (root / layout.meta).is_file():
        return root
    return root / layout.folder


def _download_cifar(layout: _CifarLayout, root: Path) -> None:
    # Only imported when asked: torchvision is heavy and every other path works without it.
    from torchvision import datasets

    container = root.parent if root.name == layout.folder else root
    container.mkdir(parents=True, exist_ok=True)
    cls = datasets.CIFAR10 if layout.name == "cifar10" else datasets.CIFAR100
    log.info("downloading %s into %s with torchvision", layout.name, container)
    cls(root=str(container), train=True, download=True)


def _load_cifar(
    layout: _CifarLayout, root: Path, split: str, download: bool, labels_key: str, names_key: str
) -> SplitData:
    _check_split(layout.name, split)
    folder = _cifar_folder(layout, root)
    needed = [folder / name for name in [*layout.files[split], layout.meta]]
    if download and not all(p.is_file() for p in needed):
        # Fetch only when files are missing: torchvision re-verifies md5s (and prints) on every call.
        _download_cifar(layout, root)
        folder = _cifar_folder(layout, root)
        needed = [folder / name for name in [*layout.files[split], layout.meta]]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{layout.name}: missing {missing} in {folder}. Point root at the folder containing {layout.folder}/ "
            f"(the python version, {layout.url}), or pass download=True (`download: true` in params.yaml) on a "
            "machine with internet to fetch it with torchvision."
        )
    meta_path = folder / layout.meta
    meta = _load_cifar_pickle(meta_path, [names_key])
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    images, labels = [], []
    for name in layout.files[split]:
        path = folder / name
        batch = _load_cifar_pickle(path, ["data", labels_key])
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[labels_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise InputError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        if lab.shape != (len(data),):
            raise InputError(f"{path}: {len(data)} images but {labels_key!r} has shape {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
            raise InputError(
                f"{path}: {labels_key!r} span [{lab.min()}, {lab.max()}] but {meta_path} names {len(classes)} classes"
            )
        # Rows are channel-planar (1024 R, 1024 G, 1024 B, each row-major): -> (N, 32, 32, 3).
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return SplitData(
        np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes,
        [str(folder / name) for name in layout.files[split]] + [str(meta_path)],
    )  # fmt: skip


def load_cifar10(root: Path, split: str, *, download: bool = False) -> SplitData:
    """CIFAR-10 (Krizhevsky, 2009): 32x32 RGB, 10 classes, torchvision's ``cifar-10-batches-py`` pickles."""
    return _load_cifar(_CIFAR10, root, split, download, "labels", "label_names")


def load_cifar100(root: Path, split: str, *, download: bool = False, label_type: str = "fine") -> SplitData:
    """CIFAR-100 (Krizhevsky, 2009): 32x32 RGB, 100 fine (or 20 coarse) classes, ``cifar-100-python`` pickles."""
    _check_choice("label_type", label_type, ("fine", "coarse"))
    return _load_cifar(_CIFAR100, root, split, download, f"{label_type}_labels", f"{label_type}_label_names")


# --------------------------------------------------------------------------------------------------
# ImageFolder (directory or tar archive)
# --------------------------------------------------------------------------------------------------

_IMAGEFOLDER_SPLITS = ("train", "test", "val")
# Pillow modes that carry no colour: read as "L" when every image of the split is one of them.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass
class _Entry:
    """One image file: where to show it in messages, and either a path or its bytes (from an archive)."""

    label: int
    name: str
    sort_key: tuple[str, str]
    path: Path | None = None
    data: bytes | None = None


@dataclass
class _Tree:
    """What an ImageFolder holds: per split, per class, its image files (class dirs may be empty)."""

    location: str
    splits: dict[str, dict[str, list[_Entry]]] = field(default_factory=dict)
    ignored: int = 0  # non-image files seen (README.txt, Thumbs.db, ...)


def _image_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _hidden(name: str) -> bool:
    # Hidden entries (.DS_Store, ._foo.jpg AppleDouble files, .ipynb_checkpoints) are never data.
    return name.startswith(".") or name == "__MACOSX"


def _scan_dir(root: Path, wanted: set[str]) -> _Tree:
    """Index ``root`` (or its single sub-folder holding the splits, as an extracted archive often has)."""
    base = root
    if not any((root / s).is_dir() for s in _IMAGEFOLDER_SPLITS):
        subs = [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d.name)]
        nested = [d for d in subs if any((d / s).is_dir() for s in _IMAGEFOLDER_SPLITS)]
        if len(nested) == 1:
            base = nested[0]
    tree = _Tree(str(base))
    exts = _image_extensions()
    for split in _IMAGEFOLDER_SPLITS:
        split_dir = base / split
        if not split_dir.is_dir():
            continue
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _hidden(e.name))
        tree.splits[split] = {c: [] for c in classes}
        if split not in wanted:
            continue  # class names suffice for the consistency check; don't walk big folders needlessly
        for c in classes:
            class_dir = split_dir / c
            # Same walk and order as torchvision's make_dataset: sorted (dirpath, fnames), following links.
            for dirpath, dirnames, fnames in sorted(os.walk(class_dir, followlinks=True)):
                dirnames[:] = [d for d in dirnames if not _hidden(d)]
                rel = os.path.relpath(dirpath, class_dir)
                if any(_hidden(part) for part in Path(rel).parts):
                    continue
                for fname in sorted(fnames):
                    if _hidden(fname):
                        continue
                    if os.path.splitext(fname)[1].lower() not in exts:
                        tree.ignored += 1
                        continue
                    path = Path(dirpath) / fname
                    tree.splits[split][c].append(_Entry(-1, str(path), (rel, fname), path=path))
    return tree


def _scan_tar(archive: Path, wanted: set[str]) -> _Tree:
    """Index a tar archive of an ImageFolder in one streaming pass, keeping bytes of ``wanted`` splits only.

    Splits may sit at the archive's top level (``train/cat/1.jpg``) or under one top folder
    (``cifar10/train/cat/1.jpg``); both are recorded during the pass and resolved afterwards, so the
    (possibly large, gzip-compressed) archive is decompressed exactly once.
    """
    exts = _image_extensions()
    # (prefix, split) -> class -> entries; prefix is "" or the top folder's name.
    found: dict[tuple[str, str], dict[str, list[_Entry]]] = {}
    ignored = 0
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if any(_hidden(p) for p in parts):
                    continue
                for off in (0, 1):
                    if len(parts) < off + 2 or parts[off] not in _IMAGEFOLDER_SPLITS:
                        continue
                    key = ("/".join(parts[:off]), parts[off])
                    classes = found.setdefault(key, {})
                    cls = parts[off + 1]
                    if member.isdir() and len(parts) == off + 2:
                        classes.setdefault(cls, [])
                    elif member.isfile() and len(parts) >= off + 3:
                        entries = classes.setdefault(cls, [])
                        if posixpath.splitext(parts[-1])[1].lower() not in exts:
                            ignored += 1
                        elif parts[off] in wanted:
                            f = tf.extractfile(member)
                            assert f is not None  # regular file members always have data
                            rel = "/".join(parts[off + 2 : -1]) or "."
                            entries.append(_Entry(-1, f"{archive}::{member.name}", (rel, parts[-1]), data=f.read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"{archive}: unreadable tar archive ({e}); re-download or re-create it") from e
    prefixes = sorted({prefix for prefix, _ in found})
    if "" in prefixes:
        prefix = ""  # splits at top level win over a class folder that happens to be named like a split
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    elif not prefixes:
        raise InputError(
            f"{archive}: no ImageFolder inside: expected members train/<class>/<image> (optionally under one top "
            "folder)"
        )
    else:
        raise InputError(f"{archive}: several top folders hold splits ({prefixes}); the archive must hold one")
    tree = _Tree(f"{archive}::{prefix}" if prefix else str(archive), ignored=ignored)
    for (p, split), classes in found.items():
        if p == prefix:
            tree.splits[split] = {c: sorted(classes[c], key=lambda e: e.sort_key) for c in sorted(classes)}
    return tree


def _select_split(tree: _Tree, split: str) -> str:
    """The folder that serves ``split``: ``test`` falls back to ``val`` (ImageNet-style layouts)."""
    if split in tree.splits:
        return split
    if split == "test" and "val" in tree.splits:
        log.info("%s has no test/ folder: using val/ as the test split", tree.location)
        return "val"
    raise FileNotFoundError(
        f"{tree.location}: no {split}/ folder{' (nor val/)' if split == 'test' else ''}; found "
        f"{sorted(tree.splits) or 'no split folders'}. Expected layout: root/train/<class>/<image>, "
        "root/test/<class>/<image> (or root/val/...)"
    )


def _check_classes(tree: _Tree, folder: str) -> list[str]:
    """Class list of ``folder``, after checking that every split has the same classes (labels index them)."""
    classes = list(tree.splits[folder])
    if not classes:
        raise InputError(f"{tree.location}: {folder}/ holds no class folders; expected {folder}/<class>/<image>")
    for other, other_classes in tree.splits.items():
        if other == folder or set(other_classes) == set(classes):
            continue
        only_here = sorted(set(classes) - set(other_classes))
        only_there = sorted(set(other_classes) - set(classes))
        raise InputError(
            f"{tree.location}: class folders differ between {folder}/ and {other}/: only in {folder}/: {only_here}; "
            f"only in {other}/: {only_there}. Labels index the sorted class list, so both splits need the same "
            "classes: add or remove the folders"
        )
    return classes


def _decode(entry: _Entry, mode: str | None, resize: int | None) -> np.ndarray:
    """One image file -> (H, W) for gray or (H, W, 3) uint8; ``mode=None``: ``L`` for gray images, else RGB."""
    from PIL import Image

    with Image.open(entry.path if entry.path is not None else io.BytesIO(entry.data or b"")) as im:
        im.load()  # decode now: Image.open only reads the header, truncation shows up here
        target = mode or ("L" if im.mode in _GRAY_MODES else "RGB")
        out = im.convert(target) if im.mode != target else im
        if resize is not None:
            # Square resize: a split must share one size; bilinear with Pillow's antialiasing on shrink.
            out = out.resize((resize, resize), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)


@dataclass
class SplitStream:
    """One ImageFolder split as a stream of decoded ``(image (H, W, C) uint8, label)`` pairs.

    Images are decoded one at a time as the stream is consumed, so preparing a split takes memory for
    one image, not for the split (ImageNet-scale folders; an archive still holds its compressed bytes,
    so extract very large archives first). Undecodable images raise (naming the file) or, with
    ``on_corrupt="skip"``, are dropped and listed in ``skipped``; every image must have the size of
    the first one (else pass ``resize``).
    """

    classes: list[str]
    entries: list[_Entry]
    mode: str | None
    resize: int | None
    on_corrupt: str
    location: str
    folder: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def permute(self, seed: int) -> None:
        """Reorder the images by ``default_rng(seed).permutation`` (before decoding; what prepare's shuffle does)."""
        perm = np.random.default_rng(seed).permutation(len(self.entries))
        self.entries = [self.entries[i] for i in perm]

    def split_labels(self) -> np.ndarray:
        """(N,) int64 labels from the index (no decoding)."""
        return np.array([e.label for e in self.entries], dtype=np.int64)

    def subset(self, index: np.ndarray) -> SplitStream:
        """The images at `index`, in that order (a new stream; nothing decoded)."""
        return dataclasses.replace(self, entries=[self.entries[i] for i in index], skipped=[])

    def resolve_mode(self) -> None:
        """``mode=None``: ``L`` if every image is grayscale, else ``RGB`` (reads headers only)."""
        if self.mode is not None:
            return
        from PIL import Image

        self.mode = "L"
        for entry in self.entries:
            try:
                with Image.open(entry.path if entry.path is not None else io.BytesIO(entry.data or b"")) as im:
                    if im.mode not in _GRAY_MODES:
                        self.mode = "RGB"
                        return
            except Exception:  # corrupt: reported (or skipped) when decoded
                continue

    def decoded(self) -> Iterator[tuple[np.ndarray, int, str]]:
        """``(image (H, W) or (H, W, 3), label, name)`` in order; shapes checked against the first image."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars are a nicety, never a reason to fail

            def tqdm(it: Any, **_: Any) -> Any:  # type: ignore[no-redef]
                return it

        first: tuple[str, tuple[int, ...]] | None = None
        for entry in tqdm(self.entries, desc=f"decode {self.folder}", unit="img", disable=None, leave=False):
            try:
                arr = _decode(entry, self.mode, self.resize)
            except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
                if self.on_corrupt == "error":
                    raise InputError(
                        f"cannot decode image {entry.name}: {type(e).__name__}: {e}. Fix or delete it, or pass "
                        "on_corrupt='skip' to drop undecodable images"
                    ) from e
                self.skipped.append(entry.name)
                continue
            hw = arr.shape[:2]
            if first is None:
                first = (entry.name, hw)
            elif hw != first[1]:
                raise InputError(
                    f"image {entry.name} is {hw[1]}x{hw[0]} (WxH) but {first[0]} is {first[1][1]}x{first[1][0]}; "
                    f"images of a split must share one size: pass resize=<int> (e.g. resize={first[1][0]})"
                )
            yield arr, entry.label, entry.name
        if self.skipped:
            log.warning(
                "%s: skipped %d undecodable image(s) of %d in %s/ (first: %s)",
                self.location, len(self.skipped), len(self.entries), self.folder, ", ".join(self.skipped[:3]),
            )  # fmt: skip
        if first is None:
            raise InputError(
                f"{self.location}: no decodable image in {self.folder}/ ({len(self.skipped)} skipped as corrupt)"
            )

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """``(image (H, W, C), label)`` with one channel count for the whole split (the mode is resolved first)."""
        self.resolve_mode()
        for arr, label, _ in self.decoded():
            yield (arr[..., None] if arr.ndim == 2 else arr), label


def open_imagefolder(
    root: Path,
    split: str,
    *,
    mode: str | None = None,
    resize: int | None = None,
    on_corrupt: str = "error",
) -> SplitStream:
    """Index an ImageFolder split without decoding it: the streaming form of :func:`load_imagefolder`."""
    _check_split("imagefolder", split, _IMAGEFOLDER_SPLITS)
    _check_choice("mode", mode, ("RGB", "L", None))
    _check_choice("on_corrupt", on_corrupt, ("error", "skip"))
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ConfigError(f"option resize={resize!r} is invalid; expected a positive int or None")
    wanted = {split, "val"} if split == "test" else {split}
    if root.is_file():
        if not tarfile.is_tarfile(root):
            raise InputError(f"{root}: is a file but not a tar archive; pass an ImageFolder directory or a .tar[.gz]")
        tree = _scan_tar(root, wanted)
    elif root.is_dir():
        tree = _scan_dir(root, wanted)
    else:
        raise FileNotFoundError(f"{root}: no such directory or archive; set `prepare.root` to an ImageFolder")
    folder = _select_split(tree, split)
    classes = _check_classes(tree, folder)
    empty = [c for c in classes if not tree.splits[folder][c]]
    if empty:
        raise InputError(
            f"{tree.location}: empty class folder(s) in {folder}/: {empty} (no image files"
            f"{'; non-image files are ignored' if tree.ignored else ''}). Add images or remove the folder(s)"
        )
    if tree.ignored:
        log.info("%s: ignored %d non-image file(s)", tree.location, tree.ignored)
    entries = []
    for label, c in enumerate(classes):
        for entry in tree.splits[folder][c]:
            entry.label = label
            entries.append(entry)
    return SplitStream(classes, entries, mode, resize, on_corrupt, tree.location, folder)


def load_imagefolder(
    root: Path,
    split: str,
    *,
    mode: str | None = None,
    resize: int | None = None,
    on_corrupt: str = "error",
) -> SplitData:
    """An ImageFolder (``root/train/<class>/*``, ``root/test/<class>/*`` or ``root/val/<class>/*``), decoded in memory.

    ``root`` is a directory or a tar archive (``.tar``, ``.tar.gz``, ``.tgz``, ...) of one, read without
    extracting; in both cases the splits may sit under one top folder. Classes are the sorted class
    folder names (as torchvision's ``ImageFolder``; hidden folders are ignored) and must be the same in
    every split. Images are ordered by class, then path, as torchvision orders them. ``prepare``
    streams the same images instead (:func:`open_imagefolder`), so large folders need not fit in memory.

    Args:
        mode: ``"RGB"``, ``"L"``, or ``None`` = ``"L"`` if every image is grayscale, else ``"RGB"``.
        resize: resize every image to ``resize x resize`` (needed when sizes differ; an error names the
            first image whose size differs from the first image's).
        on_corrupt: ``"error"`` (raise, naming the file) or ``"skip"`` (drop undecodable images, log a
            warning with their count, report it in ``SplitData.skipped``).
    """
    stream = open_imagefolder(root, split, mode=mode, resize=resize, on_corrupt=on_corrupt)
    arrays, labels, names = [], [], []
    for arr, label, name in stream.decoded():
        arrays.append(arr)
        labels.append(label)
        names.append(name)
    if all(a.ndim == 2 for a in arrays):
        images = np.stack(arrays)[..., None]
    else:
        # Mixed gray and colour with mode=None: replicate gray to 3 channels (what Pillow's L->RGB does).
        images = np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays])
    return SplitData(images, np.asarray(labels, dtype=np.int64), stream.classes, names, skipped=len(stream.skipped))


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------


def load_synthetic(
    root: Path | None,
    split: str,
    *,
    n: int = 512,
    size: int = 16,
    channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
) -> SplitData:
    """Deterministic, learnable toy images; ``root`` is ignored.

    Each class has a fixed random low-frequency template (4x4 Gaussian blocks upsampled to ``size``),
    shared by both splits; a sample is its class template shifted by up to 1 pixel plus Gaussian pixel
    noise. A tiny CNN (even a nearest-centroid classifier) gets far above chance, yet the noise keeps it
    from being a lookup. Train and test draw different samples from streams seeded by ``(seed, split)``.
    """
    _check_split("synthetic", split)
    for name, value, low in (("n", n, 1), ("size", size, 4), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"option {name}={value!r} is invalid; expected an int >= {low}")
    _check_choice("channels", channels, (1, 3))
    proto = np.random.default_rng([seed, 0])  # templates: independent of the split, so test matches train
    coarse = proto.normal(size=(num_classes, 4, 4, channels))
    block = -(-size // 4)  # ceil: upsample by whole blocks, then crop to size
    templates = coarse.repeat(block, axis=1).repeat(block, axis=2)[:, :size, :size]  # (K, S, S, C)
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes, shuffled
    shifts = rng.integers(-1, 2, size=(n, 2))
    images = templates[labels]  # (N, S, S, C)
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], (int(dy), int(dx)), axis=(0, 1))
    images = 128.0 + 45.0 * images + rng.normal(0.0, 35.0, size=images.shape)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return SplitData(images, labels, [f"class_{k}" for k in range(num_classes)], [])


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., SplitData]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "hf": load_hf_split,
    "synthetic": load_synthetic,
}


class StreamedSplit(Protocol):
    """A split decoded image by image while it is sharded (:class:`SplitStream`, :class:`pipeline.data.hf.HFStream`)."""

    classes: list[str]
    location: str

    def __len__(self) -> int: ...
    def permute(self, seed: int) -> None: ...
    def split_labels(self) -> np.ndarray: ...  # (len,) int64, without decoding (the validation split's draw)
    def subset(self, index: np.ndarray) -> StreamedSplit: ...  # those positions, in that order
    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]: ...


#: Sources ``prepare`` streams (memory: one image or one window of rows, not the split); their keywords are the
#: source's options (the :data:`SOURCES` reader takes the same ones).
STREAMED: dict[str, Callable[..., StreamedSplit]] = {"imagefolder": open_imagefolder, "hf": open_hf_split}


def source_options(source: str) -> dict[str, Any]:
    """The options ``source`` accepts, with their defaults: the keywords of its streamed opener if it has one
    (:data:`STREAMED`), else of its reader."""
    reader = STREAMED.get(source) or _reader(source)
    params = inspect.signature(reader).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(source: str, options: dict[str, Any]) -> None:
    """Raise TypeError naming any option ``source`` does not take, with the valid ones."""
    valid = source_options(source)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionError(f"source {source!r} got unknown option(s) {unknown}; valid options: {sorted(valid)}")


def _reader(source: str) -> Callable[..., SplitData]:
    try:
        return SOURCES[source]
    except KeyError:
        raise ConfigError(f"unknown source {source!r}; available: {sorted(SOURCES)}") from None


def load_split(source: str, root: str | Path | None, split: str, **options: Any) -> SplitData:
    """Read one split of a data set.

    Args:
        source: a key of :data:`SOURCES`.
        root: where the data set lives (directory, or archive for ``imagefolder``); ignored by ``synthetic``.
        split: ``"train"`` or ``"test"`` (``imagefolder`` also accepts ``"val"``).
        **options: the source's keyword options (see :func:`source_options`).

    Raises:
        ConfigError (a ValueError): unknown source or split, bad option value.
        InputError (a ValueError): malformed data.
        OptionError (a ConfigError and a TypeError): an option the source does not take (listing the valid ones).
        FileNotFoundError: missing files (the message says how to get them).
    """
    reader = _reader(source)
    check_options(source, options)
    if root is None and source != "synthetic":
        default = DEFAULT_ROOTS.get(source)
        if default is None:
            raise ConfigError(f"source {source!r} needs a root (set `prepare.root` in params.yaml)")
        root = default
    start = time.perf_counter()
    data = reader(Path(root) if root is not None else None, split, **options)
    log.info(
        "loaded %s/%s: %d images of %s, %d classes in %.1f s%s",
        source, split, len(data), "x".join(map(str, data.images.shape[1:])), data.num_classes,
        time.perf_counter() - start, f" ({data.skipped} skipped)" if data.skipped else "",
    )  # fmt: skip
    return data
