"""The user-error family: problems the user can fix (configuration, input files, stores), told in one line.

A stage or `kdcache` command that fails with one of these prints `<command>: error: <message>` and exits 2
(`pipeline.stage.run_main`, `pipeline.cli.main`); anything else is a bug and keeps its traceback.
`KDCACHE_DEBUG=1` shows the traceback of a user error too.

What counts as a user error (:func:`is_user_error`):
- :class:`UserError` and its subclasses: `ConfigError` (params.yaml), `InputError` (a file that cannot be used
  as it is), `StoreError` (logit stores), `StoreLockedError`, `ShardError` (shards and manifest);
- the error types of the packages that may not import the core (`losses`) or that this module may not import,
  registered by name in :data:`FOREIGN_USER_ERRORS` (`LossConfigError`, `CheckpointError`);
- a missing or unreadable input (`FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`,
  `PermissionError`) and a full or read-only disk (`ENOSPC`, `EDQUOT`, `EROFS`): the fix is the user's too.
"""

from __future__ import annotations

import errno

#: `module.QualName` of user-error types defined where this module cannot be imported (losses import nothing of
#: the pipeline) or that subclass ValueError on their own; matched anywhere in an exception's MRO.
FOREIGN_USER_ERRORS = frozenset(
    {
        "pipeline.losses.base.LossConfigError",
        "pipeline.models.checkpoint.CheckpointError",
    }
)

#: OSError numbers that describe the machine, not a bug: the disk is full, over quota, or read-only.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

_MISSING_INPUT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """Base of the errors a user fixes (bad params, bad or missing input, a store in use); never a bug."""


class InputError(UserError, ValueError):
    """An input file or data set that cannot be used as it is (corrupt, wrong shape, wrong values)."""


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is the user's to fix (one clean line) rather than a bug (a traceback)."""
    if isinstance(exc, (UserError, *_MISSING_INPUT)):
        return True
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in FOREIGN_USER_ERRORS for c in type(exc).__mro__)


def user_message(exc: BaseException) -> str:
    """The message of a user error on one line (KeyError's quotes and OSError's `[Errno n]` dropped)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and len(exc.args) <= 2:
        text = f"{exc.filename}: {exc.strerror}"  # an OS-raised error: "path: No such file or directory"
    elif isinstance(exc, OSError) and exc.strerror and len(exc.args) == 2:
        text = exc.strerror  # OSError(ENOSPC, "No space left on device") without a file name
    elif isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])  # str(KeyError) would quote the message
    else:
        text = _worker_message(str(exc))
    return " ".join(text.split()) or type(exc).__name__


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def _worker_message(text: str) -> str:
    """The worker's own message of an error a DataLoader worker raised (torch re-raises it in the main process as
    `Caught X in DataLoader worker process 0.` + the worker's whole traceback): the traceback's last line, its
    `module.Type: ` prefix dropped."""
    if not text.startswith("Caught ") or _WORKER_TRACEBACK not in text:
        return text
    last = [line for line in text.split(_WORKER_TRACEBACK, 1)[1].splitlines() if line.strip()][-1]
    head, sep, message = last.partition(": ")
    return message if sep and " " not in head else last
