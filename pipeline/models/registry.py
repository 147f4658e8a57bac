"""The model registry: architectures registered where they are defined, built by name for a data set.

A family module decorates each factory with :func:`register_model` (as timm's ``register_model``)::

    @register_model(aliases=("mobile_half",))
    def mobilenetv2(num_classes: int, in_channels: int = 3) -> nn.Module: ...

:func:`build_model` then builds any registered name (hyphenated spellings such as ``wrn-40-2`` and the CRD
repository's names such as ``ShuffleV1`` are accepted too), ``tv:<name>`` for any torchvision classification
model (always with ``weights=None``: nothing is ever downloaded), ``timm:<name>`` for any timm (PyTorch Image
Models) architecture, optionally with a pretrained tag such as ``timm:resnet18.a1_in1k`` (always built with
``pretrained=False``: weights come only from a local checkpoint), ``py:<module>:<callable>`` for your own model
code (`pipeline.models.usercode`), and :func:`list_models` lists them
(``kdcache models``). :func:`build_for` wraps a fresh network in :class:`Normalized`, its preprocessing
(:class:`Preprocess`: the data set's per-channel normalisation, or with ``preprocess="model"`` a timm model's
own input size, interpolation and mean/std from its ``pretrained_cfg``), which is how every teacher and
student of the pipeline is built.

Every network maps a normalized float batch ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

import torch
import torch.nn.functional as nnf
from torch import nn

from pipeline.config import ConfigError
from pipeline.inputs import is_py_arch, parse_py_arch

from .exported import EXPORT_ARCHS
from .usercode import build_py, check_output_width

__all__ = [
    "PREPROCESS_MODES",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "DataSpec",
    "Normalized",
    "Preprocess",
    "build_for",
    "build_model",
    "canonical_arch",
    "count_parameters",
    "list_models",
    "pretrained_source",
    "register_model",
    "resolve_preprocess",
]

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"

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


def _timm() -> Any:
    try:
        import timm  # deferred: importing timm costs seconds and only `timm:` architectures need it
    except ImportError as exc:  # a dependency of kdcache, but a hand-made environment may lack it
        raise ValueError("`timm:` architectures need the timm package: pip install timm (see pyproject.toml)") from exc
    return timm


def _timm_name(arch: str, name: str) -> str:
    """``name`` (``<architecture>[.<pretrained tag>]``) checked against timm's registry; close matches on a miss."""
    timm = _timm()
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6)
        hint = f"close matches: {close}" if close else "no close match"
        raise ValueError(
            f'unknown timm model {base!r} in {arch!r}; {hint}. `python -c "import timm; print(timm.list_models('
            f"'{base[:3]}*'))\"` lists timm's architectures"
        )
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
            close = difflib.get_close_matches(tag, tags, n=8, cutoff=0.3) or tags[:8]
            raise ValueError(
                f"timm model {base!r} has no pretrained tag {tag!r} (in {arch!r}); its tags: {close}"
                f"{' ...' if len(tags) > len(close) else ''}"
            ) from None
    return name


