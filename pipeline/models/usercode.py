"""Your own model code as an architecture: ``arch: "py:<module>:<callable>"`` (issue 28).

``<module>`` is a path to a ``.py`` file (``py:weights/mynet.py:MyNet``) or a module importable from ``PYTHONPATH``
(``py:mymodels.resnet:resnet18``); ``<callable>`` is a class or function there (dotted for an attribute of an
attribute: ``Nets.small``). kdcache calls it with ``num_classes=`` and ``in_channels=`` when its signature accepts
them (or ``**kwargs``), else with no arguments, and the result must be an ``nn.Module`` mapping a normalized
``(B, in_channels, H, W)`` batch to ``(B, num_classes)`` logits: :func:`check_output_width` runs one batch to
check the width before any work (a callable that ignores ``num_classes`` may build a head of another size).

The defining file is part of the model's identity (:func:`code_identity`: module, callable, file, sha256): a
checkpoint records it, the logit store's teacher fingerprint carries it, and loading a checkpoint whose code has
changed since is refused (:func:`check_code`), so editing your model file can never pair old weights with new
code silently. DVC reruns what a changed file feeds because the file lies in ``weights/`` (``pipeline.inputs``).

A file is imported once per process and content (its module name carries the file's hash), under a private
module name, so two models in files of the same name never collide.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import itertools
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.inputs import PyArch, fingerprint, is_py_arch, parse_py_arch, source_file

__all__ = ["build_py", "check_code", "check_output_width", "code_identity", "code_of", "load_callable"]

_IMPORT_LOCK = threading.Lock()  # dask workers with threads import a user's file once, not once per thread


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import(spec: PyArch) -> ModuleType:
    """Import ``spec``'s module: a file under a name that carries its hash (edited file = new module), else by name."""
    if not spec.is_file:
        source_file(spec)  # a module not on PYTHONPATH: say so, and how to give its file instead
        try:
            return importlib.import_module(spec.module)
        except Exception as exc:  # the user's module may raise anything while it runs
            raise ConfigError(f"architecture {spec.arch!r}: importing {spec.module} failed: {_one_line(exc)}") from exc
    path = source_file(spec)
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"kdcache_py_{stem}_{fingerprint(path)['sha256'][:16]}"
    with _IMPORT_LOCK:
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"architecture {spec.arch!r}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # a SyntaxError, a missing import, anything the file raises at import
            del sys.modules[name]
            raise ConfigError(f"architecture {spec.arch!r}: importing {path} failed: {_one_line(exc)}") from exc
    return module


def load_callable(spec: PyArch) -> Callable[..., Any]:
    """The callable ``spec`` names; a missing one lists what the module defines."""
    obj: Any = _import(spec)
    for part in spec.attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=5, cutoff=0.5)
            raise ConfigError(
                f"architecture {spec.arch!r}: {spec.module} has no {spec.attr!r}; "
                f"{'close matches: ' + str(close) if close else 'it defines: ' + str(names[:12])}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"architecture {spec.arch!r}: {spec.attr} is a {type(obj).__name__}, not a class or function")
    return obj


_GIVEN = ("num_classes", "in_channels")


def _arguments(fn: Callable[..., Any], spec: PyArch, num_classes: int, in_channels: int) -> dict[str, int]:
    """The keyword arguments kdcache gives ``fn``: those of ``num_classes``/``in_channels`` its signature accepts."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C extension without a signature: call it bare
        return {}
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes, "in_channels": in_channels}
    kwargs = {
        k: v
        for k, v in given.items()
        if takes_any or (k in params and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY)
    }
    needed = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and n not in kwargs
    ]
    if needed:
        raise ConfigError(
            f"architecture {spec.arch!r}: {spec.attr}{sig} needs arguments {needed} that kdcache cannot give (it "
            f"passes only {list(_GIVEN)}, when accepted); give them defaults, or add a function to the file that "
            f"builds the model: def build(num_classes, in_channels): return {spec.attr}(...)"
        )
    return kwargs


def build_py(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """Call the user's ``py:`` callable for a data set of ``num_classes`` x ``in_channels`` (see the module doc)."""
    spec = parse_py_arch(arch)
    fn = load_callable(spec)
    kwargs = _arguments(fn, spec, num_classes, in_channels)
    try:
        model = fn(**kwargs)
    except Exception as exc:  # the user's constructor may raise anything
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise ConfigError(f"architecture {spec.arch!r}: {spec.attr}({shown}) failed: {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"architecture {spec.arch!r}: {spec.attr}() returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model


def code_identity(arch: str) -> dict[str, str]:
    """``{"module", "callable", "file", "sha256"}`` of a ``py:`` architecture: what checkpoints and stores record."""
    spec = parse_py_arch(arch)
    path = source_file(spec)
    return {"module": spec.module, "callable": spec.attr, "file": str(path), "sha256": fingerprint(path)["sha256"]}


def code_of(arch: str) -> dict[str, dict[str, str]]:
    """``{"code": code_identity(arch)}`` for a ``py:`` architecture, else ``{}``: what a run's resume fingerprint adds,
    so a state written with other model code is not continued."""
    return {"code": code_identity(arch)} if is_py_arch(arch) else {}


def check_code(arch: str, recorded: dict[str, Any] | None, where: str) -> None:
    """Refuse a checkpoint whose ``py:`` model file changed after it was written (old weights, new code)."""
    if not recorded:
        return
    now = code_identity(arch)
    if now["sha256"] != recorded.get("sha256"):
        raise ConfigError(
            f"{where} was written with {recorded.get('file')} at sha256 {str(recorded.get('sha256'))[:12]}, but that "
            f"code is now {now['file']} at sha256 {now['sha256'][:12]}: the weights may not mean the same network; "
            "rerun the stage that wrote it (`dvc repro` does, as the file lies in weights/) or restore the file"
        )


def check_output_width(
    model: nn.Module, image_shape: tuple[int | None, int | None, int], num_classes: int, what: str
) -> None:
    """Run one batch of 2 blank images through ``model`` and check it returns ``(2, num_classes)`` logits.

    ``image_shape`` is the ``(H, W, C)`` the model will see. Eval mode and no grad, so nothing of the model (BatchNorm
    statistics) changes; the model's mode is restored. A ``ConfigError`` naming ``what`` otherwise.
    """
    h, w, c = image_shape
    if h is None or w is None:
        return  # images of their own sizes reach the model only through a view recipe's fixed output size
    was_training = model.training
    device = next((t.device for t in itertools.chain(model.parameters(), model.buffers())), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, c, h, w, device=device))  # (2, C, H, W) -> (2, num_classes)
    except Exception as exc:  # the user's forward may raise anything
        raise ConfigError(f"{what} cannot run on a batch of {c}x{h}x{w} images: {_one_line(exc)}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"{what} returns a {type(out).__name__}, not a logits tensor: return the (B, num_classes) logits from "
            "forward (wrap the model in a module that picks them out)"
        )
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(
            f"{what} returns logits of shape {tuple(out.shape)} for a batch of 2 images, but the data set has "
            f"{num_classes} classes, so (2, {num_classes}) was expected; build the classifier for num_classes"
        )
