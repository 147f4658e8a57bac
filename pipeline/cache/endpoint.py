"""A live teacher behind HTTP: the client the teach and query stages call it through (issue 28).

`EndpointTeacher.answer(images, split, index, view)` sends exactly the given sample-views to a server speaking
kdcache's wire format (`pipeline.wire`; `kdcache serve` is one) and returns their logits:

- **batches and concurrency**: the rows go out in requests of ``batch_size``, at most ``concurrency`` in flight;
- **a client-side rate limit**: request starts are spaced ``1 / rate_limit_per_s`` seconds apart;
- **retries**: a timeout, a refused or reset connection, a 429 or a 5xx is retried up to ``max_retries`` times,
  waiting ``backoff_s * 2**attempt`` (capped at ``max_backoff_s``, or the server's ``Retry-After``) times a random
  jitter in [0.5, 1.5), so many clients do not retry in step; a malformed body (truncated, not npz, other ids) is
  retried the same way. What cannot get better by asking again (another 4xx, logits of the wrong width, non-finite
  logits, a changed model fingerprint) stops at once. Every failure is one line (`EndpointError`) naming the
  teacher entry and the fix;
- **no row asked twice**: each answered request is written to a journal (`Journal`, one ``.npz`` per request
  beside the partial store) before its rows count as answered; a resumed run takes those rows from the journal and
  asks only for the others, and rows of store shards already written are never selected again (the teach loop skips
  done shards). The journal is dropped shard by shard once the store holds the rows;
- **one model**: every answer carries the server's fingerprint (``X-Model-Fingerprint``); the store records the one
  `train_teacher` saw, and a different one mid-run stops the run with the rows already stored intact;
- **accounting**: `CallStats` (requests, rows, retries, failures, rows from the journal, seconds, cost =
  rows x ``cost_per_call``) for the run log and the teacher's record.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import urllib3
from torch import nn

from pipeline.config import TeacherSpec
from pipeline.errors import UserError
from pipeline.wire import (
    FINGERPRINT_HEADER,
    INFO_PATH,
    LOGITS_PATH,
    NPZ,
    WireError,
    decode_response,
    encode_request,
    parse_info,
)

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class EndpointError(UserError):
    """A teacher endpoint that cannot answer as asked (after its retries, or a problem retrying cannot fix)."""


class _Retryable(Exception):
    """One failed attempt worth repeating; `retry_after` is the server's wish, in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class CallStats:
    """What talking to the endpoint cost (the run log's and the teacher record's `endpoint` entry)."""

    requests: int = 0  # answered requests
    rows: int = 0  # sample-views answered by the server (teacher calls)
    retries: int = 0  # attempts repeated after a timeout, connection error, 429/5xx or malformed body
    failures: int = 0  # requests given up on (each ends the run)
    journal_rows: int = 0  # rows a resumed run took from the journal instead of asking again
    seconds: float = 0.0  # wall time spent waiting for answers

    def record(self, cost_per_call: float) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3), "cost": round(self.rows * cost_per_call, 6)}


