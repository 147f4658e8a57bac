"""Checkpoints: one atomic writer for the project, kdcache's checkpoint format, and users' own weights.

- :func:`atomic_write` is how every checkpoint-like file is written (model checkpoints here, the training
  loop's resume state): to a temporary file in the same folder, fsync-ed, then ``os.replace``-d into place,
  so a crash never leaves a truncated file that a later DVC stage (or ``--resume``) would take for a
  finished one.
- :func:`save_checkpoint` / :func:`load_checkpoint`: a safetensors file (Hugging Face's format: a JSON header
  and raw tensor bytes, nothing executable) holding the bare network's ``state_dict`` in its own naming, with
  kdcache's metadata (``arch``, ``num_classes``, ``in_channels``, ``**extra``) as one JSON string under the header's
  ``__metadata__["kdcache"]``; :func:`save_model` / :func:`load_model` add the model's preprocessing
  (:class:`~pipeline.models.registry.Preprocess`: the data set's normalisation, or a timm model's input size and
  mean/std) and check a checkpoint fits a data set. The bytes are a pure function of the weights and the metadata,
  so re-running a stage reproduces its checkpoint (and the DVC hash and the store fingerprint over it).
- :func:`load_state_dict_checkpoint` / :func:`import_model`: a user's weights for an architecture: a safetensors
  ``state_dict`` (e.g. timm's ``model.safetensors``, in timm's own key names), a torch ``.pth``/``.pt`` (bare,
  or wrapped as CRD/DKD teachers, DataParallel prefixes, Lightning), or a kdcache checkpoint; old kdcache
  checkpoints written with ``torch.save`` are still read.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from pipeline.inputs import is_py_arch

from .exported import EXPORT_ARCHS, ProgramNet, check_program, format_of, input_size, program_net
from .registry import (
    DataSpec,
    Normalized,
    Preprocess,
    build_model,
    canonical_arch,
    check_input_size,
    count_parameters,
    resolve_preprocess,
    wrap,
)
from .usercode import check_code, check_output_width, code_identity

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_fits",
    "check_sees",
    "import_model",
    "is_safetensors",
    "load_checkpoint",
    "load_model",
    "load_state_dict_checkpoint",
    "save_checkpoint",
    "save_model",
]

log = logging.getLogger(__name__)

# Keys that save_checkpoint owns; `extra` may not overwrite them (a clobbered "arch" would rebuild the wrong net).
_RESERVED_KEYS = ("arch", "num_classes", "in_channels", "state_dict")
# The safetensors header's `__metadata__` key holding kdcache's metadata (JSON). One key on purpose: the
# safetensors writer keeps `__metadata__` in a hash map whose order changes from process to process, so
# several keys would give different bytes for the same checkpoint on every run.
META_KEY = "kdcache"
FORMAT_VERSION = 1


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
    """Reject values JSON cannot hold, at save time rather than as a broken header at load time."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint extra {where} has a key of type {type(k).__name__}; use str")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"checkpoint extra {where} is a {type(value).__name__}; checkpoint metadata holds only JSON values "
        "(None/bool/int/float/str and lists/dicts of those; convert numpy scalars with float()/int())"
    )


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bare model's state_dict as contiguous CPU tensors that share no memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in _unwrap(model).state_dict().items():
        t = value.detach().cpu().contiguous()
        where = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and where in seen:  # tied weights: store a copy under each name, load_state_dict re-ties them
            t = t.clone()
        seen.add(where)
        out[key] = t
    return out


