"""From a `BatchSource` to tensor batches in the training process: `make_loader`.

DataLoader workers each run the source's `numpy_batches` over their share of the epoch and add the
loss's teacher features next to each batch (`with_teacher_features`); the main process receives
tensor batches (zero-copy `torch.from_numpy`; pinning happens once per batch in `pack_to_device`).

Moving batches from DataLoader workers is costly next to a small student's step on a CPU: a tensor
travels as a shared-memory segment whose file descriptor the main process fetches over a Unix socket
(several per batch), every DataLoader message costs its machinery (poll, locks, index-queue feeder),
and a default 64 KB pipe holds less than one 28x28 batch, so a reader waits for the worker to be
scheduled again. So workers send numpy "messages" of several batches (up to `_MESSAGE_BYTES`), the
result pipe is enlarged to hold a few of them (Linux), and the main process splits them and makes
tensors. Large batches (big images) use shared memory, as usual. BENCHMARKS.md has the measurements.

On the way to the device (`prefetch_to_device`): a batch's device fields (images, labels, logits, teacher
features, member logits) are packed into one pinned host buffer and sent in one `non_blocking` copy on a
side stream, one batch ahead, so the copy of batch i+1 overlaps the step on batch i and a batch costs
one transfer instead of one per field. Host fields (`HOST_FIELDS`: the teacher mask, sample ids) stay on
the host, so the loop reads them without a device sync. On a CPU device all of this is the identity.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.training.source import BatchSource

log = logging.getLogger(__name__)

_MESSAGE_BYTES = 960 << 10  # batches per message: as many as fit (at least one), so one message fits the pipe
_MAX_PER_MESSAGE = 8
_WIRE_NUMPY_MAX = 4 << 20  # bytes per batch; above this, tensors in shared memory cost less than copies
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl command (Linux)

#: batch fields the loop reads on the host (masks and identities): never moved, so reading them never syncs
HOST_FIELDS = frozenset({"has_teacher", "index", "view", "pool_id"})
_ALIGN = 16  # bytes: every field of a packed transfer starts at a multiple (any dtype's element size divides it)

#: batch keys of the loss's teacher features precomputed by the loader: "tf/<name>" (see `with_teacher_features`)
FEATURE_PREFIX = "tf/"


def _identity(batch: Any) -> Any:
    return batch


def _nbytes(batch: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in batch.values())


def to_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """numpy arrays -> tensors sharing their memory."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def with_teacher_features(source: BatchSource, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
    """Add `source.teacher_features(logits)` to each numpy batch as "tf/<name>" arrays.

    The teacher side of a loss (CMKD: z-score, softmax, soft ranks, entropy of the teacher logits) is a
    function of the cached logits alone, so the loader's worker computes it next to the batch, off the
    training step. Rows without a teacher answer (NaN logits, budget `unqueried: ce`) get the features
    of a zero row; the training loop drops them with the logits.
    """
    fn = source.teacher_features
    for batch in batches:
        logits = batch.get("logits")
        if fn is not None and logits is not None:
            t = torch.from_numpy(logits)  # (B, C) float32
            has = batch.get("has_teacher")
            if has is not None and not has.all():
                t = torch.where(torch.from_numpy(has)[:, None], t, torch.zeros(()))
            for k, v in fn(t).items():
                batch[FEATURE_PREFIX + k] = v.numpy()
        yield batch