class RateLimiter:
    """Request starts at least ``1 / per_s`` seconds apart, across threads (None: no limit)."""

    def __init__(self, per_s: float | None) -> None:
        self.interval = 1.0 / per_s if per_s else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Journal:
    """Answers received and not yet in the store: ``<root>/<split>/<view>-<first index>-<n>.npz`` per request.

    Written atomically (a temporary name, then `os.replace`), so a killed run leaves whole answers or none. The
    folder records the model fingerprint; answers of another model are discarded, never reused.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root = Path(root)
        stamp = self.root / "fingerprint"
        if self.root.exists() and (not stamp.exists() or stamp.read_text().strip() != fingerprint):
            log.warning("discarding the endpoint journal %s: answers of another model", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint + "\n")
        self._cache: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        self._lock = threading.Lock()

    def _load(self, split: str) -> dict[tuple[int, int], np.ndarray]:
        if split not in self._cache:
            rows: dict[tuple[int, int], np.ndarray] = {}
            for f in sorted((self.root / split).glob("*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    for i, v, row in zip(z["index"].tolist(), z["view"].tolist(), z["logits"], strict=True):
                        rows[(i, v)] = row
            self._cache[split] = rows
        return self._cache[split]

    def lookup(self, split: str, index: np.ndarray, view: np.ndarray) -> dict[int, np.ndarray]:
        """Position in the request -> logits, for the rows already answered."""
        with self._lock:
            rows = self._load(split)
            return {
                k: rows[(i, v)]
                for k, (i, v) in enumerate(zip(index.tolist(), view.tolist(), strict=True))
                if (i, v) in rows
            }

    def add(self, split: str, index: np.ndarray, view: np.ndarray, logits: np.ndarray) -> None:
        folder = self.root / split
        folder.mkdir(exist_ok=True)
        path = folder / f"{int(view[0])}-{int(index[0])}-{len(index)}.npz"
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            np.savez(f, index=index, view=view, logits=logits)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._lock:
            rows = self._load(split)
            for i, v, row in zip(index.tolist(), view.tolist(), logits, strict=True):
                rows[(i, v)] = row

    def forget(self, split: str, start: int, stop: int) -> None:
        """Drop the answers of rows [start, stop) of `split` (their store shard is written)."""
        with self._lock:
            rows = self._load(split)
            for key in [k for k in rows if start <= k[0] < stop]:
                del rows[key]
            for f in (self.root / split).glob("*.npz"):
                _, first, _ = f.stem.split("-")
                if start <= int(first) < stop:
                    f.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class EndpointTeacher:
    """A teacher at ``url`` (see the module doc); `where` names its params entry in errors."""

    def __init__(
        self,
        url: str,
        *,
        num_classes: int,
        batch_size: int = 64,
        concurrency: int = 4,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        rate_limit_per_s: float | None = None,
        cost_per_call: float = 0.0,
        fingerprint: str | None = None,
        journal: Journal | None = None,
        where: str = "teacher endpoint",
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.num_classes, self.batch_size, self.concurrency = num_classes, batch_size, concurrency
        self.max_retries, self.cost_per_call, self.where = max_retries, cost_per_call, where
        self.fingerprint, self.journal = fingerprint, journal
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.stats = CallStats()
        self._stats_lock = threading.Lock()
        self._limiter = RateLimiter(rate_limit_per_s)
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._http = urllib3.PoolManager(maxsize=concurrency, block=True, retries=False, timeout=self._timeout)
        self._jitter = random.Random()

    # -- the server's record

    def info(self) -> dict[str, Any]:
        """``GET /v1/info`` (retried like any request), checked against the data set's classes and `fingerprint`."""
        url = self.url + INFO_PATH

        def attempt() -> dict[str, Any]:
            resp = self._send("GET", url)
            if resp.status != 200:
                self._status_error(resp, url)
            try:
                return parse_info(resp.data, resp.headers.get("content-type", ""), url)
            except WireError as exc:
                raise EndpointError(f"{self.where}: {exc}") from None

        info = self._with_retries(attempt, f"GET {url}")
        if int(info["num_classes"]) != self.num_classes:
            raise EndpointError(
                f"{self.where}: {self.url} serves a model of {info['num_classes']} classes, but the data set has "
                f"{self.num_classes}: serve a teacher of these classes (in the data set's class order)"
            )
        self._check_fingerprint(str(info["fingerprint"]))
        return info

    # -- answers

    def answer(self, images: np.ndarray, split: str, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Logits (k, C) of the k sample-views (`images` (k, H, W, C) uint8 with their ids), in order."""
        index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
        out = np.full((len(index), self.num_classes), np.nan, dtype=np.float32)
        todo = np.ones(len(index), dtype=bool)
        if self.journal is not None:
            for k, row in self.journal.lookup(split, index, view).items():
                out[k], todo[k] = row, False
            with self._stats_lock:
                self.stats.journal_rows += int((~todo).sum())
        pending = np.flatnonzero(todo)
        chunks = [pending[s : s + self.batch_size] for s in range(0, len(pending), self.batch_size)]
        if not chunks:
            return out
        with ThreadPoolExecutor(min(self.concurrency, len(chunks)), thread_name_prefix="endpoint") as pool:
            futures = [pool.submit(self._ask, split, index[c], view[c], images[c]) for c in chunks]
            try:
                for c, fut in zip(chunks, futures, strict=True):
                    out[c] = fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return out

    def _ask(self, split: str, index: np.ndarray, view: np.ndarray, images: np.ndarray) -> np.ndarray:
        """One request of at most `batch_size` rows: sent, retried, checked, journaled."""
        url = self.url + LOGITS_PATH
        body = encode_request(split, index, view, images)
        rows = f"{split} rows {int(index.min())}..{int(index.max())} (views {sorted(set(view.tolist()))[:4]})"

        def attempt() -> np.ndarray:
            resp = self._send("POST", url, body, {"content-type": NPZ})
            if resp.status != 200:
                self._status_error(resp, url)
            got = resp.headers.get(FINGERPRINT_HEADER)
            if not got:
                raise EndpointError(
                    f"{self.where}: {url} answers without an {FINGERPRINT_HEADER} header (see pipeline/wire.py)"
                )
            self._check_fingerprint(got)
            try:
                ans = decode_response(resp.data, split)
            except WireError as exc:
                raise _Retryable(f"a malformed body: {exc}") from None
            if not (np.array_equal(ans.index, index) and np.array_equal(ans.view, view)):
                raise _Retryable("an answer for other sample-views than asked (ids differ)")
            if ans.data.shape[1] != self.num_classes:
                raise EndpointError(
                    f"{self.where}: {url} returns {ans.data.shape[1]} logits per row, but the data set has "
                    f"{self.num_classes} classes: serve a teacher of these classes"
                )
            bad = ~np.isfinite(ans.data).all(axis=1)
            if bad.any():
                raise EndpointError(
                    f"{self.where}: {url} returns non-finite logits for {split} sample {int(index[bad][0])} view "
                    f"{int(view[bad][0])} ({int(bad.sum())} rows of the request): fix the served model"
                )
            return ans.data

        t0 = time.perf_counter()
        logits = self._with_retries(attempt, f"POST {url} for {rows}")
        if self.journal is not None:
            self.journal.add(split, index, view, logits)  # answered = journaled: a resumed run never asks again
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.rows += len(index)
            self.stats.seconds += time.perf_counter() - t0
        return logits

    # -- the HTTP layer

    def _send(self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        self._limiter.wait()
        try:
            return self._http.request(method, url, body=body, headers=headers, preload_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts, refused and reset connections
            raise _Retryable(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None

    def _status_error(self, resp: Any, url: str) -> None:
        """A non-200 answer: retryable (429, 5xx) or an `EndpointError` with the server's message."""
        try:
            message = json.loads(resp.data).get("error", "")
        except (ValueError, AttributeError):
            message = resp.data[:200].decode("utf-8", "replace")
        message = " ".join(str(message).split())
        if resp.status in RETRY_STATUS:
            after = resp.headers.get("retry-after")
            raise _Retryable(f"HTTP {resp.status} {message}".strip(), float(after) if _is_number(after) else None)
        raise EndpointError(f"{self.where}: {url} answers HTTP {resp.status}: {message or resp.reason}")

    def _check_fingerprint(self, got: str) -> None:
        if self.fingerprint is None:
            self.fingerprint = got
        elif got != self.fingerprint:
            raise EndpointError(
                f"{self.where}: the endpoint's model changed mid-run (fingerprint {self.fingerprint[:12]} when the "
                f"teacher was checked, {got[:12]} now); the rows already stored are kept. Logits of two models must "
                "not mix in one store: rerun train_teacher for the new model (dvc repro reruns its teach), or "
                "restore the old one"
            )

    def _with_retries(self, attempt: Any, what: str) -> Any:
        for k in range(self.max_retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if k == self.max_retries:
                    with self._stats_lock:
                        self.stats.failures += 1
                    raise EndpointError(
                        f"{self.where}: {what} failed {k + 1} times, last with {exc}; the rows already stored are "
                        "kept: check the server, then rerun (it resumes; raise max_retries or timeout_s for a slow "
                        "server)"
                    ) from None
                wait = exc.retry_after if exc.retry_after is not None else self.backoff_s * 2**k
                wait = min(self.max_backoff_s, wait) * (0.5 + self._jitter.random())
                log.info("%s: %s; retry %d of %d in %.2f s", self.where, exc, k + 1, self.max_retries, wait)
                with self._stats_lock:
                    self.stats.retries += 1
                time.sleep(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.clear()


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


class EndpointNet(nn.Module):
    """An endpoint as a module for evaluation passes (`train_teacher`'s val/test accuracy): float images in [0, 1]
    (B, C, H, W) go out as the uint8 pixels they came from (x * 255 rounds back exactly), logits come back.

    Its requests carry split ``eval`` and running indices: they are not a store's rows, so nothing is journaled."""

    def __init__(self, client: EndpointTeacher) -> None:
        super().__init__()
        self.client = client
        self._next = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        images = (x.detach().to("cpu", torch.float32) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, C)
        index = np.arange(self._next, self._next + len(images))
        self._next += len(images)
        return torch.from_numpy(self.client.answer(images, "eval", index, np.zeros_like(index))).to(x.device)


# ---------------------------------------------------------------------------------------------
# the pipeline's side: the teacher record `train_teacher` writes, and the client a stage opens from it

ENDPOINT_ARCH = "endpoint"


def client_for(spec: TeacherSpec, name: str, num_classes: int, **kwargs: Any) -> EndpointTeacher:
    """The client of teacher `name` (`teachers.<name>` with `endpoint:`); `kwargs`: `fingerprint`, `journal`."""
    assert spec.endpoint is not None
    return EndpointTeacher(
        spec.endpoint,
        num_classes=num_classes,
        batch_size=spec.batch_size,
        concurrency=spec.concurrency,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        rate_limit_per_s=spec.rate_limit_per_s,
        cost_per_call=spec.cost_per_call,
        where=f"teachers.{name}.endpoint",
        **kwargs,
    )


def write_endpoint_record(path: str | Path, info: dict[str, Any], in_channels: int) -> Path:
    """`data/teachers/<t>.safetensors` for an endpoint teacher: no tensors, kdcache's metadata naming the served
    model by its fingerprint. No URL, no client settings and no accuracy: only a new model behind the endpoint
    changes these bytes, so only that reruns the teach stage (and its students)."""
    from pipeline.models.checkpoint import atomic_write, checkpoint_bytes

    meta = {
        "arch": ENDPOINT_ARCH,
        "num_classes": int(info["num_classes"]),
        "in_channels": int(in_channels),
        "fingerprint": str(info["fingerprint"]),
    }
    data = checkpoint_bytes({}, meta)
    return atomic_write(path, lambda f: f.write(data))


def endpoint_record(path: str | Path) -> dict[str, Any] | None:
    """The metadata of an endpoint teacher's record at `path`, None for a model checkpoint (or any other file)."""
    from pipeline.models.checkpoint import META_KEY, is_safetensors

    path = Path(path)
    if not path.is_file() or not is_safetensors(path):
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    meta = json.loads(header.get(META_KEY, "{}"))
    return meta if meta.get("arch") == ENDPOINT_ARCH else None
