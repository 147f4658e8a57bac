"""Models: the architecture zoo, its registry, checkpoints and batched inference.

Owns: network definitions (one module per family: ``cnn``, ``resnet``, ``wrn``, ``vgg``, ``mobilenet``,
``shufflenet``; torchvision through ``tv:<name>``, timm through ``timm:<name>``), your own code through
``py:<module>:<callable>`` (``usercode``), model files that carry their code (``exported``: ``.pt2``
torch.export programs and ``.onnx`` models run by onnxruntime), the registry (``register_model``,
``build_model``, ``list_models``, ``build_for``, preprocessing), the checkpoint format (safetensors) and the one
atomic checkpoint writer (``checkpoint``), and the input conversion + batched forward pass (``predict``).

May import: torch, safetensors, torchvision, timm and onnxruntime (the last three lazily), the core
(``pipeline.config``, ``pipeline.runtime``, ``pipeline.inputs``: where a ``py:`` model's file is). Nothing else of
the pipeline: data sets are described to it by the ``DataSpec`` protocol (a manifest is one).

Add a model family: a module here whose factories carry ``@register_model``; import it below.
"""

from __future__ import annotations

# Importing the families registers their architectures (decorators run at import).
from . import cnn, mobilenet, resnet, shufflenet, vgg, wrn  # noqa: F401
from .checkpoint import (
    CheckpointError,
    atomic_write,
    import_model,
    is_safetensors,
    load_checkpoint,
    load_model,
    load_state_dict_checkpoint,
    save_checkpoint,
    save_model,
)
from .predict import predict_arrays, to_input
from .registry import (
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    DataSpec,
    Normalized,
    Preprocess,
    build_for,
    build_model,
    canonical_arch,
    count_parameters,
    list_models,
    pretrained_source,
    register_model,
    resolve_preprocess,
)

__all__ = [
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "CheckpointError",
    "DataSpec",
    "Normalized",
    "Preprocess",
    "atomic_write",
    "build_for",
    "build_model",
    "canonical_arch",
    "count_parameters",
    "import_model",
    "is_safetensors",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_state_dict_checkpoint",
    "predict_arrays",
    "pretrained_source",
    "register_model",
    "resolve_preprocess",
    "save_checkpoint",
    "save_model",
    "to_input",
]
