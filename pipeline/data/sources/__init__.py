"""Data set readers: one split of a data set -> a :class:`SplitData` of uint8 images and int64 labels.

Sources (the keys of :data:`SOURCES`, used by the ``prepare`` stage via :func:`load_split`):

- ``fashion_mnist`` / ``mnist`` (:mod:`.idx`): the IDX files of LeCun et al. (``train-images-idx3-ubyte[.gz]``, ...),
  gzip-compressed or raw; Fashion-MNIST (Xiao et al., 2017) ships in Debian's ``dataset-fashion-mnist``.
- ``cifar10`` / ``cifar100`` (:mod:`.cifar`): Krizhevsky's python-pickle layout as torchvision downloads it
  (``cifar-10-batches-py/``, ``cifar-100-python/``); ``download=True`` fetches it with torchvision.
- ``imagefolder`` (:mod:`.imagefolder`): ``root/{train,test|val}/<class>/<image>`` in any Pillow-readable
  format, either a directory or a ``.tar[.gz|.bz2|.xz]`` archive of one, read in one streaming pass without
  extracting.
- ``hf``: a Hugging Face ``datasets`` dataset on disk: a ``Dataset``/``DatasetDict.save_to_disk`` folder or
  Parquet files (:mod:`.hf`), with options for the image and label columns and the split names.
- ``synthetic`` (:mod:`.synthetic`): small deterministic, learnable images for tests and demos.

``imagefolder`` and ``hf`` also open as streams (:data:`STREAMED`), which ``prepare`` shards while decoding.

Every reader takes ``(root, split, *, <its options>)``; options are keyword-only so a misspelt option
is a ``TypeError`` (:class:`OptionError`) naming the valid ones instead of being silently ignored. Bad
options and sources are :class:`~pipeline.config.ConfigError` (a bad option: :class:`OptionError`); unreadable or
malformed files are :class:`~pipeline.errors.InputError` (both ValueErrors, and user errors: one clean line at the
command line).

What the sources share lives in :mod:`.base`; imports point one way: ``base`` <- each source module <- this
package (the registries). Add a source: a module with a reader ``(root, split, *, <options>) -> SplitData``,
registered in :data:`SOURCES` (and in :data:`STREAMED` if it streams).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.data.sources.base import (
    DEFAULT_ROOTS,
    GRAY_MODES,
    SPLITS,
    Entry,
    OptionError,
    SplitData,
    StreamedSplit,
    check_choice,
    check_split,
    decode_entry,
)
from pipeline.data.sources.cifar import load_cifar10, load_cifar100
from pipeline.data.sources.hf import HFStream, load_hf_split, open_hf_split
from pipeline.data.sources.idx import FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist, read_idx
from pipeline.data.sources.imagefolder import SplitStream, load_imagefolder, open_imagefolder
from pipeline.data.sources.synthetic import load_synthetic

__all__ = [
    "DEFAULT_ROOTS",
    "FASHION_MNIST_CLASSES",
    "GRAY_MODES",
    "SOURCES",
    "SPLITS",
    "STREAMED",
    "Entry",
    "HFStream",
    "OptionError",
    "SplitData",
    "SplitStream",
    "StreamedSplit",
    "check_choice",
    "check_options",
    "check_split",
    "decode_entry",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_hf_split",
    "load_imagefolder",
    "load_mnist",
    "load_split",
    "load_synthetic",
    "open_hf_split",
    "open_imagefolder",
    "read_idx",
    "source_options",
]

log = logging.getLogger(__name__)

SOURCES: dict[str, Callable[..., SplitData]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "hf": load_hf_split,
    "synthetic": load_synthetic,
}

#: Sources ``prepare`` streams (memory: one image or one window of rows, not the split); their keywords are the
#: source's options (the :data:`SOURCES` reader takes the same ones).
STREAMED: dict[str, Callable[..., StreamedSplit]] = {"imagefolder": open_imagefolder, "hf": open_hf_split}


def source_options(source: str) -> dict[str, Any]:
    """The options ``source`` accepts, with their defaults: the keywords of its streamed opener if it has one
    (:data:`STREAMED`), else of its reader."""
    reader = STREAMED.get(source) or _reader(source)
    params = inspect.signature(reader).parameters.values()
    # `encode` is `prepare.encode` (a stage key: prepare passes it), not a source option
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "encode"}


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
        ConfigError (a ValueError): unknown source or split.
        InputError (a ValueError): malformed data.
        OptionError (a ConfigError and a TypeError): an option the source does not take (listing the valid ones),
            or a bad option value.
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
