"""Checkpoints: one atomic writer for the project, kdcache's checkpoint format, and users' own weights.

- :func:`atomic_write` is how every checkpoint-like file is written (model checkpoints here, the training
  loop's ``last.pt``): to a temporary file in the same folder, fsync-ed, then ``os.replace``-d into place,
  so a crash never leaves a truncated file that a later DVC stage (or ``--resume``) would take for a
  finished one.
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``{"arch", "num_classes", "in_channels", "state_dict",
  **extra}``; :func:`save_model` / :func:`load_model` add the data set's normalisation
  (:class:`~pipeline.models.registry.Normalized`) and check a checkpoint fits a data set.
- :func:`load_state_dict_checkpoint` / :func:`import_state_dict`: a user's bare ``state_dict`` (CRD/DKD
  teachers, DataParallel prefixes, Lightning wrappers) for a registered architecture.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .registry import DataSpec, Normalized, build_model, canonical_arch, count_parameters

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_fits",
    "import_state_dict",
    "load_checkpoint",
    "load_model",
    "load_state_dict_checkpoint",
    "save_checkpoint",
    "save_model",
]

log = logging.getLogger(__name__)

# Keys that save_checkpoint owns; `extra` may not overwrite them (a clobbered "arch" would rebuild the wrong net).
_RESERVED_KEYS = ("arch", "num_classes", "in_channels", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint exists but does not fit: wrong architecture, missing/unexpected keys, or wrong shapes."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel/DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Reject values ``torch.load(weights_only=True)`` would refuse, at save time rather than at every load."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint extra {where} has a key of type {type(k).__name__}; use str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"checkpoint extra {where} is a {type(value).__name__}; checkpoints hold only None/bool/int/float/str, "
        "tensors and lists/dicts of those (convert numpy scalars with float()/int())"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"arch", "num_classes", "in_channels", "state_dict", **extra}`` to ``path`` atomically.

    The file is written to a temporary name in the same directory and ``os.replace``-d into place, so a crash
    never leaves a truncated checkpoint that a later DVC stage would take for a finished one. ``arch`` is stored
    in canonical form; tensors are stored on the CPU so the file loads on machines without the training device.
    """
    path = Path(path)
    name = canonical_arch(arch)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED_KEYS if k in extra]
    if clash:
        raise ValueError(f"checkpoint extra may not contain the reserved keys {clash}")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint extra keys must be str; got {key!r}")
        _check_plain(value, repr(key))
    state_dict = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "arch": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "state_dict": state_dict,
        **extra,
    }

    torch_save_atomic(payload, path)
    log.info("saved %s checkpoint (%d parameters) to %s", name, count_parameters(model), path)
    return path