def checkpoint_bytes(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """A safetensors file: ``state`` + ``meta`` as one JSON string (sorted keys), byte-identical for equal inputs."""
    from safetensors.torch import save  # tensors are laid out sorted by (dtype, name): deterministic

    header = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True, separators=(",", ":"))
    return save(dict(state), metadata={META_KEY: header})


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state_dict + ``{"arch", "num_classes", "in_channels", **extra}`` to ``path`` (safetensors).

    Written through :func:`atomic_write`, so a crash never leaves a truncated checkpoint that a later DVC stage would
    take for a finished one. ``arch`` is stored in canonical form; ``extra`` must be JSON values. Equal weights and
    metadata give equal bytes (see :func:`checkpoint_bytes`).
    """
    path = Path(path)
    name = canonical_arch(arch)
    extra = dict(extra or {})
    clash = [k for k in (*_RESERVED_KEYS, "format_version") if k in extra]
    if clash:
        raise ValueError(f"checkpoint extra may not contain the reserved keys {clash}")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint extra keys must be str; got {key!r}")
        _check_plain(value, repr(key))
    meta = {"arch": name, "num_classes": int(num_classes), "in_channels": int(in_channels), **extra}
    if is_py_arch(name):  # your model's code is part of what the weights mean (checked on load)
        meta["code"] = code_identity(name)
    data = checkpoint_bytes(_state_tensors(model), meta)
    atomic_write(path, lambda f: f.write(data))
    log.info("saved %s checkpoint (%d parameters) to %s", name, count_parameters(model), path)
    return path


def _missing_file_error(path: Path, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint not found: {path}. {hint}")


def _torch_load(path: Path, map_location: Any) -> Any:
    # weights_only=True: a checkpoint a user brings is untrusted input, and full unpickling could run arbitrary code.
    try:
        with open(path, "rb") as f:  # a file object: torch decides by content, not by a `.safetensors` name
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises a zoo of types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file: a little-endian u64 header length, then a JSON object.

    Decided by content, not by name: users' files are named ``.pt``, ``.pth``, ``.bin`` and ``.safetensors`` alike.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return size <= os.path.getsize(path) - 8


@dataclass(frozen=True)
class _Weights:
    """What a weights file holds: its tensors (or torch's payload to dig them out of) and kdcache's metadata if any."""

    payload: Any  # safetensors: {name: tensor}; torch: whatever was saved
    meta: dict[str, Any] | None  # a kdcache checkpoint's metadata (without the state_dict), else None


def _read_weights(path: Path, map_location: Any = "cpu") -> _Weights:
    """Read a safetensors or torch weights file (never unpickling code); kdcache's metadata when it is one."""
    if is_safetensors(path):
        from safetensors import safe_open

        device = map_location if isinstance(map_location, str) else "cpu"
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # SafetensorError for a corrupt header or truncated data
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        if META_KEY not in header:
            return _Weights(tensors, None)
        try:
            meta = json.loads(header[META_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable kdcache metadata ({exc})") from exc
        meta.pop("format_version", None)
        return _Weights(tensors, meta)
    payload = _torch_load(path, map_location)
    if isinstance(payload, dict) and all(k in payload for k in _RESERVED_KEYS):  # kdcache's torch.save format
        return _Weights(payload["state_dict"], {k: v for k, v in payload.items() if k != "state_dict"})
    return _Weights(payload, None)


def _first(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in total)"


def _shape_hints(mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]], model: nn.Module) -> list[str]:
    """What a shape mismatch usually means: a classifier for other classes, or a stem for other channels."""
    hints = []
    heads = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for key, file_shape, model_shape in mismatched:
        module = key.rpartition(".")[0]
        if module in heads and file_shape[:1] != model_shape[:1]:
            hints.append(
                f"the checkpoint's classifier {key!r} has {file_shape[0]} outputs but the data set has "
                f"{model_shape[0]} classes: a teacher must predict the data set's classes, so fine-tune it on them "
                "first (e.g. timm's train.py with --num-classes) and point `checkpoint` at the result"
            )
            break
    for key, file_shape, model_shape in mismatched:
        module = key.rpartition(".")[0]
        if module in convs and len(file_shape) == 4 and file_shape[1] != model_shape[1]:
            hints.append(
                f"{key!r} takes {file_shape[1]}-channel images but the data set has {model_shape[1]} channel(s): "
                f"prepare it with {file_shape[1]} channels (ImageFolder and hf sources: "
                f"prepare.options.mode: {'RGB' if file_shape[1] == 3 else 'L'})"
            )
            break
    return hints


def _load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, the first offending keys and the fix."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems, hints = [], []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if not problems:
        mismatched = [
            (k, tuple(getattr(state_dict[k], "shape", ())), tuple(v.shape))
            for k, v in expected.items()
            if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != v.shape
        ]
        if mismatched:
            shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:5])
            problems.append(f"shape mismatches [{shown}] ({len(mismatched)} in total)")
            hints = _shape_hints(mismatched, model)
    if problems:
        fix = " ".join(f"Hint: {h}." for h in hints) or (
            "Check the architecture name, num_classes and in_channels the checkpoint was trained with."
        )
        raise CheckpointError(f"state_dict in {path} does not fit architecture {arch!r}: {'; '.join(problems)}. {fix}")
    model.load_state_dict(state_dict, strict=True)