def pack_to_device(batch: dict[str, Any], device: torch.device, pack: bool | None = None) -> dict[str, Any]:
    """`batch` with its device fields on `device`, moved in one host-to-device copy (host fields stay).

    The fields are copied into one (pinned, on CUDA) byte buffer at 16-byte aligned offsets, that buffer
    goes to the device with `non_blocking=True`, and each field comes back as a typed view of the device
    buffer: one transfer (and one pinned allocation) per batch instead of one per field. `pack` defaults
    to "the device is not the CPU" (where every field already is); tests force it on CPU.
    """
    if pack is None:
        pack = device.type != "cpu"
    fields = [(k, v) for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in HOST_FIELDS]
    if not pack or not fields:
        return batch
    layout, size = [], 0
    for k, v in fields:
        n = v.numel() * v.element_size()
        layout.append((k, size, n, v.dtype, v.shape))
        size += -(-n // _ALIGN) * _ALIGN
    host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    for (_, off, n, _, _), (_, v) in zip(layout, fields, strict=True):
        host[off : off + n].copy_(v.contiguous().reshape(-1).view(torch.uint8))
    dev = host.to(device, non_blocking=True)
    out = dict(batch)
    for k, off, n, dtype, shape in layout:
        out[k] = dev[off : off + n].view(dtype).view(shape)
    return out


def prefetch_to_device(batches: Iterator[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """The batches of `batches` on `device`, the next one's transfer started before the current one is yielded.

    On CUDA the copies run on a side stream: the training stream waits for a batch's copy only when it
    takes the batch, and `record_stream` keeps the caching allocator from reusing its memory early.
    Elsewhere (CPU) the batches pass through unchanged.
    """
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def load() -> dict[str, Any] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return pack_to_device(batch, device)

    ahead = load()
    while ahead is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for v in ahead.values():
            if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                v.record_stream(current)
        batch, ahead = ahead, load()  # the next copy is in flight while this batch trains
        yield batch


class _Batches(IterableDataset):
    """`source.numpy_batches(...)` as an iterable data set, so DataLoader workers each batch their share.

    In a worker, yields lists of numpy batches (messages, see the module doc); in the main process,
    tensor batches.
    """

    def __init__(self, source: BatchSource, batch_size: int, drop_last: bool) -> None:
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[Any]:
        batches = with_teacher_features(self.source, self.source.numpy_batches(self.batch_size, self.drop_last))
        if torch.utils.data.get_worker_info() is None:
            yield from (to_tensors(b) for b in batches)
            return
        message: list[dict[str, np.ndarray]] = []
        size = 0
        most = 1  # the epoch's first message holds one batch, so training starts without waiting for a full one
        for batch in batches:
            n = _nbytes(batch)
            if n > _WIRE_NUMPY_MAX:
                if message:
                    yield message
                    message, size = [], 0
                yield to_tensors(batch)  # big: shared memory
                continue
            if message and (size + n > _MESSAGE_BYTES or len(message) == most):
                yield message
                message, size, most = [], 0, min(2 * most, _MAX_PER_MESSAGE)  # ramp up: 1, 2, 4, 8 batches
            message.append(batch)
            size += n
        if message:
            yield message


def _enlarge_result_pipe(it: Any) -> None:
    """Best effort: a bigger pipe for the workers' results, so messages are written without waiting for reads.

    The one place that reaches into DataLoader internals (its result queue's pipe); without them it does nothing.
    """
    queue = getattr(it, "_worker_result_queue", None)
    writer = getattr(queue, "_writer", None)
    if writer is None:
        return
    try:
        import fcntl

        fcntl.fcntl(writer.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError, ValueError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


class _Loader(DataLoader):
    """A DataLoader whose items are always single batches, dicts of tensors (worker messages split here)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        it = super().__iter__()
        _enlarge_result_pipe(it)
        for msg in it:
            for batch in msg if isinstance(msg, list) else [msg]:
                yield to_tensors(batch)


def make_loader(
    source: BatchSource, batch_size: int, workers: int = 1, drop_last: bool = False, start: str = "forkserver"
) -> DataLoader:
    """A DataLoader of batches (dicts of tensors) over a `BatchSource`; workers split a rank's share.

    Batches are made inside each worker (`source.numpy_batches`), so the DataLoader passes them through
    (`batch_size=None`); the batch layout is what default collation of per-sample dicts would give.
    `workers` is clamped to `source.max_workers`. `start`: the workers' start method (`worker_context`).
    """
    if workers > source.max_workers:
        log.info("workers %d > what the source can use (%d): using %d", workers, source.max_workers, source.max_workers)
        workers = source.max_workers
    return _Loader(
        _Batches(source, batch_size, drop_last),
        batch_size=None,
        collate_fn=_identity,  # keep numpy messages numpy inside the worker (see _MESSAGE_BYTES)
        num_workers=workers,
        pin_memory=False,  # `pack_to_device` copies each batch into one pinned buffer: pinning here would copy twice
        persistent_workers=False,  # the source (and its epoch) is re-sent to workers every epoch
        # Worker base seeds from a private generator: starting an epoch's workers never draws from the
        # global torch RNG, so a resumed run's RNG stream matches an uninterrupted one whenever the
        # loader starts (all randomness of the data stream is explicit and seeded anyway).
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if workers else None,  # messages of several batches each
        multiprocessing_context=worker_context(start) if workers else None,
        worker_init_fn=functools.partial(die_with, os.getpid()) if workers else None,
    )


def die_with(trainer_pid: int, worker_id: int = 0) -> None:
    """A loader worker's `worker_init_fn`: end the worker as soon as the trainer process is gone (even SIGKILLed).

    A forkserver-started worker's parent is the forkserver, not the trainer, so torch's own watchdog (the parent
    pid changed) never fires; the worker holds the forkserver's "alive" pipe open, so the forkserver never sees its
    last client leave; and both hold the resource tracker's pipe. Killing the trainer used to leave all three
    running for good. A daemon thread waits on the trainer's pidfd (Linux >= 5.3; else polls every second) and
    exits the worker, which lets the forkserver and the tracker end too (tests/test_faults.py: no orphan 10 s on).
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(trainer_pid)
            select.select([fd], [], [])  # readable once the trainer has exited
        except (AttributeError, OSError):  # no pidfd here, or the trainer is already gone
            while True:
                try:
                    os.kill(trainer_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # alive, another user's (a reused pid): keep waiting
                    pass
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-trainer", daemon=True).start()


def worker_context(start: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start from.

    `forkserver`: each epoch's workers fork from a server process that has imported torch and the data
    modules once (so a start costs about what a fork does), and share no pages with the trainer. A forked
    worker shares them copy-on-write: every page the trainer then writes (activations, gradients, the
    allocator's heap) is copied on its first write, a page fault each, ~0.3-0.5k per batch of the default
    student (BENCHMARKS.md). `fork`: the old way, for code that cannot guard its `__main__`.
    """
    if start not in ("forkserver", "fork"):
        raise ValueError(f"worker start method {start!r}: expected 'forkserver' or 'fork'")
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        # The server imports these once; each worker forked from it then starts without importing them again.
        # Workers re-run the main module (as with every start method but fork): a script run by path is
        # preloaded as such; for `python -m x`, the project modules imported so far are, so re-running x is cheap.
        main = sys.modules.get("__main__")
        by_path = getattr(main, "__spec__", None) is None and getattr(main, "__file__", None)
        ours = sorted(m for m in sys.modules if m == "pipeline" or m.startswith("pipeline."))
        ctx.set_forkserver_preload([*(["__main__"] if by_path else []), "torch", "numpy", *ours])
    return ctx
