"""Fast reading of our own tar shards and PNGs, with webdataset / PIL as the fallback.

Python's tarfile parses every header field in Python (~50 us per sample of two members) and PIL's
PNG plugin parses chunks in Python (~45 us per 28x28 image): the two per-sample costs that dominated
the loader and the teach stage (BENCHMARKS.md). Our shards are plain ustar files of small members and
PIL-written 8-bit PNGs, so a direct header walk over an mmap and PIL's C zip decoder fed with the
joined IDAT data do the same in a few microseconds. Anything unusual (PAX or GNU long-name headers, a
non-local URL, a palette/16-bit/interlaced PNG) falls back to webdataset's reader / `decode_png`;
tests check both paths give identical samples.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
from PIL import Image
from webdataset.tariterators import tarfile_samples

__all__ = ["IMAGE_EXTS", "decode_image", "decode_jpeg", "decode_png", "decode_png_fast", "encode_png", "tar_samples"]

#: A sample's image member: our lossless PNG, or a source's own JPEG bytes kept as they were (`prepare.encode`).
IMAGE_EXTS = ("png", "jpg")


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (lossless, so teacher and student decode identical pixels)."""
    img = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)  # level 1: 3x faster, ~same size
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8."""
    arr = np.array(Image.open(io.BytesIO(data)))  # a writable copy: torch.from_numpy needs one
    return arr[:, :, None] if arr.ndim == 2 else arr


_ZERO_BLOCK = bytes(512)
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {(8, 0): ("L", 1), (8, 2): ("RGB", 3), (8, 6): ("RGBA", 4)}  # (bit depth, colour type) -> mode


class _Unsupported(Exception):
    """A tar feature the fast reader leaves to webdataset's (tarfile-based) reader."""


class _Truncated(EOFError):
    """The tar image ends early; `boundary`: between members (the members read so far are whole)."""

    def __init__(self, msg: str, boundary: bool) -> None:
        super().__init__(msg)
        self.boundary = boundary


def _tar_members(data: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar image (bytes or mmap), in order.

    Raises _Truncated (an EOFError) on a truncated archive, ValueError on a damaged header,
    _Unsupported on extended (PAX / GNU long name) headers.
    """
    off, n = 0, len(data)
    while True:
        if off + 512 > n:
            raise _Truncated(f"unexpected end of data at byte {off}", boundary=True)
        h = data[off : off + 512]
        if h == _ZERO_BLOCK:
            return  # end-of-archive marker
        if h[257:262] != b"ustar":
            if off == 0:
                raise _Unsupported("no ustar magic (a v7 tar, or not a tar: tarfile decides)")
            raise ValueError(f"not a tar header at byte {off}")
        typ = h[156:157]
        if typ not in (b"0", b"\0", b"5"):
            raise _Unsupported(f"tar member type {typ!r}")
        try:
            size = int(h[124:136].rstrip(b" \0") or b"0", 8)
        except ValueError as e:
            raise ValueError(f"bad size field in the tar header at byte {off}") from e
        name = h[0:100].split(b"\0", 1)[0].decode()
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode() + "/" + name
        body = off + 512
        if body + size > n:
            raise _Truncated(f"unexpected end of data in member {name}", boundary=False)
        if typ != b"5":  # directories carry no sample data
            yield name, data[body : body + size]
        off = body + (size + 511) // 512 * 512


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """webdataset-style samples ({"__key__", ext: bytes}) of a local tar shard, fast path first."""
    path = url[len("file:") :] if url.startswith("file:") else url
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(path):
        yield from tarfile_samples([{"url": url}])
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    emitted = 0
    try:
        cur: dict[str, Any] | None = None
        for name, body in _tar_members(data):
            base = name.rsplit("/", 1)[-1]
            dot = base.find(".")
            if dot <= 0:
                continue  # no key.ext: webdataset skips it too
            key = name[: len(name) - len(base) + dot]
            ext = base[dot + 1 :].lower()
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    emitted += 1
                    yield cur
                cur = {"__key__": key, "__url__": url}
            if ext in cur:
                raise ValueError(f"{name}: duplicate file name in tar file")
            cur[ext] = body
        if cur is not None:
            emitted += 1
            yield cur
    except _Truncated as e:
        if e.boundary and cur is not None:  # the sample before the cut is whole: deliver it, like tarfile would
            yield cur
        raise
    except _Unsupported:
        # Let webdataset's reader handle the rest, skipping the samples already delivered.
        yield from islice(tarfile_samples([{"url": url}]), emitted, None)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def decode_png_fast(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8, equal to `shards.decode_png` (8-bit grey/RGB/RGBA; else falls back to it)."""
    if data[:8] != _PNG_SIG or data[12:16] != b"IHDR":
        return decode_png(data)
    w, h, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PNG_MODES.get((depth, colour))
    if mode is None or interlace:
        return decode_png(data)
    off, n, parts = 33, len(data), []
    while off + 8 <= n:
        length, typ = struct.unpack_from(">I4s", data, off)
        if typ == b"IDAT":
            parts.append(data[off + 8 : off + 8 + length])
        elif typ == b"IEND":
            break
        off += 12 + length
    # PIL's "zip" decoder inflates and undoes the PNG row filters in C, like its PNG plugin does.
    img = np.array(Image.frombytes(mode[0], (w, h), b"".join(parts), "zip", mode[0]))  # writable, like decode_png
    return img[:, :, None] if mode[1] == 1 else img


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, C) uint8 with libjpeg-turbo (torchvision.io), the file's own channels (1 or 3).

    `prepare` keeps a JPEG's bytes only when they decode here to the data set's channels (else it stores a
    PNG), so no mode conversion happens at load time. EXIF orientation is not applied, as torchvision's
    ImageFolder (PIL) and `decode_jpeg` both leave it. A view of the decoder's (C, H, W) tensor.
    """
    import torch  # lazy: most readers of this module never meet a JPEG
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    x = tv_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (C, H, W) uint8
    return x.permute(1, 2, 0).numpy()


def decode_image(ext: str, data: bytes) -> np.ndarray:
    """A shard member's image (`ext` one of IMAGE_EXTS) -> (H, W, C) uint8."""
    return decode_jpeg(data) if ext == "jpg" else decode_png_fast(data)