def _check_arch(path: Path, meta: Mapping[str, Any], expected: str | None) -> str:
    """The canonical architecture a kdcache checkpoint records (it must equal ``expected`` when given)."""
    try:
        stored = canonical_arch(meta["arch"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    if expected is not None and canonical_arch(expected) != stored:
        raise CheckpointError(
            f"checkpoint {path} holds architecture {meta['arch']!r}, but {expected!r} was expected; "
            "fix the architecture in params.yaml or retrain the teacher"
        )
    return stored


def _kdcache_net(path: Path, weights: _Weights, expected_arch: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a kdcache checkpoint's network and load its weights (eval mode)."""
    assert weights.meta is not None
    stored = _check_arch(path, weights.meta, expected_arch)
    num_classes, in_channels = int(weights.meta["num_classes"]), int(weights.meta["in_channels"])
    state = _extract_state_dict(weights.payload, path)
    if stored in EXPORT_ARCHS:  # a model file's checkpoint: the program is its only tensor
        if set(state) != {"program"}:
            raise CheckpointError(f"checkpoint {path} ({stored}) holds {sorted(state)[:5]}, not one program")
        net: nn.Module = program_net(stored, state["program"].numpy().tobytes(), in_channels, str(path))
        net.num_classes = num_classes  # type: ignore[assignment]
        return net.eval(), dict(weights.meta)
    if is_py_arch(stored):
        check_code(stored, weights.meta.get("code"), f"checkpoint {path}")
    model = build_model(stored, num_classes, in_channels)
    _load_strict(model, state, path, stored)
    return model.eval(), dict(weights.meta)


def load_checkpoint(
    path: str | os.PathLike[str], expected_arch: str | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a :func:`save_checkpoint` file: rebuild the stored architecture, load its weights, return it in eval mode.

    Returns ``(model, meta)`` where ``meta`` is the checkpoint's metadata (``arch``, ``num_classes``,
    ``in_channels``, extra). The model is put in ``eval()`` mode because a loaded checkpoint here is a teacher: a
    teacher left in train mode would update its BatchNorm statistics and emit batch-dependent logits; call
    ``.train()`` to fine-tune instead. Reads safetensors checkpoints and the ``torch.save`` ones of earlier versions.

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
    weights = _read_weights(path, map_location)
    if weights.meta is None:
        raise CheckpointError(
            f"{path} is not a kdcache checkpoint (it has no kdcache metadata: {list(_RESERVED_KEYS[:3])}); for a "
            "bare state_dict use load_state_dict_checkpoint(path, arch, num_classes, in_channels)"
        )
    return _kdcache_net(path, weights, expected_arch)


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

    Accepts a safetensors ``state_dict`` (timm's ``model.safetensors``: timm's key names fit ``timm:<name>``), a
    torch file with a bare ``state_dict`` or one wrapped under ``"state_dict"``/``"model"``/``"model_state_dict"``/
    ``"net"`` (e.g. CRD's and DKD's published CIFAR teachers), with DataParallel's ``module.`` prefix stripped, or a
    kdcache checkpoint (whose stored architecture must then equal ``arch``).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, "Set teachers.<name>.checkpoint in params.yaml to an existing state_dict file.")
    weights = _read_weights(path, map_location)
    name = canonical_arch(arch)
    if weights.meta is not None:
        _check_arch(path, weights.meta, arch)
    model = build_model(name, num_classes, in_channels)
    _load_strict(model, _extract_state_dict(weights.payload, path), path, name)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the pipeline's models: checkpoints that carry the model's preprocessing


def save_model(path: str | Path, model: Normalized, arch: str, extra: dict[str, Any] | None = None) -> Path:
    """Checkpoint: the bare net's state_dict + arch + preprocessing (mean/std, input size) + ``extra`` (e.g. top-1)."""
    net = model.net
    meta = {"preprocess": model.preprocess.to_dict(), **(extra or {})}
    num_classes = meta.pop("num_classes", None) or _out_features(net)
    in_channels = int(model.mean.numel())
    return save_checkpoint(path, net, arch=arch, num_classes=num_classes, in_channels=in_channels, extra=meta)


def _out_features(net: nn.Module) -> int:
    if isinstance(net, ProgramNet) and net.num_classes:
        return net.num_classes
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def _recorded_preprocess(meta: Mapping[str, Any], data: DataSpec | None, path: Path) -> Preprocess:
    """The preprocessing a checkpoint records (older ones: only mean/std, i.e. ``preprocess: data``)."""
    if isinstance(meta.get("preprocess"), dict):
        return Preprocess.from_dict(meta["preprocess"])
    mean = meta.get("mean") or (data.mean if data else None)
    std = meta.get("std") or (data.std if data else None)
    if mean is None or std is None:
        raise CheckpointError(f"{path}: checkpoint has no normalisation (mean/std); pass the data set's manifest")
    return Preprocess("data", tuple(mean), tuple(std))


def load_model(
    path: str | Path, expected_arch: str | None = None, data: DataSpec | None = None
) -> tuple[Normalized, dict[str, Any]]:
    """Load a kdcache checkpoint behind its recorded preprocessing; with ``data`` (a manifest), check it fits."""
    net, meta = load_checkpoint(path, expected_arch=expected_arch)
    if data is not None:
        check_fits(meta, data, path)
    return wrap(net, _recorded_preprocess(meta, data, Path(path))), meta


def import_model(path: str | Path, arch: str, data: DataSpec, preprocess: str = "data") -> Normalized:
    """A user's teacher for ``arch`` on ``data``: a kdcache checkpoint, or any weights file of it (see
    :func:`load_state_dict_checkpoint`) behind ``preprocess`` (``"data"`` | ``"model"``, see
    :class:`~pipeline.models.registry.Preprocess`).

    A kdcache checkpoint keeps the preprocessing it was trained with; asking for another is an error naming both.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, "Set teachers.<name>.checkpoint in params.yaml to an existing weights file.")
    name = canonical_arch(arch)
    if name in EXPORT_ARCHS and not is_safetensors(path):
        return _import_program(path, name, data, preprocess)
    if format_of(path) and not is_safetensors(path):
        raise CheckpointError(
            f"checkpoint {path} is {_FILE_KIND[format_of(path)]}, but architecture {arch!r} was given: set the "
            f"teacher's arch to {format_of(path)} (or leave arch out: the extension says it)"
        )
    weights = _read_weights(path)
    if weights.meta is not None:
        net, meta = _kdcache_net(path, weights, arch)
        check_fits(meta, data, path)
        recorded = _recorded_preprocess(meta, data, path)
        if recorded.mode != preprocess:
            raise CheckpointError(
                f"checkpoint {path} was trained with preprocess: {recorded.mode}, but preprocess: {preprocess} was "
                f"asked for; set the teacher's preprocess to {recorded.mode}"
            )
        return wrap(net, recorded)
    p = resolve_preprocess(arch, data, preprocess)
    check_input_size(arch, data, p)
    net = load_state_dict_checkpoint(path, arch=arch, num_classes=data.num_classes, in_channels=data.image_shape[2])
    model = wrap(net, p)
    if is_py_arch(name):  # your code may ignore num_classes: check its head on one batch
        check_output_width(model, data.image_shape, data.num_classes, f"architecture {arch!r} with {path}")
    return model


_FILE_KIND = {"onnx": "an ONNX model file", "export": "a torch.export program (.pt2)"}


def _import_program(path: Path, arch: str, data: DataSpec, preprocess: str) -> Normalized:
    """A ``.pt2`` / ``.onnx`` teacher on ``data`` (`pipeline.models.exported`), checked before any store is written:
    input channels and size, then its logits' width on one batch."""
    h, w, c = data.image_shape
    net = program_net(arch, path.read_bytes(), c, str(path))
    if preprocess == "model":  # the file's own input size; the file carries no mean/std, so the data set's
        size = input_size(net)
        if size is None:
            raise CheckpointError(
                f"{path}: preprocess: model takes the input size from the file, but its input size is dynamic "
                f"{net.input_shape()}; use preprocess: data"
            )
        p = Preprocess("model", tuple(data.mean), tuple(data.std), size)
    else:
        p = Preprocess("data", tuple(data.mean), tuple(data.std))
    if h is not None and w is not None:
        check_program(net, p.input_size or (h, w), c, f"checkpoint {path}")
    net.num_classes = data.num_classes
    model = wrap(net, p)
    check_output_width(model, data.image_shape, data.num_classes, f"{arch} model {path}")
    return model


def check_sees(model: Normalized, data: DataSpec, where: str) -> None:
    """A model file (``.pt2``/``.onnx``) with a fixed input size takes the images ``data`` describes (the view size a
    stage feeds it): checked before any store is written. Other models take any size."""
    h, w, c = data.image_shape
    if isinstance(model.net, ProgramNet) and h is not None and w is not None:
        check_program(model.net, model.input_size or (h, w), c, where)


def check_fits(meta: Mapping[str, Any], data: DataSpec, path: str | Path) -> None:
    """A checkpoint's classes x channels must be the data set's."""
    c = data.image_shape[2]
    if meta.get("num_classes") != data.num_classes or meta.get("in_channels") != c:
        name = getattr(data, "dataset", "the data set")
        raise CheckpointError(
            f"checkpoint {path} is for {meta.get('num_classes')} classes x {meta.get('in_channels')} channels, "
            f"but data set {name} has {data.num_classes} classes x {c} channels"
        )