def canonical_arch(arch: str) -> str:
    """The registry name for ``arch``: ``'WRN-40-2'`` -> ``'wrn_40_2'``, ``'ShuffleV1'`` -> ``'shufflenetv1'``.

    ``tv:<name>`` and ``timm:<name>`` are returned with ``<name>`` lower-cased. Unknown names raise ``ConfigError``
    (a ``ValueError``) listing the options (for timm: the closest of its architecture names).
    """
    if not isinstance(arch, str) or not arch.strip():
        raise ConfigError(f"architecture must be a non-empty string; got {arch!r}")
    name = arch.strip()
    if is_py_arch(name):
        return parse_py_arch(name).arch  # your own code: the file or module is found (and imported) when built
    if name.lower() in EXPORT_ARCHS:
        return name.lower()  # a model file (.pt2, .onnx): opened from its checkpoint, never built
    if name.lower().startswith(TIMM_PREFIX):
        return TIMM_PREFIX + _timm_name(arch, name[len(TIMM_PREFIX) :].strip().lower())
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
            f"(hyphenated aliases such as 'wrn-40-2' work too), '{TORCHVISION_PREFIX}<name>' for a torchvision "
            f"model, e.g. '{TORCHVISION_PREFIX}resnet18', or '{TIMM_PREFIX}<name>' for a timm model, e.g. "
            f"'{TIMM_PREFIX}resnet18.a1_in1k'"
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


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A timm model at random init, sized by timm itself (``num_classes``, ``in_chans``); never downloads anything."""
    return _timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build ``arch`` (a registered name, an alias such as ``wrn-40-2``, ``tv:<torchvision name>`` or ``timm:<name>``).

    The model maps a normalized float batch ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``; weights are
    randomly initialised. Raises ``ValueError`` for an unknown name (listing the available ones) or bad sizes.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int; got {in_channels!r}")
    name = canonical_arch(arch)
    if is_py_arch(name):
        return build_py(name, num_classes, in_channels)
    if name in EXPORT_ARCHS:
        raise ConfigError(
            f"architecture {arch!r} is a model file, not something kdcache builds: give the file as a teacher's "
            "checkpoint (teachers.<t>.checkpoint: weights/model.onnx); a student must be an architecture it can train"
        )
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX) :], num_classes, in_channels)
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


PREPROCESS_MODES = ("data", "model")

# timm's interpolation names -> torch.nn.functional.interpolate modes. torch has no Lanczos: bicubic is the
# closest kernel it has (timm's own tensor transforms make the same substitution).
_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "lanczos": "bicubic"}


@dataclass(frozen=True)
class Preprocess:
    """How a float image batch in [0, 1] becomes the network's input: an optional resize, then ``(x - mean) / std``.

    ``mode="data"``: the data set's own image size and per-channel statistics (the training split's mean/std from
    the manifest). ``mode="model"``: a timm model's ``pretrained_cfg`` (``input_size``, ``interpolation``, ``mean``,
    ``std``), i.e. the inputs its published weights were trained on. The whole image is resized to ``input_size``
    (no centre crop: a small data set's image is the whole frame). ``input_size=None`` means no resize.
    """

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None = None  # (H, W) the network sees
    interpolation: str = "bilinear"  # a torch.nn.functional.interpolate mode

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (checkpoint metadata, the logit store's teacher fingerprint)."""
        return {
            "mode": self.mode,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "input_size": list(self.input_size) if self.input_size else None,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        size = d.get("input_size")
        return cls(
            mode=str(d.get("mode", "data")),
            mean=tuple(float(m) for m in d["mean"]),
            std=tuple(float(s) for s in d["std"]),
            input_size=(int(size[0]), int(size[1])) if size else None,
            interpolation=str(d.get("interpolation", "bilinear")),
        )


def _timm_cfg(name: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a canonical ``timm:<name>``, from timm's registry (nothing is fetched)."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX) :])
    if cfg is not None:
        return cfg.to_dict()
    with torch.device("meta"):  # no registered cfg: the model's own default, built without allocating weights
        return dict(timm.create_model(name[len(TIMM_PREFIX) :], pretrained=False).pretrained_cfg)


def resolve_preprocess(arch: str, data: DataSpec, mode: str = "data") -> Preprocess:
    """The :class:`Preprocess` of ``arch`` on ``data`` for ``mode`` (``"data"`` or ``"model"``, see there).

    With ``"model"`` and a grayscale data set, timm's 3-channel mean/std are averaged into one (timm adapts a
    pretrained RGB stem to ``in_chans=1`` by summing its filters over the colour channels, i.e. it treats gray as
    R = G = B). Raises ``ValueError`` for an unknown mode or ``"model"`` on an architecture without a
    ``pretrained_cfg`` (only timm models have one).
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(
            f"preprocess must be one of {list(PREPROCESS_MODES)} ('data': the data set's image size and mean/std; "
            f"'model': the timm model's pretrained_cfg); got {mode!r}"
        )
    h, w, c = data.image_shape
    if mode == "data":
        return Preprocess("data", tuple(data.mean), tuple(data.std))
    name = canonical_arch(arch)
    if not name.startswith(TIMM_PREFIX):
        raise ValueError(
            f"preprocess: model takes the input size and mean/std from a timm model's pretrained_cfg, but {arch!r} "
            f"is not a timm model ('{TIMM_PREFIX}<name>'); use preprocess: data"
        )
    cfg = _timm_cfg(name)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != c:
        if c != 1:
            raise ValueError(f"{arch}: pretrained_cfg has {len(mean)}-channel mean/std, the data set has {c} channels")
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    _, ih, iw = cfg["input_size"]
    interp = str(cfg.get("interpolation") or "bilinear")
    if interp not in _INTERPOLATION:
        raise ValueError(f"{arch}: pretrained_cfg interpolation {interp!r} is not one of {sorted(_INTERPOLATION)}")
    return Preprocess("model", mean, std, (int(ih), int(iw)), _INTERPOLATION[interp])


def pretrained_source(arch: str) -> str:
    """Where ``arch``'s published weights come from, for the error that ``pretrained: true`` without a file raises."""
    name = canonical_arch(arch)
    if name.startswith(TIMM_PREFIX):
        cfg = _timm_cfg(name)
        if cfg.get("hf_hub_id"):
            hub = cfg["hf_hub_id"]
            return (
                f"timm publishes {arch} as model.safetensors in the Hugging Face Hub repository {hub!r} "
                f"(`hf download {hub} model.safetensors --local-dir weights/` on a machine with internet)"
            )
        if cfg.get("url"):
            return f"timm publishes {arch} at {cfg['url']}"
        return f"timm lists no published weights for {arch}"
    if name.startswith(TORCHVISION_PREFIX):
        return f"torchvision publishes weights for {arch} (torchvision.models.get_model_weights('{name[3:]}'))"
    return f"{arch} is a kdcache zoo architecture: it has no published weights, train it (drop `pretrained`)"


class Normalized(nn.Module):
    """``net((resize(x) - mean) / std)`` for x (B, C, H, W) in [0, 1].

    Inputs everywhere in kdcache are float images in [0, 1] at the data set's size
    (`pipeline.models.predict.to_input`); each model carries its own preprocessing (:class:`Preprocess`: mean/std
    as buffers, the optional resize to the network's input size as attributes), so a checkpoint is self-contained
    and a teacher and a student can never disagree on what an image is: each receives the same image and
    prepares it for its own network.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: Sequence[int] | None = None,
        interpolation: str = "bilinear",
        mode: str = "data",
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._stats = (tuple(float(m) for m in mean), tuple(float(v) for v in std))  # exact, for the records
        self.input_size = (int(input_size[0]), int(input_size[1])) if input_size else None
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest; got {interpolation!r}")
        self.interpolation = interpolation
        self.mode = mode

    @property
    def preprocess(self) -> Preprocess:
        """This wrapper's preprocessing (what checkpoints and the store's teacher fingerprint record)."""
        return Preprocess(self.mode, *self._stats, self.input_size, self.interpolation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:  # (B, C, H, W) -> (B, C, h, w)
            smooth = self.interpolation != "nearest"
            x = nnf.interpolate(
                x,
                size=self.input_size,
                mode=self.interpolation,
                align_corners=False if smooth else None,
                antialias=smooth,  # shrinking without antialiasing aliases; PIL (timm's eval transform) filters too
            )
            if self.interpolation == "bicubic":
                x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output is clipped to the pixel range
        return self.net((x - self.mean) / self.std)


def wrap(net: nn.Module, preprocess: Preprocess) -> Normalized:
    """``net`` behind ``preprocess``."""
    p = preprocess
    return Normalized(net, p.mean, p.std, p.input_size, p.interpolation, p.mode)


def check_input_size(arch: str, data: DataSpec, preprocess: Preprocess) -> None:
    """A timm model with ``fixed_input_size`` (ViTs and other models with position embeddings) takes one size only."""
    name = canonical_arch(arch)
    if not name.startswith(TIMM_PREFIX):
        return
    cfg = _timm_cfg(name)
    size = preprocess.input_size or tuple(data.image_shape[:2])
    want = tuple(int(v) for v in cfg["input_size"][1:])
    if cfg.get("fixed_input_size") and tuple(size) != want:
        raise ValueError(
            f"{arch} takes only {want[0]}x{want[1]} inputs (fixed_input_size in its pretrained_cfg), but it would see "
            f"{size[0]}x{size[1]} images: set preprocess: model (resizes inside the model) or pick a model without a "
            "fixed input size"
        )


def build_for(arch: str, data: DataSpec, preprocess: str = "data") -> Normalized:
    """A freshly initialised ``arch`` sized for the data set (classes, channels) behind its preprocessing.

    ``preprocess``: ``"data"`` (the data set's image size and mean/std) or ``"model"`` (a timm model's
    ``pretrained_cfg``: resize to its input size, its mean/std); see :class:`Preprocess`.
    """
    h, w, c = data.image_shape
    p = resolve_preprocess(arch, data, preprocess)
    check_input_size(arch, data, p)
    model = wrap(build_model(arch, data.num_classes, c), p)
    if is_py_arch(arch):  # your code may ignore num_classes: check its head on one batch
        check_output_width(model, data.image_shape, data.num_classes, f"architecture {arch!r}")
    return model
