"""ImageFolders: ``root/{train,test|val}/<class>/<image>`` in any Pillow-readable format, either a directory or a
``.tar[.gz|.bz2|.xz]`` archive of one, read in one streaming pass without extracting; ``prepare`` streams them
(:class:`SplitStream`), decoding one image at a time."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import Encoded
from pipeline.data.sources.base import (
    GRAY_MODES,
    Entry,
    SplitData,
    check_choice,
    check_resize,
    check_split,
    decode_entry,
)
from pipeline.data.tario import decode_image
from pipeline.errors import InputError

log = logging.getLogger(__name__)

_IMAGEFOLDER_SPLITS = ("train", "test", "val")


@dataclass
class _Tree:
    """What an ImageFolder holds: per split, per class, its image files (class dirs may be empty)."""

    location: str
    splits: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)
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
                    tree.splits[split][c].append(Entry(-1, str(path), (rel, fname), path=path))
    return tree


def _scan_tar(archive: Path, wanted: set[str]) -> _Tree:
    """Index a tar archive of an ImageFolder in one streaming pass, keeping bytes of ``wanted`` splits only.

    Splits may sit at the archive's top level (``train/cat/1.jpg``) or under one top folder
    (``cifar10/train/cat/1.jpg``); both are recorded during the pass and resolved afterwards, so the
    (possibly large, gzip-compressed) archive is decompressed exactly once.
    """
    exts = _image_extensions()
    # (prefix, split) -> class -> entries; prefix is "" or the top folder's name.
    found: dict[tuple[str, str], dict[str, list[Entry]]] = {}
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
                            entries.append(Entry(-1, f"{archive}::{member.name}", (rel, parts[-1]), data=f.read()))
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


@dataclass
class SplitStream:
    """One ImageFolder split as a stream of decoded ``(image (H, W, C) uint8, label)`` pairs.

    Images are decoded one at a time as the stream is consumed, so preparing a split takes memory for
    one image, not for the split (ImageNet-scale folders; an archive still holds its compressed bytes,
    so extract very large archives first). Undecodable images raise (naming the file) or, with
    ``on_corrupt="skip"``, are dropped and listed in ``skipped``. Images may differ in size (``resize``
    makes them one square size).

    ``encode="keep"`` (prepare's default): a JPEG or PNG file whose pixels are already in the split's mode
    (RGB, or L for gray) is kept as its own bytes (`shards.Encoded`: the shard member equals the file), decoded
    once here with the loaders' decoder to check it and to count its pixels into the channel statistics;
    anything else (CMYK or palette or 16-bit images, BMP/WebP/TIFF, or any image when ``resize`` is set) is
    decoded with Pillow, converted to the mode, and stored as a lossless PNG, as ``encode="png"`` stores every
    image. EXIF orientation is never applied (torchvision's ImageFolder and ``decode_jpeg`` leave it too).
    """

    classes: list[str]
    entries: list[Entry]
    mode: str | None
    resize: int | None
    on_corrupt: str
    location: str
    folder: str
    encode: str = "png"
    skipped: list[str] = field(default_factory=list)
    kept: int = 0  # images stored as their own bytes (encode="keep")

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
                    if im.mode not in GRAY_MODES:
                        self.mode = "RGB"
                        return
            except Exception:  # corrupt: reported (or skipped) when decoded
                continue

    def decoded(self) -> Iterator[tuple[np.ndarray | Encoded, int, str]]:
        """``(image (H, W) or (H, W, 3) or an `Encoded` file, label, name)`` in order."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars are a nicety, never a reason to fail

            def tqdm(it: Any, **_: Any) -> Any:  # type: ignore[no-redef]
                return it

        first: str | None = None
        keep = self.encode == "keep" and self.resize is None
        for entry in tqdm(self.entries, desc=f"decode {self.folder}", unit="img", disable=None, leave=False):
            try:
                arr = (keep and _kept(entry, self.mode)) or decode_entry(entry, self.mode, self.resize)
            except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
                if self.on_corrupt == "error":
                    raise InputError(
                        f"cannot decode image {entry.name}: {type(e).__name__}: {e}. Fix or delete it, or pass "
                        "on_corrupt='skip' to drop undecodable images"
                    ) from e
                self.skipped.append(entry.name)
                continue
            first = first or entry.name
            self.kept += isinstance(arr, Encoded)
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

    def __iter__(self) -> Iterator[tuple[np.ndarray | Encoded, int]]:
        """``(image (H, W, C) or `Encoded`, label)``: one channel count for the split (its mode resolved first)."""
        self.resolve_mode()
        for arr, label, _ in self.decoded():
            yield (arr[..., None] if isinstance(arr, np.ndarray) and arr.ndim == 2 else arr), label
        if self.encode == "keep":
            log.info("%s/%s: kept %d of %d images as their own bytes", self.location, self.folder, self.kept,
                     len(self.entries) - len(self.skipped))  # fmt: skip


def _kept(entry: Entry, mode: str | None) -> Encoded | None:
    """The file as its own bytes when it is a JPEG/PNG already in `mode` (decoded as the loaders will), else None.

    Pillow reads the header first (format, mode, and its decompression-bomb check, as torchvision's
    ImageFolder loader would meet it); a file that fails to decode raises, like `decode_entry`.
    """
    from PIL import Image

    data = entry.data if entry.data is not None else Path(entry.path or "").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt, im_mode = im.format, im.mode
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt or "")
    if ext is None or im_mode != mode:
        return None
    image = decode_image(ext, data)  # (H, W, C) uint8: what every loader will see; raises on a truncated file
    return Encoded(data, ext, image) if image.shape[2] == (1 if mode == "L" else 3) else None


def open_imagefolder(
    root: Path,
    split: str,
    *,
    mode: str | None = None,
    resize: int | None = None,
    on_corrupt: str = "error",
    encode: str = "png",
) -> SplitStream:
    """Index an ImageFolder split without decoding it: the streaming form of :func:`load_imagefolder`.

    ``encode``: ``"keep"`` stores JPEG/PNG files as their own bytes where they already have the split's mode
    (`prepare.encode`, see :class:`SplitStream`), ``"png"`` decodes and stores every image as PNG.
    """
    check_split("imagefolder", split, _IMAGEFOLDER_SPLITS)
    check_choice("encode", encode, ("keep", "png"))
    check_choice("mode", mode, ("RGB", "L", None))
    check_choice("on_corrupt", on_corrupt, ("error", "skip"))
    check_resize(resize)
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
    return SplitStream(classes, entries, mode, resize, on_corrupt, tree.location, folder, encode)


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
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:  # one in-memory array needs one size (prepare streams instead: any sizes)
        h, w = arrays[0].shape[:2]
        raise InputError(
            f"{stream.location}: images of {stream.folder}/ differ in size ({len(sizes)} sizes, the first {w}x{h} "
            f"(WxH)); an in-memory split needs one: pass resize=<int> (e.g. resize={h}), or let `prepare` stream it"
        )
    if all(a.ndim == 2 for a in arrays):
        images = np.stack(arrays)[..., None]
    else:
        # Mixed gray and colour with mode=None: replicate gray to 3 channels (what Pillow's L->RGB does).
        images = np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays])
    return SplitData(images, np.asarray(labels, dtype=np.int64), stream.classes, names, skipped=len(stream.skipped))
