"""The model registry: architectures registered where they are defined, built by name for a data set.

A family module decorates each factory with :func:`register_model` (as timm's ``register_model``)::

    @register_model(aliases=("mobile_half",))
    def mobilenetv2(num_classes: int, in_channels: int = 3) -> nn.Module: ...

:func:`build_model` then builds any registered name (hyphenated spellings such as ``wrn-40-2`` and the CRD
repository's names such as ``ShuffleV1`` are accepted too), ``tv:<name>`` for any torchvision classification
model (always with ``weights=None``: nothing is ever downloaded), and :func:`list_models` lists them
(``kdcache models``). :func:`build_for` wraps a fresh network in :class:`Normalized`, the data set's
per-channel normalisation, which is how every teacher and student of the pipeline is built.

Every network maps a normalized float batch ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, overload

import torch
from torch import nn

from pipeline.config import ConfigError

__all__ = [
    "TORCHVISION_PREFIX",
    "DataSpec",
    "Normalized",
    "build_for",
    "build_model",
    "canonical_arch",
    "count_parameters",
    "list_models",
    "register_model",
]

TORCHVISION_PREFIX = "tv:"

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_MODELS: dict[str, Factory] = {}  # registry name -> factory(num_classes, in_channels)
_ALIASES: dict[str, str] = {}  # other code bases' names (lower-case, '-' -> '_') -> registry name


@overload
def register_model(fn: F) -> F: ...
@overload
def register_model(*, aliases: Sequence[str] = ()) -> Callable[[F], F]: ...
def register_model(fn: F | None = None, *, aliases: Sequence[str] = ()) -> F | Callable[[F], F]:
    """Register ``fn(num_classes, in_channels=3) -> nn.Module`` under its function name (and ``aliases``)."""

    def add(f: F) -> F:
        name = f.__name__
        if name in _MODELS or name in _ALIASES:
            raise ValueError(f"model {name!r} is registered twice ({_MODELS.get(name)} and {f})")
        _MODELS[name] = f
        for alias in aliases:
            _ALIASES[alias] = name
        return f

    return add(fn) if fn is not None else add


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style ``pattern`` (e.g. ``"resnet*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Factory:
    """The factory registered under ``name`` (a canonical name, see :func:`canonical_arch`)."""
    return _MODELS[name]


def _torchvision_names() -> list[str]:
    import torchvision.models  # deferred: importing torchvision costs ~1 s and most runs never need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def canonical_arch(arch: str) -> str:
    """The registry name for ``arch``: ``'WRN-40-2'`` -> ``'wrn_40_2'``, ``'ShuffleV1'`` -> ``'shufflenetv1'``.

    ``tv:<name>`` is returned with ``<name>`` lower-cased. Unknown names raise ``ConfigError`` (a ``ValueError``)
    listing the options.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise ConfigError(f"architecture must be a non-empty string; got {arch!r}")
    name = arch.strip()
    if name.lower().startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :].strip().lower()
        available = _torchvision_names()
        if tv_name not in available:
            raise ConfigError(f"unknown torchvision model {tv_name!r} in {arch!r}; available: {available}")
        return TORCHVISION_PREFIX + tv_name
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _MODELS:
        raise ConfigError(
            f"unknown architecture {arch!r}; available: {list_models()} "
            f"(hyphenated aliases such as 'wrn-40-2' work too), or '{TORCHVISION_PREFIX}<name>' for a torchvision "
            f"model, e.g. '{TORCHVISION_PREFIX}resnet18'"
        )
    return key


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision classification model with random weights (``weights=None``: never downloads anything)."""
    import torchvision.models

    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        # Their auxiliary heads make the training-mode output a namedtuple; every caller here expects plain logits.
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True  # the models' own init, stated explicitly (silences a FutureWarning)
    model = torchvision.models.get_model(name, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the stem convolution (the first Conv2d registered) for one taking ``in_channels`` inputs.

    torchvision's classifiers register their stem first, so this is the layer that sees the image; everything else
    (kernel, stride, padding, bias) is kept.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                1,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return
    raise ValueError(f"cannot adapt torchvision model {name!r} to in_channels={in_channels}: no plain stem Conv2d")


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build ``arch`` (a registered name, an alias such as ``wrn-40-2``, or ``tv:<torchvision name>``).

    The model maps a normalized float batch ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``; weights are
    randomly initialised. Raises ``ValueError`` for an unknown name (listing the available ones) or bad sizes.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int; got {in_channels!r}")
    name = canonical_arch(arch)
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (BatchNorm affine weights included, buffers excluded), as papers report it."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# the pipeline's models: a zoo network behind the data set's normalisation


class DataSpec(Protocol):
    """What building a model for a data set needs to know of it (a `pipeline.data.shards.Manifest` is one)."""

    @property
    def num_classes(self) -> int: ...

    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: list[float]
    std: list[float]


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for x (B, C, H, W) in [0, 1].

    Inputs everywhere in kdcache are float images in [0, 1] (`pipeline.models.predict.to_input`); each
    model carries its own per-channel normalisation (the training split's mean/std from the manifest) as
    buffers, so a checkpoint is self-contained and a teacher and a student can never disagree on
    preprocessing.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_for(arch: str, data: DataSpec) -> Normalized:
    """A freshly initialised ``arch`` sized for the data set (classes, channels) with its normalisation."""
    h, w, c = data.image_shape
    return Normalized(build_model(arch, data.num_classes, c), data.mean, data.std)
