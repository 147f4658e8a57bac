"""Teachers that ship as files carrying their own code: ``torch.export`` programs (``.pt2``) and ONNX models (issue 28).

``teachers.<t>: {checkpoint: weights/model.onnx}`` (``arch: onnx`` / ``arch: export``, or inferred from the file's
extension). The file is the model: no architecture to build, no state_dict to fit. :func:`program_net` opens it as
a :class:`ProgramNet`, an ``nn.Module`` that holds the file's bytes as a ``uint8`` buffer named ``program`` (so the
kdcache checkpoint ``train_teacher`` writes carries the program itself, and its sha256 covers it) and runs it:

- ``export``: ``torch.export.load`` (the program's graph and weights; the torch that saved it must not be newer
  than this one), run as the ``GraphModule`` of ``ExportedProgram.module()`` on the input's device;
- ``onnx``: an ``onnxruntime.InferenceSession`` (its CUDA provider when present, else CPU), fed float32 NCHW or
  NHWC (the layout is read from the model's input shape: where the data set's channel count sits).

Preprocessing stays kdcache's (:class:`~pipeline.models.registry.Normalized` around the net): the data set's
mean/std; with ``preprocess: model`` also a resize to the file's fixed input size. :func:`input_size` reads that
size from the file, and :func:`check_program` checks the input shape against the data set before any store is
written (a fixed size other than the images', a channel count other than theirs, several inputs).
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError

__all__ = ["EXPORT_ARCHS", "ProgramNet", "check_program", "format_of", "input_size", "program_net"]

#: the architectures that are files, by extension
EXTENSIONS = {".pt2": "export", ".onnx": "onnx"}
EXPORT_ARCHS = tuple(EXTENSIONS.values())


def format_of(path: str | Path) -> str | None:
    """``"export"`` for a ``.pt2`` file, ``"onnx"`` for ``.onnx``, else None."""
    return EXTENSIONS.get(Path(path).suffix.lower())


class ProgramNet(nn.Module):
    """A model file run as a module; ``program`` (a ``uint8`` buffer) is the file's bytes, the only state."""

    arch = ""

    def __init__(self, program: bytes, in_channels: int, source: str) -> None:
        super().__init__()
        self.register_buffer("program", torch.frombuffer(bytearray(program), dtype=torch.uint8))
        self.in_channels = in_channels
        self.source = source  # the file (or checkpoint) it came from, for messages
        self.num_classes: int | None = None  # set once checked against a data set (save_model records it)

    def input_shape(self) -> tuple[int | None, ...]:
        """The program's input shape in NCHW order, None for a dynamic dimension."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.arch}, {self.program.numel()} bytes from {self.source}"


def _dims(shape: Any) -> tuple[int | None, ...]:
    """A shape with every non-integer (symbolic, named, None) dimension as None."""
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)


class ExportedNet(ProgramNet):
    """A ``torch.export`` program (``torch.export.save``'s ``.pt2``)."""

    arch = "export"

    def __init__(self, program: bytes, in_channels: int, source: str) -> None:
        super().__init__(program, in_channels, source)
        quiet = logging.getLogger("torch.export")  # it logs a failed load's traceback as a warning: ours is one line
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            ep = torch.export.load(io.BytesIO(program))
        except Exception as exc:  # a newer torch's program, a damaged archive: torch raises many types
            raise ConfigError(_export_load_error(program, source, exc)) from exc
        finally:
            quiet.setLevel(level)
        users = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
        if len(users) != 1:
            raise ConfigError(
                f"{source}: the exported program takes {len(users)} inputs; a teacher takes one image batch "
                "(B, C, H, W): export a module whose forward(x) returns logits"
            )
        val = users[0].meta.get("val")
        self._shape = _dims(val.shape) if val is not None else (None,) * 4
        # Not a registered submodule: its weights are in `program` already, and a state_dict holds that only.
        self._run: list[nn.Module] = [ep.module()]

    def input_shape(self) -> tuple[int | None, ...]:
        return self._shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        module = self._run[0]
        first = next(iter(module.parameters()), None)
        if first is not None and first.device != x.device:
            module.to(x.device)
        return module(x)


def _export_load_error(program: bytes, source: str, exc: BaseException) -> str:
    """Why a ``.pt2`` did not load: a newer torch's archive is named as such (with both versions)."""
    text = " ".join(str(exc).split())
    try:
        with zipfile.ZipFile(io.BytesIO(program)) as z:
            names = z.namelist()
            model = next((n for n in names if n.endswith("models/model.json")), None)
            saved = None
            if model is not None:
                import json

                saved = json.loads(z.read(model)).get("schema_version")
    except (zipfile.BadZipFile, ValueError, KeyError):
        return f"{source} is not a torch.export program (.pt2): {text}"
    if saved is not None:
        from torch._export.serde.schema import SCHEMA_VERSION

        ours = tuple(SCHEMA_VERSION)
        theirs = (int(saved.get("major", 0)), int(saved.get("minor", 0)))
        if theirs > ours:
            return (
                f"{source} was saved by a newer torch (export schema {theirs[0]}.{theirs[1]}; this torch "
                f"{torch.__version__} reads up to {ours[0]}.{ours[1]}): export it again with this torch, or install "
                "the torch that saved it"
            )
    return f"{source}: torch.export.load failed: {type(exc).__name__}: {text}"


class OnnxNet(ProgramNet):
    """An ONNX model run by onnxruntime (float32 in, float32 logits out)."""

    arch = "onnx"

    def __init__(self, program: bytes, in_channels: int, source: str) -> None:
        super().__init__(program, in_channels, source)
        try:
            import onnxruntime as ort  # deferred: only ONNX teachers need it
        except ImportError as exc:
            raise ConfigError(f"{source}: ONNX teachers need onnxruntime: pip install onnxruntime") from exc
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # runtime.set_threads' budget, as torch's own ops
        opts.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
        try:
            self._session = ort.InferenceSession(program, opts, providers=providers)
        except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            why = " ".join(str(exc).split())
            raise ConfigError(f"{source} is not an ONNX model onnxruntime can run: {why}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(
                f"{source}: the ONNX model takes {len(inputs)} inputs ({[i.name for i in inputs]}); a teacher takes "
                "one image batch: export a model whose only input is the (B, C, H, W) or (B, H, W, C) images"
            )
        if inputs[0].type != "tensor(float)":
            raise ConfigError(f"{source}: the ONNX model's input is {inputs[0].type}; kdcache feeds float32 images")
        self._input = inputs[0].name
        raw = _dims(inputs[0].shape)
        if len(raw) != 4:
            raise ConfigError(
                f"{source}: the ONNX model's input has shape {inputs[0].shape}; kdcache feeds image batches "
                "(B, C, H, W) or (B, H, W, C)"
            )
        # NHWC when the channel count sits last and not first (TensorFlow/Keras exports); NCHW otherwise.
        self.nhwc = raw[3] == in_channels and raw[1] != in_channels
        self._shape = (raw[0], raw[3], raw[1], raw[2]) if self.nhwc else raw

    def input_shape(self) -> tuple[int | None, ...]:
        return self._shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (out, *_) = self._session.run(None, {self._input: arr})
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


_NETS: dict[str, type[ProgramNet]] = {"export": ExportedNet, "onnx": OnnxNet}


def program_net(arch: str, program: bytes, in_channels: int, source: str) -> ProgramNet:
    """Open ``program`` (a file's bytes) as ``arch`` (``export`` | ``onnx``); ``source`` names it in errors."""
    return _NETS[arch](program, in_channels, source)


def input_size(net: ProgramNet) -> tuple[int, int] | None:
    """The program's fixed input (H, W), None when either is dynamic."""
    _, _, h, w = net.input_shape()
    return (h, w) if h is not None and w is not None else None


def check_program(net: ProgramNet, sees: tuple[int, int], channels: int, where: str) -> None:
    """The program takes one batch of ``channels``-channel images of size ``sees`` (H, W): else a ``ConfigError``."""
    _, c, h, w = net.input_shape()
    if c is not None and c != channels:
        raise ConfigError(
            f"{where}: {net.source} takes {c}-channel images but the data set has {channels}: prepare the data with "
            f"{c} channels (prepare.options.mode) or export the model for {channels}"
        )
    fixed = (h, w) if h is not None and w is not None else None
    if fixed is not None and fixed != tuple(sees):
        raise ConfigError(
            f"{where}: {net.source} takes only {fixed[0]}x{fixed[1]} inputs but would see {sees[0]}x{sees[1]} images: "
            "set preprocess: model (resizes to the file's input size inside the teacher) or export it for "
            f"{sees[0]}x{sees[1]}"
        )
    if (h is None) != (w is None):
        raise ConfigError(f"{where}: {net.source} has a partly dynamic input size {net.input_shape()}; fix H and W")
