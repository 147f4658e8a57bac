"""IDX files (LeCun et al.): ``fashion_mnist`` and ``mnist``, gzip-compressed or raw.

Fashion-MNIST (Xiao et al., 2017) ships in Debian's ``dataset-fashion-mnist``; MNIST as torchvision downloads it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from pipeline.data.sources.base import DEFAULT_ROOTS, SplitData, check_split
from pipeline.errors import InputError

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

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
    check_split(source, split)
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
