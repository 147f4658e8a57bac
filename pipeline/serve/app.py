"""`kdcache serve`: a teacher behind kdcache's wire format (`pipeline.wire`), as an ASGI app run by uvicorn.

    kdcache serve data/teachers/cnn.safetensors --port 8000
    kdcache serve weights/model.onnx --shards data/shards/fashion_mnist --port 8000

:class:`TeacherApp` answers ``GET /v1/info`` and ``POST /v1/logits``. Requests are decoded on the event loop and
queued to one model thread (:class:`Batcher`), which takes every queued request it can fit into ``max_batch`` rows
and runs them as one forward pass (requests arriving together share a batch; the GPU, or the CPU's threads, are
the bottleneck, not the HTTP layer). Each answer carries the model's fingerprint (the sha256 of the served file) in
``X-Model-Fingerprint``.

Bit for bit: a request is run in chunks of ``max_batch`` rows, as the teach stage's `predict_arrays` runs a
shard's view; a server that answers one request at a time with ``max_batch`` equal to the client's ``batch_size``
gives exactly the local teacher's logits. When it merges requests the batch composition differs, which on some
kernels moves a logit by a float rounding (tested equal to 1e-5 on CPU).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.wire import (
    FINGERPRINT_HEADER,
    INFO_PATH,
    LOGITS_PATH,
    NPZ,
    Rows,
    WireError,
    decode_request,
    encode_response,
    info_record,
)

log = logging.getLogger(__name__)

MAX_BODY = 1 << 30  # 1 GiB: ~13k ImageNet-sized (224 x 224 x 3) images in one request


@dataclass
class _Job:
    rows: Rows
    future: Future = field(default_factory=Future)


class Batcher:
    """One thread that owns the model: it runs queued requests in batches of up to ``max_batch`` rows."""

    def __init__(self, model: nn.Module, max_batch: int, device: torch.device) -> None:
        self.model, self.max_batch, self.device = model, max_batch, device
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kdcache-serve-model", daemon=True)
        self._thread.start()

    def submit(self, rows: Rows) -> Future:
        job = _Job(rows)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self) -> list[_Job] | None:
        """The next request, plus every queued one of the same image size that fits into ``max_batch`` rows."""
        first = self._queue.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.rows)
        while rows < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if (
                nxt is None
                or nxt.rows.data.shape[1:] != first.rows.data.shape[1:]
                or rows + len(nxt.rows) > self.max_batch
            ):
                self._queue.put(nxt)  # another size, over the batch, or the end: the next round takes it
                break
            jobs.append(nxt)
            rows += len(nxt.rows)
        return jobs

    def _run(self) -> None:
        from pipeline.models.predict import predict_arrays

        while (jobs := self._take()) is not None:
            try:
                images = np.concatenate([j.rows.data for j in jobs]) if len(jobs) > 1 else jobs[0].rows.data
                logits = predict_arrays(self.model, images, self.max_batch, self.device)  # (n, C)
            except Exception as exc:  # a model error fails its requests (500), never the server
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            start = 0
            for j in jobs:
                j.future.set_result(logits[start : start + len(j.rows)])
                start += len(j.rows)


class TeacherApp:
    """The ASGI app: ``GET /v1/info``, ``POST /v1/logits`` (see `pipeline.wire`)."""

    def __init__(
        self,
        model: nn.Module,
        fingerprint: str,
        num_classes: int,
        in_channels: int,
        name: str,
        max_batch: int = 256,
        device: torch.device | None = None,
        answer_log: str | Path | None = None,
    ) -> None:
        from pipeline.models.predict import model_device

        self.model = model.eval()
        self.device = device or model_device(model)
        self.fingerprint, self.num_classes, self.in_channels, self.name = fingerprint, num_classes, in_channels, name
        self.max_batch = max_batch
        self.answer_log = Path(answer_log) if answer_log else None
        self._log_lock = threading.Lock()
        self._batcher: Batcher | None = None

    @property
    def info(self) -> dict[str, Any]:
        return info_record(self.fingerprint, self.num_classes, self.in_channels, self.max_batch, self.name)

    def batcher(self) -> Batcher:
        if self._batcher is None:
            self._batcher = Batcher(self.model, self.max_batch, self.device)
        return self._batcher

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if path == INFO_PATH and method == "GET":
            await _send(send, 200, json.dumps(self.info).encode(), "application/json")
        elif path == LOGITS_PATH and method == "POST":
            await self._logits(receive, send)
        elif path in (INFO_PATH, LOGITS_PATH):
            await _error(send, 405, f"{method} {path}: not allowed")
        else:
            await _error(send, 404, f"{path}: not found; kdcache serve answers GET {INFO_PATH} and POST {LOGITS_PATH}")

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.batcher()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._batcher is not None:
                    self._batcher.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _logits(self, receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        if body is None:
            await _error(send, 413, f"request body over {MAX_BODY} bytes: send fewer images per request")
            return
        try:
            rows = decode_request(body)
        except WireError as exc:
            await _error(send, 400, str(exc))
            return
        if rows.data.shape[-1] != self.in_channels:
            await _error(
                send, 422, f"images have {rows.data.shape[-1]} channels; this teacher takes {self.in_channels}"
            )
            return
        t0 = time.perf_counter()
        try:
            logits = await asyncio.wrap_future(self.batcher().submit(rows))
        except Exception as exc:  # the model failed on these images
            log.exception("model error")
            await _error(send, 500, f"the model failed: {type(exc).__name__}: {exc}")
            return
        self._record(rows, time.perf_counter() - t0)
        await _send(send, 200, encode_response(rows.index, rows.view, logits), NPZ, self.fingerprint)

    def _record(self, rows: Rows, seconds: float) -> None:
        """One JSON line per answered request (ids and seconds) when `answer_log` is set: audits, billing, tests."""
        if self.answer_log is None:
            return
        line = json.dumps(
            {"split": rows.split, "index": rows.index.tolist(), "view": rows.view.tolist(), "s": round(seconds, 4)}
        )
        with self._log_lock, self.answer_log.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


async def _read_body(receive: Any) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, status: int, body: bytes, content_type: str, fingerprint: str | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if fingerprint:
        headers.append((FINGERPRINT_HEADER.encode(), fingerprint.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Any, status: int, message: str) -> None:
    await _send(send, status, json.dumps({"error": message}).encode(), "application/json")


def load_served(
    checkpoint: str | Path, arch: str | None = None, shards: str | Path | None = None, preprocess: str = "data"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to serve and its record (name, arch, classes, channels, fingerprint = the file's sha256).

    A kdcache checkpoint (a teacher the pipeline wrote, `data/teachers/<t>.safetensors`) carries everything; any
    other file (a state_dict for `arch`, a `.pt2`, an `.onnx`) is imported for the data set at `shards` (its classes,
    channels and normalisation), as `train_teacher` imports it.
    """
    from pipeline.config import ConfigError
    from pipeline.data.shards import load_manifest, sha256_file
    from pipeline.models.checkpoint import import_model, is_safetensors, load_model
    from pipeline.models.exported import format_of

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give a teacher checkpoint or model file to serve")
    meta = _kdcache_meta(path) if is_safetensors(path) else None
    if meta is not None:
        if meta.get("arch") == "endpoint":
            raise ConfigError(f"{path} is an endpoint teacher's record, not a model: serve the model behind that URL")
        model, meta = load_model(path)
    else:
        arch = arch or format_of(path)
        if arch is None or shards is None:
            raise ConfigError(
                f"{path} is not a kdcache checkpoint: give --arch (unless it is a .pt2/.onnx file) and --shards "
                "(the data set whose classes, channels and normalisation it is for)"
            )
        manifest = load_manifest(shards)
        model = import_model(path, arch, manifest, preprocess)
        meta = {"arch": arch, "num_classes": manifest.num_classes, "in_channels": manifest.image_shape[2]}
    record = {
        "name": path.stem,
        "arch": meta["arch"],
        "num_classes": int(meta["num_classes"]),
        "in_channels": int(meta["in_channels"]),
        "fingerprint": sha256_file(path),
    }
    return model, record


def _kdcache_meta(path: Path) -> dict[str, Any] | None:
    """A kdcache checkpoint's metadata (from the safetensors header only), None for another safetensors file."""
    from safetensors import safe_open

    from pipeline.models.checkpoint import META_KEY

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[META_KEY]) if META_KEY in header else None


def serve(
    checkpoint: str | Path,
    *,
    arch: str | None = None,
    shards: str | Path | None = None,
    preprocess: str = "data",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 256,
    device: str | None = None,
    answer_log: str | Path | None = None,
) -> None:
    """Load the teacher and serve it with uvicorn until interrupted (`kdcache serve`)."""
    import uvicorn

    from pipeline.runtime import pick_device

    model, record = load_served(checkpoint, arch, shards, preprocess)
    dev = torch.device(device) if device else pick_device()
    app = TeacherApp(
        model.to(dev),
        record["fingerprint"],
        record["num_classes"],
        record["in_channels"],
        record["name"],
        max_batch=max_batch,
        device=dev,
        answer_log=answer_log,
    )
    print(
        f"kdcache serve: {record['name']} ({record['arch']}, {record['num_classes']} classes, fingerprint "
        f"{record['fingerprint'][:12]}) on {dev} at http://{host}:{port}",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
