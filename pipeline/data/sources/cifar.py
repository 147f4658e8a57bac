"""CIFAR-10 / CIFAR-100: Krizhevsky's python-pickle layout as torchvision downloads it (``cifar-10-batches-py/``,
``cifar-100-python/``); ``download=True`` fetches it with torchvision."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sources.base import SplitData, check_choice, check_split
from pipeline.errors import InputError

log = logging.getLogger(__name__)


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
    check_split(layout.name, split)
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
    check_choice("label_type", label_type, ("fine", "coarse"))
    return _load_cifar(_CIFAR100, root, split, download, f"{label_type}_labels", f"{label_type}_label_names")
