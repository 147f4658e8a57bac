"""Typed views of `params.yaml`: one frozen dataclass per section.

`params.yaml` is the single source of hyperparameters; each DVC stage reads only its own top-level
section (stage name == `stages/` module == section), plus the shared `teachers` zoo where a stage
is parametrised by a teacher. Unknown keys are errors that list the valid ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params.yaml section that cannot be used as written."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read the whole params file (a dict of sections)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; run from the project root or pass --params PATH")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One top-level section; a missing section is an error naming the ones present."""
    if name not in params:
        raise ConfigError(f"params.yaml has no section '{name}'; sections present: {sorted(params)}")
    return params[name] or {}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Build nested dataclasses from dicts; leave other values as YAML gave them."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, where)
        return value
    if origin is dict and isinstance(value, dict):
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value) if origin is tuple else list(value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)  # YAML reads 5e-4 as a string and 1 as an int
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required keys
        raise ConfigError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class PrepareConfig:
    """`prepare`: read a source data set and write WebDataset shards + manifest."""

    name: str = "fashion_mnist"  # data set name: shards go to data/shards/<name>
    source: str = "fashion_mnist"  # reader in pipeline.data.sources.SOURCES
    root: str = "/usr/share/datasets/fashion-mnist"
    options: dict[str, Any] = field(default_factory=dict)
    shard_size: int = 5000  # samples per tar shard == rows per logit-store shard
    splits: tuple[str, ...] = ("train", "test")
    limit: int | None = None  # keep the first n samples of each split (quick runs)
    shuffle_seed: int | None = 0  # permute the train split once before sharding (None: keep source order)


@dataclass(frozen=True)
class OptimConfig:
    """SGD + schedule shared by teacher and student training."""

    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[int, ...] = ()  # for `step`: epochs where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything the one training loop needs besides the model and the loss."""

    epochs: int = 3
    batch_size: int = 128
    workers: int = 1
    shuffle_buffer: int = 2000
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 1  # test accuracy every n epochs (0: only at the end)


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of the shared `teachers` zoo.

    Either a demo teacher trained by `train_teacher` (arch + training recipe), or your own model:
    `checkpoint:` pointing at a kdcache checkpoint or a `state_dict` (safetensors, or a torch `.pth`;
    `arch` says how to rebuild it, e.g. `timm:resnet50`), which `train_teacher` imports instead of training.
    """

    arch: str
    checkpoint: str | None = None
    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 128
    # data: the data set's image size and mean/std | model: a timm model's pretrained_cfg (input size, mean/std,
    # interpolation), the inputs its published weights expect; recorded in the store's teacher fingerprint.
    preprocess: str = "data"
    pretrained: bool = False  # published weights: never downloaded, so this needs `checkpoint:` (the local file)

    def train_config(self, shared: TrainConfig) -> TrainConfig:
        """The shared `train_teacher.train` recipe with this teacher's epochs, batch size and learning rate."""
        optim = dataclasses.replace(shared.optim, lr=self.lr)
        return dataclasses.replace(shared, epochs=self.epochs, batch_size=self.batch_size, optim=optim)


@dataclass(frozen=True)
class TrainTeacherConfig:
    """`train_teacher`: shared recipe for the demo teachers (per-teacher values live in `teachers`)."""

    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class AugmentConfig:
    """`teach.augment`: the random views 1..V-1 (view 0 is the plain image): crop with zero padding, flip."""

    pad: int = 4
    flip: bool = True


@dataclass(frozen=True)
class TeachConfig:
    """`teach`: run each teacher once over the shards and cache raw logits."""

    views: int = 2  # cached augmentation views per sample (view 0 = plain image)
    test_views: int = 1
    view_seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dtype: str = "float16"  # float16 | float32
    batch_size: int = 512
    chunk_rows: int = 1000  # zarr chunk rows (inner chunks of one store shard)
    compressor: str = "blosc-zstd"  # blosc-zstd | zstd | none
    topk: int = 0  # 0 = dense logits; k > 0 = top-k layout
    budget: int | None = None  # max teacher calls (sample-views) on the train split; None = all
    strategy: str = "random"  # random | class_balanced
    budget_seed: int = 0
    threads: int | None = None
    cluster: str = "none"  # none (one process) | local (dask LocalCluster) | scheduler address tcp://host:8786
    workers: int = 2  # LocalCluster worker processes (cluster: local); teach.threads is split among them


@dataclass(frozen=True)
class DistillConfig:
    """`distill`: train students on shards joined with cached logits."""

    teachers: tuple[str, ...] = ("cnn",)
    losses: tuple[str, ...] = ("ce", "kd")
    budgets: tuple[Any, ...] = ("full",)
    seeds: tuple[int, ...] = (0,)
    student: str = "cnn_tiny"
    student_preprocess: str = "data"  # data | model (a timm student's pretrained_cfg; see TeacherSpec.preprocess)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    unqueried: str = "drop"  # drop | ce  (budget runs: what to do with rows the teacher never saw)
    pool_epoch_samples: int | None = None  # budget runs (queried pool): draws per epoch (None: the split's N)
    teacher_source: str = "cache"  # cache | online


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: test-split metrics per student."""

    batch_size: int = 1000
    topk: tuple[int, ...] = (1, 5)


@dataclass(frozen=True)
class ReportConfig:
    """`report`: aggregate metrics into tables and figures."""

    title: str = "kdcache report"


def student_id(teacher: str, loss: str, budget: str | int, seed: int) -> str:
    """The name of one distill matrix item: `<teacher>-<loss>-<budget>-<seed>` (as dvc.yaml spells it)."""
    return f"{teacher}-{loss}-{budget}-{seed}"


def student_ids(distill: DistillConfig) -> set[str]:
    """Every student of the distill matrix (teachers x losses x budgets x seeds)."""
    return {
        student_id(t, loss, b, seed)
        for t in distill.teachers
        for loss in distill.losses
        for b in distill.budgets
        for seed in distill.seeds
    }


def teachers_section(params: dict[str, Any]) -> dict[str, TeacherSpec]:
    """The shared teacher zoo: name -> TeacherSpec."""
    raw = section(params, "teachers")
    return {name: from_dict(TeacherSpec, spec or {}, f"teachers.{name}") for name, spec in raw.items()}


def teacher_spec(params: dict[str, Any], name: str) -> TeacherSpec:
    zoo = teachers_section(params)
    if name not in zoo:
        raise ConfigError(f"unknown teacher '{name}'; teachers in params.yaml: {sorted(zoo)}")
    return zoo[name]


def load_section(cls: type[T], name: str, params_path: str | Path = DEFAULT_PARAMS) -> T:
    """Read `params.yaml` and return section `name` as dataclass `cls`."""
    return from_dict(cls, section(load_params(params_path), name), name)