def _missing_file_error(path: Path, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint not found: {path}. {hint}")


def _torch_load(path: Path, map_location: Any) -> Any:
    # weights_only=True: a checkpoint a user brings is untrusted input, and full unpickling could run arbitrary code.
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises a zoo of types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _first(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in total)"


def _load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if not problems:
        mismatched = [
            f"{k}: file {tuple(getattr(state_dict[k], 'shape', ()))} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != v.shape
        ]
        if mismatched:
            problems.append(f"shape mismatches [{'; '.join(mismatched[:5])}] ({len(mismatched)} in total)")
    if problems:
        raise CheckpointError(
            f"state_dict in {path} does not fit architecture {arch!r}: {'; '.join(problems)}. Check the "
            "architecture name, num_classes and in_channels the checkpoint was trained with."
        )
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(
    path: str | os.PathLike[str], expected_arch: str | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a :func:`save_checkpoint` file: rebuild the stored architecture, load its weights, return it in eval mode.

    Returns ``(model, meta)`` where ``meta`` is everything in the file but ``state_dict``. The model is put in
    ``eval()`` mode because a loaded checkpoint here is a teacher: a teacher left in train mode would update its
    BatchNorm statistics and emit batch-dependent logits; call ``.train()`` to fine-tune instead.

    Raises ``FileNotFoundError`` (saying how to produce the file), ``CheckpointError`` if ``expected_arch`` differs
    from the stored one (naming both) or the weights do not fit (naming missing/unexpected keys and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(
            path,
            "Produce it with `dvc repro train_teacher@<name>` for a demo teacher, or point "
            "teachers.<name>.checkpoint in params.yaml at your own checkpoint.",
        )
    payload = _torch_load(path, map_location)
    if not isinstance(payload, dict) or any(k not in payload for k in _RESERVED_KEYS):
        raise CheckpointError(
            f"{path} is not a kdcache checkpoint (it needs {list(_RESERVED_KEYS)} entries); for a bare state_dict "
            "use load_state_dict_checkpoint(path, arch, num_classes, in_channels)"
        )
    try:
        stored = canonical_arch(payload["arch"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    if expected_arch is not None and canonical_arch(expected_arch) != stored:
        raise CheckpointError(
            f"checkpoint {path} holds architecture {payload['arch']!r}, but {expected_arch!r} was expected; "
            "fix the architecture in params.yaml or retrain the teacher"
        )
    num_classes, in_channels = int(payload["num_classes"]), int(payload["in_channels"])
    model = build_model(stored, num_classes, in_channels)
    _load_strict(model, payload["state_dict"], path, stored)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


# Containers other trainers wrap a state_dict in: CRD/DKD save {"model": ...}, Lightning and many others
# {"state_dict": ...}; DataParallel/DDP prefix keys with "module.", torch.compile with "_orig_mod.".
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def _extract_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    state = payload
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} holds no state_dict: expected a mapping of parameter names to tensors, or one under "
            f"{list(_WRAPPER_KEYS)}; found {top}"
        )
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_checkpoint(
    path: str | os.PathLike[str], arch: str, num_classes: int, in_channels: int = 3, map_location: Any = "cpu"
) -> nn.Module:
    """Build ``arch`` and load a user's own weights file into it; return the model in eval mode (it is a teacher).

    Accepts a bare ``state_dict``, one wrapped under ``"state_dict"``/``"model"``/``"model_state_dict"``/``"net"``
    (e.g. CRD's and DKD's published CIFAR teachers), with DataParallel's ``module.`` prefix stripped, or a
    :func:`save_checkpoint` file (whose stored architecture must then equal ``arch``).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, "Set teachers.<name>.checkpoint in params.yaml to an existing state_dict file.")
    payload = _torch_load(path, map_location)
    name = canonical_arch(arch)
    if isinstance(payload, dict) and isinstance(payload.get("arch"), str) and "state_dict" in payload:
        stored = canonical_arch(payload["arch"])
        if stored != name:
            raise CheckpointError(
                f"checkpoint {path} holds architecture {payload['arch']!r}, but {arch!r} was requested"
            )
    model = build_model(name, num_classes, in_channels)
    _load_strict(model, _extract_state_dict(payload, path), path, name)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the pipeline's models: checkpoints that carry the data set's normalisation


def save_model(path: str | Path, model: Normalized, arch: str, extra: dict[str, Any] | None = None) -> Path:
    """Checkpoint: the bare net's state_dict + arch + normalisation + ``extra`` (e.g. test accuracy)."""
    net = model.net
    meta = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), **(extra or {})}
    num_classes = meta.pop("num_classes", None) or _out_features(net)
    in_channels = int(model.mean.numel())
    return save_checkpoint(path, net, arch=arch, num_classes=num_classes, in_channels=in_channels, extra=meta)


def _out_features(net: nn.Module) -> int:
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def load_model(
    path: str | Path, expected_arch: str | None = None, data: DataSpec | None = None
) -> tuple[Normalized, dict[str, Any]]:
    """Load a kdcache checkpoint; with ``data`` (a manifest), check classes/channels fit the data set."""
    net, meta = load_checkpoint(path, expected_arch=expected_arch)
    if data is not None:
        check_fits(meta, data, path)
    mean = meta.get("mean") or (data.mean if data else None)
    std = meta.get("std") or (data.std if data else None)
    if mean is None:
        raise CheckpointError(f"{path}: checkpoint has no normalisation (mean/std); pass the data set's manifest")
    return Normalized(net, mean, std), meta


def import_state_dict(path: str | Path, arch: str, data: DataSpec) -> Normalized:
    """A user's bare ``state_dict`` for ``arch`` (e.g. a published teacher), normalised with the data set's stats."""
    h, w, c = data.image_shape
    net = load_state_dict_checkpoint(path, arch=arch, num_classes=data.num_classes, in_channels=c)
    return Normalized(net, data.mean, data.std)


def check_fits(meta: Mapping[str, Any], data: DataSpec, path: str | Path) -> None:
    """A checkpoint's classes x channels must be the data set's."""
    c = data.image_shape[2]
    if meta.get("num_classes") != data.num_classes or meta.get("in_channels") != c:
        name = getattr(data, "dataset", "the data set")
        raise CheckpointError(
            f"checkpoint {path} is for {meta.get('num_classes')} classes x {meta.get('in_channels')} channels, "
            f"but data set {name} has {data.num_classes} classes x {c} channels"
        )
