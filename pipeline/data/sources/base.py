"""What every source shares: :class:`SplitData`, :class:`OptionError`, the split and option checks, the
:class:`StreamedSplit` protocol, and the image decoder of ImageFolders and Hugging Face datasets
(:class:`Entry`, :func:`decode_entry`).

Imports point one way: this module <- each source module (``idx``, ``cifar``, ``imagefolder``, ``synthetic``,
``hf``) <- the package (``pipeline.data.sources``: the registries).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.config import ConfigError

SPLITS: tuple[str, ...] = ("train", "test")

#: Where a source's files live when the user installed them the documented way.
DEFAULT_ROOTS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}

# Pillow modes that carry no colour: read as "L" when every image of the split is one of them.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class OptionError(ConfigError, TypeError):
    """A bad option (`prepare.options`): one the source does not take, or a value it refuses; a ConfigError, and a
    TypeError like a bad keyword."""


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


class StreamedSplit(Protocol):
    """A split decoded image by image while it is sharded (:class:`~pipeline.data.sources.imagefolder.SplitStream`,
    :class:`~pipeline.data.sources.hf.HFStream`)."""

    classes: list[str]
    location: str

    def __len__(self) -> int: ...
    def permute(self, seed: int) -> None: ...
    def split_labels(self) -> np.ndarray: ...  # (len,) int64, without decoding (the validation split's draw)
    def subset(self, index: np.ndarray) -> StreamedSplit: ...  # those positions, in that order
    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]: ...


def check_split(source: str, split: str, valid: tuple[str, ...] = SPLITS) -> None:
    """Raise ConfigError unless ``split`` is one of ``valid`` (the splits ``source`` has)."""
    if split not in valid:
        raise ConfigError(f"source {source!r} has no split {split!r}; valid splits: {list(valid)}")


def check_choice(name: str, value: object, valid: tuple[object, ...]) -> None:
    """Raise OptionError unless option ``name``'s ``value`` is one of ``valid``."""
    if value not in valid:
        raise OptionError(f"option {name}={value!r} is invalid; valid values: {list(valid)}")


def check_resize(resize: object) -> None:
    """Raise OptionError unless ``resize`` is a positive int or None (the ``resize`` option of the image sources)."""
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise OptionError(f"option resize={resize!r} is invalid; expected a positive int or None")


@dataclass
class Entry:
    """One image file: where to show it in messages, and either a path or its bytes (from an archive)."""

    label: int
    name: str
    sort_key: tuple[str, str]
    path: Path | None = None
    data: bytes | None = None


def decode_entry(entry: Entry, mode: str | None, resize: int | None) -> np.ndarray:
    """One image file -> (H, W) for gray or (H, W, 3) uint8; ``mode=None``: ``L`` for gray images, else RGB."""
    from PIL import Image

    with Image.open(entry.path if entry.path is not None else io.BytesIO(entry.data or b"")) as im:
        im.load()  # decode now: Image.open only reads the header, truncation shows up here
        target = mode or ("L" if im.mode in GRAY_MODES else "RGB")
        out = im.convert(target) if im.mode != target else im
        if resize is not None:
            # Square resize: a split must share one size; bilinear with Pillow's antialiasing on shrink.
            out = out.resize((resize, resize), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)
