"""The wire format of a teacher behind HTTP (issue 28): what `kdcache serve` answers and the endpoint client sends.

Protocol `kdcache-logits/1`, two routes under the endpoint's base URL:

``GET <url>/v1/info`` -> 200, ``application/json``::

    {"protocol": "kdcache-logits/1", "fingerprint": "<hex>", "num_classes": C, "in_channels": c,
     "max_batch": n, "name": "..."}

``POST <url>/v1/logits``, body ``application/x-npz`` (``numpy.savez``, no pickles) with

- ``split``: 0-d unicode array, the split the rows come from (``train``, ``val``, ``test``, or ``eval`` for an
  evaluation pass that is not a store's);
- ``index``: int64 ``(n,)`` the rows' sample indices in that split; ``view``: int64 ``(n,)`` their view numbers.
  ``(split, index, view)`` is a *sample-view id*: the same id always carries the same image, so a server may cache
  answers by id and a client retrying a request asks for the same ids again;
- ``images``: uint8 ``(n, H, W, C)``: the sample-views exactly as the teacher sees them (the view recipe applied;
  the model's own normalisation and resize are the server's business).

-> 200, ``application/x-npz`` with ``index``, ``view`` (echoed) and ``logits``: float32 ``(n, num_classes)``, raw
(never softmaxed), plus the header ``X-Model-Fingerprint: <hex>`` (the served model's identity: the client stores
it and stops when it changes mid-run). Errors: 4xx/5xx with a JSON body ``{"error": "..."}``; 429 and 5xx (with an
optional ``Retry-After``) are worth retrying, other 4xx are not.

Numbers travel as ``.npz`` because numpy is all either side needs (no schema compiler, no pickle: every array is
loaded with ``allow_pickle=False``); images stay uint8, 4x smaller than floats.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL = "kdcache-logits/1"
INFO_PATH = "/v1/info"
LOGITS_PATH = "/v1/logits"
NPZ = "application/x-npz"
FINGERPRINT_HEADER = "x-model-fingerprint"


class WireError(ValueError):
    """A body that is not what the protocol says (the message names what is wrong)."""


@dataclass(frozen=True)
class Rows:
    """One request's sample-views: ids and (for a request) images or (for a response) logits."""

    split: str
    index: np.ndarray  # (n,) int64
    view: np.ndarray  # (n,) int64
    data: np.ndarray  # (n, H, W, C) uint8 images, or (n, C) float32 logits

    def __len__(self) -> int:
        return len(self.index)


def _pack(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def encode_request(split: str, index: np.ndarray, view: np.ndarray, images: np.ndarray) -> bytes:
    """The body of ``POST /v1/logits``."""
    return _pack(
        split=np.array(split),
        index=np.asarray(index, np.int64),
        view=np.asarray(view, np.int64),
        images=np.ascontiguousarray(images, np.uint8),
    )


def encode_response(index: np.ndarray, view: np.ndarray, logits: np.ndarray) -> bytes:
    """The body of a 200 answer to ``POST /v1/logits``."""
    return _pack(
        index=np.asarray(index, np.int64), view=np.asarray(view, np.int64), logits=np.asarray(logits, np.float32)
    )


def _unpack(body: bytes, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise WireError(f"{what} lacks {missing} (it has {sorted(z.files)})")
            return {k: z[k] for k in keys}
    except WireError:
        raise
    except Exception as exc:  # not a zip, a truncated member, a pickled object array: all just "not npz"
        raise WireError(
            f"{what} is not an .npz body ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc


def _ids(a: dict[str, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    index, view = a["index"], a["view"]
    if index.ndim != 1 or view.shape != index.shape or index.dtype.kind not in "iu" or view.dtype.kind not in "iu":
        raise WireError(f"{what}: index and view must be integer arrays of one length; got {index.shape}, {view.shape}")
    return index.astype(np.int64), view.astype(np.int64)


def decode_request(body: bytes) -> Rows:
    """A ``POST /v1/logits`` body, checked (shapes, dtypes)."""
    a = _unpack(body, ("split", "index", "view", "images"), "request")
    index, view = _ids(a, "request")
    images = a["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(index):
        raise WireError(
            f"request: images must be uint8 (n, H, W, C) with n = {len(index)}; got {images.dtype} {images.shape}"
        )
    return Rows(str(a["split"]), index, view, images)


def decode_response(body: bytes, split: str) -> Rows:
    """A 200 body of ``POST /v1/logits``, checked (the caller checks the ids and the width against its request)."""
    a = _unpack(body, ("index", "view", "logits"), "response")
    index, view = _ids(a, "response")
    logits = a["logits"]
    if logits.ndim != 2 or len(logits) != len(index) or logits.dtype.kind != "f":
        raise WireError(
            f"response: logits must be float (n, C) with n = {len(index)}; got {logits.dtype} {logits.shape}"
        )
    return Rows(split, index, view, logits.astype(np.float32, copy=False))


def info_record(fingerprint: str, num_classes: int, in_channels: int, max_batch: int, name: str) -> dict[str, Any]:
    """The JSON of ``GET /v1/info``."""
    return {
        "protocol": PROTOCOL,
        "fingerprint": fingerprint,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "max_batch": int(max_batch),
        "name": name,
    }


def parse_info(body: bytes, content_type: str, url: str) -> dict[str, Any]:
    """``GET /v1/info``'s JSON, checked; an HTML page or another protocol is a ``WireError`` that says so."""
    text = body[:2000].decode("utf-8", "replace")
    if "html" in content_type.lower() or text.lstrip().lower().startswith(("<!doctype", "<html")):
        raise WireError(
            f"{url} answers an HTML page, not kdcache's wire format ({PROTOCOL}): is the URL the teacher server's base "
            "URL (kdcache serve prints it)?"
        )
    try:
        info = json.loads(body)
    except ValueError as exc:
        raise WireError(f"{url} answers {content_type or 'a body'} that is not JSON: {text[:80]!r}") from exc
    if not isinstance(info, dict) or info.get("protocol") != PROTOCOL:
        raise WireError(f"{url} speaks {info.get('protocol') if isinstance(info, dict) else None!r}, not {PROTOCOL}")
    for key in ("fingerprint", "num_classes", "in_channels"):
        if key not in info:
            raise WireError(f"{url}: its info lacks {key!r}")
    return info
