"""One writer per output: an exclusive lock file `<output>.lock` naming its holder (host, pid, start, command).

`exclusive(path)` takes the lock for the duration of a `with` block: the file is opened with `O_CREAT` and
locked with `fcntl.flock(LOCK_EX | LOCK_NB)`, so a second writer fails at once with a
:class:`StoreLockedError` naming the holder instead of interleaving its writes with the first one's.

The kernel drops a flock when its process dies (even by SIGKILL), so a lock file left behind by a dead local
process is detected as stale and taken over with a warning. A lock file written by another host is never
taken over: that process cannot be checked from here, and a shared filesystem may not carry flocks between
hosts; the message says to delete the file if that process is gone.

The lock is re-entrant within a process (teach holds it while the executor it calls takes it again), and
the file is removed on release. Dask workers never take it: they write disjoint store shards under the
driver's lock, and check before each shard that the driver still holds it (`holder`): a task orphaned by a
killed driver stops as soon as a new run has taken the store over.

Readers take turns with the writer: `reading(path)` holds a shared flock on `<output>.readers` while a process
reads the output (a student run its store, evaluate its store and student, an ensemble its members), and
`exclusive` also takes that file's lock exclusively. So `teach --force` on a store a distill is reading is refused
at once (instead of deleting the files under the reader), and a reader refuses a store being rewritten. The
`.readers` file stays (0 bytes; unlinking a file others may hold open would let two processes lock two inodes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
READERS_SUFFIX = ".readers"

_HELD: dict[str, list[int]] = {}  # lock path -> [fd, readers fd, depth] of the writer locks this process holds
_READING: dict[str, list[int]] = {}  # readers path -> [fd, depth] of the shared locks this process holds
_GUARD = threading.Lock()


class StoreLockedError(UserError):
    """Another process is writing the same output."""


def lock_path(path: str | Path) -> Path:
    """The lock file of output `path`: `<path>.lock`, beside it (never inside a DVC-tracked folder)."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def readers_path(path: str | Path) -> Path:
    """The readers' lock file of output `path`: `<path>.readers`, beside it."""
    path = Path(path)
    return path.with_name(path.name + READERS_SUFFIX)


def _lock_readers(path: Path, shared: bool) -> int | None:
    """flock `<path>.readers` shared (a reader) or exclusive (a writer), without waiting; None when it is taken the
    other way (a writer while we would read, readers while we would write)."""
    f = readers_path(path)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def _read(fd: int) -> dict[str, Any]:
    """The holder recorded in an open lock file ({} when empty or unreadable: a holder that died while writing it)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        found = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def holder(path: str | Path) -> dict[str, Any]:
    """Who holds (or last held) the lock of output `path`: {host, pid, since, command}, {} without a lock file."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} ({holder.get('command')})"


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _acquire(lock: Path, what: str) -> int:
    """Open and flock `lock`; returns the fd. Raises StoreLockedError when another process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{what} is being written by another process: {_describe(holder)}; lock file {lock}. "
                "Wait for it to finish (one writer per output)"
            ) from None
        # A releasing holder unlinks the file before unlocking: if we locked an unlinked file, start over.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _take(lock: Path, fd: int, what: str) -> None:
    """Record this process as the holder, after checking what an earlier holder left in the file."""
    previous = _read(fd)
    me = _holder()
    if previous:
        if previous.get("host") != me["host"]:
            raise StoreLockedError(
                f"{what} is locked by {_describe(previous)}; lock file {lock}. That host's process cannot be checked "
                "from here: if it is no longer running, delete the lock file and run again"
            )
        state = "no longer running" if not _alive(previous.get("pid")) else "its pid now belongs to another process"
        log.warning("taking over the stale lock %s of %s: %s", lock, _describe(previous), state)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """Hold the exclusive writer lock of output `path` inside the block; yields the lock file's path.

    `what` names the output in messages (default: the path). Re-entrant within a process.
    """
    lock = lock_path(path)
    key = os.path.abspath(lock)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[2] += 1
        else:
            fd = _acquire(lock, what or str(path))
            try:
                _take(lock, fd, what or str(path))
            except BaseException:  # another host's lock (left as it is) or a failed write of ours
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            readers = _lock_readers(Path(path), shared=False)
            if readers is None:
                _release(lock, fd)  # ours now: remove it again
                raise StoreLockedError(
                    f"{what or path} is in use: another process is reading it (a distill, evaluate or ensemble "
                    f"run; lock file {readers_path(path)}). Wait for it to finish, then run again"
                )
            _HELD[key] = [fd, readers, 1]
    try:
        yield lock
    finally:
        with _GUARD:
            held = _HELD[key]
            held[2] -= 1
            if held[2] == 0:
                del _HELD[key]
                os.close(held[1])
                _release(lock, held[0])


def _release(lock: Path, fd: int) -> None:
    """Drop the writer lock `fd` of `lock`: unlink the file first (a waiter that opened this inode sees it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock)
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def reading(path: str | Path, what: str | None = None) -> Iterator[None]:
    """Hold a shared lock on output `path` while reading it: any number of readers at once, never with its writer.

    A writer (`exclusive`) at work is an error naming it. Re-entrant within a process.
    """
    key = os.path.abspath(readers_path(path))
    with _GUARD:
        held = _READING.get(key)
        if held is not None:
            held[1] += 1
        else:
            fd = _lock_readers(Path(path), shared=True)
            if fd is None:
                raise StoreLockedError(
                    f"{what or path} is being written by another process: {_describe(holder(path))}. Wait for it to "
                    "finish, then run again (readers and the writer of an output take turns)"
                )
            _READING[key] = [fd, 1]
    try:
        yield
    finally:
        with _GUARD:
            held = _READING[key]
            held[1] -= 1
            if held[1] == 0:
                del _READING[key]
                os.close(held[0])
