"""Typed views of `params.yaml`: one frozen dataclass per section, every value checked when it is read.

`params.yaml` is the single source of hyperparameters; each DVC stage reads only its own top-level
section (stage name == `stages/` module == section), plus the shared `teachers` zoo where a stage
is parametrised by a teacher. `from_dict` checks every value against its field's annotation: the type
(`int`, `float`, `bool`, `str`, lists, mappings, nested sections), the choices (`Literal[...]`) and the
bounds declared on the field (`Annotated[int, Range(gt=0)]`, spelled `PosInt`), and names the key's full
path in the error: `prepare.shard_size: expected a positive integer, got 'abc'`. Unknown keys are
errors that list the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from pipeline.errors import UserError

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError, ValueError):
    """A params.yaml section that cannot be used as written; `where` is the key's path (`prepare.shard_size`)."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """Prefix a `ConfigError` raised inside (one that names no params key yet) with `where`, the key whose value
    caused it: `build_for(cfg.student, ...)` inside `naming("distill.student")` fails as `distill.student: ...`."""
    try:
        yield
    except ConfigError as e:
        if e.where:
            raise
        raise ConfigError(f"{where}: {e}", where=where) from e
    except ValueError as e:  # a checkpoint the entry names that cannot be used (models' CheckpointError)
        if type(e).__name__ != "CheckpointError" or str(e).startswith(where):
            raise
        raise type(e)(f"{where}: {e}") from e


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read the whole params file (a dict of sections)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; run from the project root or pass --params PATH")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One top-level section; a missing section is an error naming the ones present."""
    if name not in params:
        raise ConfigError(f"params.yaml has no section '{name}'; sections present: {sorted(params)}")
    return params[name] or {}


# ---------------------------------------------------------------------------------------------
# the checks: per-field bounds, and one walk over the annotations


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, declared on it: `Annotated[int, Range(gt=0)]`."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, v: float) -> bool:
        return not (
            (self.gt is not None and not v > self.gt)
            or (self.ge is not None and not v >= self.ge)
            or (self.lt is not None and not v < self.lt)
            or (self.le is not None and not v <= self.le)
        )

    def words(self, noun: str) -> str:
        """'a positive integer', 'a non-negative number', 'a number in [0, 1)'..."""
        if (self.gt, self.ge, self.lt, self.le) == (0, None, None, None):
            return f"a positive {noun}"
        if (self.gt, self.ge, self.lt, self.le) == (None, 0, None, None):
            return f"a non-negative {noun}"
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else "(-inf"
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else "inf)"
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun} in {low}, {high}"


@dataclass(frozen=True)
class NonEmpty:
    """A string or list field that must not be empty: `Annotated[str, NONEMPTY]`."""


NONEMPTY = NonEmpty()
PosInt = Annotated[int, Range(gt=0)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # momentum, label smoothing
Name = Annotated[str, NONEMPTY]


def _split_annotated(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is Annotated:
        base, *marks = typing.get_args(tp)
        return base, tuple(marks)
    return tp, ()


def describe(tp: Any) -> str:
    """What a value of annotation `tp` must be, in words ("a positive integer", "one of ['a', 'b']")."""
    tp, marks = _split_annotated(tp)
    origin = typing.get_origin(tp)
    ranges = [m for m in marks if isinstance(m, Range)]
    nonempty = any(isinstance(m, NonEmpty) for m in marks)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if origin is Literal:
        choices = list(typing.get_args(tp))
        return repr(choices[0]) if len(choices) == 1 else f"one of {choices}"
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + parts)
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        noun = "integer" if tp is int else "number"
        return ranges[0].words(noun) if ranges else f"{'an' if tp is int else 'a'} {noun}"
    if tp is str:
        return "a non-empty string" if nonempty else "a string"
    if origin in (tuple, list):
        return "a non-empty list" if nonempty else "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {describe(tp)}, got {value!r}", where=where)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against annotation `tp` and build what the dataclass holds (nested sections, tuples).

    Raises ConfigError naming `where` (the key's full path) and what the value must be.
    """
    annotated = tp
    tp, marks = _split_annotated(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _fail(where, annotated, value)
    if origin is Literal:
        # `type(value) is type(c)`: YAML's `true` must not pass for a choice 1, nor 1 for 1.0
        if any(value == c and type(value) is type(c) for c in typing.get_args(tp)):
            return value
        raise _fail(where, annotated, value)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(annotated, tp, value, where)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML mapping (`optim:`) reads as null: the defaults
            value = {}
        if not isinstance(value, dict):
            raise _fail(where, annotated, value)
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, annotated, value)
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(where, annotated, value)
        out: Any = value
    elif tp is float:
        out = _as_float(value)
        if out is None:
            raise _fail(where, annotated, value)
    elif tp is str:
        if not isinstance(value, str):
            raise _fail(where, annotated, value)
        out = value
    elif origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, annotated, value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}", where=where)
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            item = args[0] if args else Any
            items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        out = tuple(items) if origin is tuple else items
    elif origin is dict:
        if value is None:  # `options:` with nothing under it
            value = {}
        if not isinstance(value, dict):
            raise _fail(where, annotated, value)
        kt, vt = typing.get_args(tp) or (Any, Any)
        out = {_coerce(kt, k, f"{where} key {k!r}"): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"{where}: config annotation {tp!r} is not supported by pipeline.config._coerce")
    for mark in marks:
        if isinstance(mark, Range) and not mark.holds(out):
            raise _fail(where, annotated, value)
        if isinstance(mark, NonEmpty) and len(out) == 0:
            raise _fail(where, annotated, value)
    return out


def _as_float(value: Any) -> float | None:
    """A finite float from an int, a float or a numeric string (YAML 1.1 reads `5e-4` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _coerce_union(annotated: Any, tp: Any, value: Any, where: str) -> Any:
    """The first member of the union that accepts `value`; an error from inside a nested value is kept."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _fail(where, annotated, value)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, where)
        except ConfigError as e:
            if e.where != where:  # the value had the member's shape but something inside it is wrong
                raise
    raise _fail(where, annotated, value)


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Instantiate dataclass `cls` from `data`, checking every value; unknown keys list the valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}", where=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}", where=where)
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}", where=where)
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check across fields (`__post_init__`, `key: problem`): name where the key sits
        if e.where:
            raise
        msg = str(e)
        head = msg.split(":", 1)[0]
        path = f"{where}.{head}" if head in fields else where
        raise ConfigError(f"{where}.{msg}" if head in fields else f"{where}: {msg}", where=path) from None


# ---------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class PrepareConfig:
    """`prepare`: read a source data set and write WebDataset shards + manifest."""

    name: Name = "fashion_mnist"  # data set name: shards go to data/shards/<name>
    source: Name = "fashion_mnist"  # a key of pipeline.data.sources.SOURCES (one module per source)
    root: str | None = "/usr/share/datasets/fashion-mnist"
    options: dict[str, Any] = field(default_factory=dict)
    shard_size: PosInt = 5000  # samples per tar shard == rows per logit-store shard
    splits: Annotated[tuple[Name, ...], NONEMPTY] = ("train", "test")
    limit: PosInt | None = None  # keep the first n samples of each split (quick runs)
    shuffle_seed: NonNegInt | None = 0  # permute the train split once before sharding (None: keep source order)
    # keep: shards hold a JPEG/PNG file's own bytes (ImageFolder; decoded at load time); png: decode and store
    # every image as a lossless PNG. Sources of arrays (IDX, CIFAR pickles, synthetic, hf) always store PNGs.
    encode: Literal["keep", "png"] = "keep"
    # Validation split carved out of train (seeded, class-stratified): a fraction in (0, 1) or a count of
    # images; 0 or None = no validation split (checkpoints are then the last epoch's).
    val: Fraction | NonNegInt | None = 0.1
    val_seed: NonNegInt = 0


@dataclass(frozen=True)
class OptimConfig:
    """SGD + schedule shared by teacher and student training."""

    lr: PosFloat = 0.05
    momentum: Fraction = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[PosInt, ...] = ()  # for `step`: epochs where lr *= gamma
    gamma: PosFloat = 0.1
    warmup_epochs: NonNegFloat = 0.0
    label_smoothing: Fraction = 0.0  # teacher training only; a student's loss smooths its own CE (loss_params)
    grad_clip: PosFloat | None = None


DEFAULT_EPOCHS = 3


@dataclass(frozen=True)
class TrainConfig:
    """Everything the one training loop needs besides the model and the loss.

    Length: `steps` optimizer steps exactly, or `epochs` passes over the data raised to at least
    `min_steps` steps (so a small data set still gets enough updates); neither = 3 epochs. See
    `pipeline.training.schedule.resolve_schedule`.
    """

    epochs: PosInt | None = None
    steps: PosInt | None = None
    min_steps: NonNegInt = 0
    select: Literal["best_val", "last"] = "best_val"  # keep the epoch best on the validation split | the last
    batch_size: PosInt = 128
    workers: NonNegInt = 1
    # How loader workers start: `forkserver` (default) forks them from a small server process, so they share
    # no memory with the trainer and its writes copy no pages (fork's copy-on-write cost the step 10-20% on
    # short epochs, BENCHMARKS.md); like every start method but `fork` it needs `if __name__ == "__main__":`
    # around a script's training code. `fork`: for unguarded scripts and notebooks.
    worker_start: Literal["forkserver", "fork"] = "forkserver"
    shuffle_buffer: NonNegInt = 2000
    seed: NonNegInt = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    threads: PosInt | None = None  # torch intra-op threads (None: torch's default)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: NonNegInt = 1  # validation accuracy every n epochs (0: only at the end): the checkpoints `select` sees

    def __post_init__(self) -> None:
        check_length(self.epochs, self.steps)


def check_length(epochs: Any, steps: Any) -> None:
    """A training length is `epochs` or `steps`, never both (each is checked as a positive integer by its field)."""
    if epochs is not None and steps is not None:
        raise ConfigError(f"give `epochs` or `steps`, not both (got epochs={epochs}, steps={steps}); delete one")


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of the shared `teachers` zoo.

    Either a demo teacher trained by `train_teacher` (arch + training recipe), or your own model:
    `checkpoint:` pointing at a kdcache checkpoint or a `state_dict` (safetensors, or a torch `.pth`;
    `arch` says how to rebuild it, e.g. `timm:resnet50`, or `py:<module or .py file>:<callable>` for your own
    code), or a model file that carries its code (`.pt2`: a torch.export program, `.onnx`: run by onnxruntime;
    `arch: export | onnx`, or left out: the extension says it), which `train_teacher` imports instead of training.
    """

    arch: Name | None = None  # required, unless `checkpoint` is a .pt2 / .onnx file
    checkpoint: Name | None = None
    epochs: PosInt | None = None  # or `steps`; neither: the shared recipe's (train_teacher.train)
    steps: PosInt | None = None
    lr: PosFloat = 0.05
    batch_size: PosInt = 128

    # data: the data set's image size and mean/std | model: a timm model's pretrained_cfg (input size, mean/std,
    # interpolation), the inputs its published weights expect; recorded in the store's teacher fingerprint.
    preprocess: Literal["data", "model"] = "data"
    pretrained: bool = False  # published weights: never downloaded, so this needs `checkpoint:` (the local file)

    # A live teacher behind HTTP (kdcache's wire format, pipeline/wire.py; `kdcache serve` is one): its base URL,
    # instead of arch/checkpoint. `batch_size` is then the rows per request. How it is called, not what it answers:
    # changing these never reruns its teach stage (the store records the server's model fingerprint instead).
    endpoint: Name | None = None
    concurrency: PosInt = 4  # requests in flight
    timeout_s: PosFloat = 30.0  # per request (connect, then read)
    max_retries: NonNegInt = 5  # on timeouts, connection errors, 429/5xx, malformed bodies: exponential backoff
    rate_limit_per_s: PosFloat | None = None  # request starts per second (None: no limit)
    cost_per_call: NonNegFloat = 0.0  # price of one answered sample-view (a teacher call): the records add it up

    def __post_init__(self) -> None:
        check_length(self.epochs, self.steps)
        if self.endpoint is not None or self.arch == "endpoint":
            self._check_endpoint()
            return
        ext = Path(self.checkpoint).suffix.lower() if self.checkpoint else ""
        inferred = {".pt2": "export", ".onnx": "onnx"}.get(ext)
        if self.arch is None:
            if inferred is None:
                raise ConfigError(
                    "arch: required: a zoo name, tv:<name>, timm:<name> or py:<module>:<callable> (it may be left "
                    "out only when checkpoint is a .pt2 or .onnx model file)"
                )
            object.__setattr__(self, "arch", inferred)
        if self.arch.strip().lower() in ("export", "onnx") and not self.checkpoint:
            raise ConfigError(f"checkpoint: required by arch: {self.arch} (a model file): the .pt2/.onnx file")

    def _check_endpoint(self) -> None:
        if self.endpoint is None:
            raise ConfigError("endpoint: required by arch: endpoint (the teacher server's base URL)")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint: expected an http:// or https:// URL, got {self.endpoint!r}")
        clash = [k for k in ("checkpoint", "epochs", "steps") if getattr(self, k) is not None]
        if self.arch not in (None, "endpoint") or clash:
            raise ConfigError(
                f"endpoint: a teacher behind a URL has no {['arch', *clash] if self.arch else clash}: drop them, or "
                "drop endpoint to use a local model"
            )
        object.__setattr__(self, "arch", "endpoint")

    def train_config(self, shared: TrainConfig) -> TrainConfig:
        """The shared `train_teacher.train` recipe with this teacher's length, batch size and learning rate."""
        optim = dataclasses.replace(shared.optim, lr=self.lr)
        length = {"epochs": self.epochs, "steps": self.steps} if (self.epochs or self.steps) else {}
        return dataclasses.replace(shared, batch_size=self.batch_size, optim=optim, **length)


_RRC_KEYS = ("size", "scale", "ratio", "crop_pct")


@dataclass(frozen=True)
class AugmentConfig:
    """`teach.augment` / `train_teacher.augment`: the view recipe (`pipeline.data.views.RECIPES`).

    `pad_crop_flip` (default; 32 px data): views 1..V-1 crop the zero-padded image (`pad`) and flip; view 0 is the
    plain image. `rrc_flip` (natural images of any size): RandomResizedCrop to `size` with `scale`/`ratio` +
    flip; view 0 (and the test split) is resize floor(size / crop_pct) + centre crop `size`. A key of the other
    recipe is an error, so a setting never goes silently unused.
    """

    recipe: Literal["pad_crop_flip", "rrc_flip"] = "pad_crop_flip"
    pad: NonNegInt | None = None  # pad_crop_flip: zero padding before the crop (default 4)
    flip: bool = True
    size: PosInt | None = None  # rrc_flip: output size (required)
    scale: tuple[PosFloat, PosFloat] | None = None  # rrc_flip: crop area fraction range (default [0.08, 1])
    ratio: tuple[PosFloat, PosFloat] | None = None  # rrc_flip: aspect ratio range (default [3/4, 4/3])
    crop_pct: Annotated[float, Range(gt=0, le=1)] | None = None  # rrc_flip: eval centre crop fraction (0.875)
    # Mixup / CutMix on views >= 1, either recipe (0 = off; timm's ImageNet values: 0.8 and 1.0); the partner,
    # lam and box are pure functions of (seed, index, view), so the teacher labels the very mixed image
    mixup_alpha: NonNegFloat = 0.0
    cutmix_alpha: NonNegFloat = 0.0
    mix_prob: Annotated[float, Range(gt=0, le=1)] = 1.0  # the share of views >= 1 that are mixed
    # a photometric op on every view >= 1 after the crop: trivial_augment (TrivialAugment Wide, torchvision's ops)
    photometric: Literal["trivial_augment"] | None = None

    def __post_init__(self) -> None:
        if self.recipe == "pad_crop_flip":
            extra = [k for k in _RRC_KEYS if getattr(self, k) is not None]
            if extra:
                raise ConfigError(f"recipe: pad_crop_flip takes pad and flip, not {extra} (those are rrc_flip's)")
        else:
            if self.pad is not None:
                raise ConfigError("recipe: rrc_flip takes no pad (it resizes a random crop: set size, scale, ratio)")
            if self.size is None:
                raise ConfigError("recipe: rrc_flip needs size (the crop's output side in pixels, e.g. 224)")

    def spec(self) -> dict[str, Any]:
        """The recipe's keyword arguments for `pipeline.data.views.build_recipe` (unset keys take its defaults).

        `pad_crop_flip` spells `{pad, flip}` only: the layout its stores have always recorded.
        """
        mix: dict[str, Any] = {} if self.photometric is None else {"photometric": self.photometric}
        if self.mixup_alpha or self.cutmix_alpha:
            mix["mix"] = {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha, "prob": self.mix_prob}
        if self.recipe == "pad_crop_flip":
            return {"pad": 4 if self.pad is None else self.pad, "flip": self.flip, **mix}
        keys = {k: getattr(self, k) for k in _RRC_KEYS if getattr(self, k) is not None}
        return {"recipe": self.recipe, "flip": self.flip, **keys, **mix}


@dataclass(frozen=True)
class TrainTeacherConfig:
    """`train_teacher`: shared recipe for the demo teachers (per-teacher values live in `teachers`)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    # Fresh views every (epoch, sample), the same recipe registry as `teach.augment` (turn flip off for digits,
    # text, anything a mirror changes).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(pad=4))


@dataclass(frozen=True)
class TeachConfig:
    """`teach`: run each teacher once over the shards and cache raw logits."""

    views: PosInt = 2  # cached augmentation views per sample (view 0 = plain image)
    test_views: PosInt = 1
    view_seed: NonNegInt = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: PosInt = 512
    chunk_rows: PosInt = 1000  # zarr chunk rows (inner chunks of one store shard)
    compressor: Literal["blosc-zstd", "zstd", "none"] = "blosc-zstd"
    topk: NonNegInt = 0  # 0 = dense logits; k > 0 = top-k layout
    budget: PosInt | None = None  # max teacher calls (sample-views) on the train split; None = all
    strategy: Literal["random", "class_balanced"] = "random"  # == pipeline.cache.budget.STRATEGIES
    budget_seed: NonNegInt = 0
    threads: PosInt | None = None
    cluster: Name = "none"  # none (one process) | local (dask LocalCluster) | scheduler address tcp://host:8786
    workers: PosInt = 2  # LocalCluster worker processes (cluster: local); teach.threads is split among them


@dataclass(frozen=True)
class DistillConfig:
    """`distill`: train students on shards joined with cached logits."""

    teachers: Annotated[tuple[Name, ...], NONEMPTY] = ("cnn",)
    losses: Annotated[tuple[Name, ...], NONEMPTY] = ("ce", "kd")
    budgets: Annotated[tuple[PosInt | Literal["full"], ...], NONEMPTY] = ("full",)
    seeds: Annotated[tuple[NonNegInt, ...], NONEMPTY] = (0,)
    student: Name = "cnn_tiny"
    student_preprocess: Literal["data", "model"] = "data"  # a timm student's pretrained_cfg; see TeacherSpec.preprocess
    train: TrainConfig = field(default_factory=TrainConfig)
    loss_params: dict[Name, dict[str, Any] | None] = field(default_factory=dict)  # each checked by its loss
    unqueried: Literal["drop", "ce"] = "drop"  # budget runs: what to do with rows the teacher never saw
    pool_epoch_samples: PosInt | None = None  # budget runs (queried pool): draws per epoch (None: the split's N)
    teacher_source: Literal["cache", "online"] = "cache"

    def __post_init__(self) -> None:
        for key in ("teachers", "losses", "budgets", "seeds"):
            values = [str(v) for v in getattr(self, key)]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"{key}: {repeated} listed twice; each {key[:-1]} once (a matrix axis)")
        if self.train.optim.label_smoothing:  # one home: the loss owns its CE term (the same for every loss)
            raise ConfigError(
                f"train.optim.label_smoothing: {self.train.optim.label_smoothing} here would smooth only the CE "
                "students; label smoothing belongs to the loss: set distill.loss_params.<loss>.label_smoothing "
                "(every loss takes it) and leave this at 0"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: test-split metrics per student."""

    batch_size: PosInt = 1000
    topk: Annotated[tuple[PosInt, ...], NONEMPTY] = (1, 5)


@dataclass(frozen=True)
class RuntimeConfig:
    """`runtime`: how every stage runs, for all of them (read by the entry points before torch loads)."""

    # Pin the CPU kernels (ATen, oneDNN, MKL, NumPy, OpenBLAS) to AVX2: byte-identical results on every x86-64
    # machine with AVX2 (pipeline/kernels.py). false: native kernels (faster on AVX-512; GPUs are never bit-exact).
    reproducible: bool = True


@dataclass(frozen=True)
class ReportConfig:
    """`report`: aggregate metrics into tables and figures."""

    title: str | None = None  # None: "kdcache on <data set>" (from the manifest)


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
    return _coerce(dict[Name, TeacherSpec], section(params, "teachers"), "teachers")


def call_costs(params: dict[str, Any]) -> dict[str, float]:
    """The price of one teacher call per teacher name (`teachers.<t>.cost_per_call`) and per active query store
    (its teacher's), for the report's cost columns; teachers without a price are left out."""
    if not params.get("teachers"):
        return {}  # a report of records alone (no zoo in its params): no prices
    zoo = teachers_section(params)
    costs = {t: spec.cost_per_call for t, spec in zoo.items() if spec.cost_per_call}
    queries = query_section(params)
    costs.update({q: zoo[s.teacher].cost_per_call for q, s in queries.items() if zoo[s.teacher].cost_per_call})
    return costs


def teacher_spec(params: dict[str, Any], name: str) -> TeacherSpec:
    zoo = teachers_section(params)
    if name not in zoo:
        raise ConfigError(f"unknown teacher '{name}'; teachers in params.yaml: {sorted(zoo)}")
    return zoo[name]


@dataclass(frozen=True)
class EnsembleSpec:
    """One entry of the `ensembles` section: a teacher whose logit store is computed from its members' stores.

    `members` name teachers of the `teachers` zoo or other ensembles; the store is `combine(member logits,
    weights)` (`pipeline.cache.ensemble.COMBINES`) written by the `ensemble@<name>` stage, and no model runs.
    `keep_members` also stores every member's logits, for losses that distil from each member (`mtkd`).
    An ensemble has exactly two members because `dvc.yaml` can list only a fixed number of member stores as
    a templated stage's deps (DVC cannot expand a list into `deps`, iterative/dvc#8171); nest ensembles for
    more (see `ensembles_section`).
    """

    members: tuple[Name, ...]
    combine: Literal["mean_logits", "mean_probs"] = "mean_logits"
    weights: tuple[NonNegFloat, ...] | None = None  # one per member, >= 0, positive sum (None: equal weights)
    keep_members: bool = True


def ensembles_section(params: dict[str, Any]) -> dict[str, EnsembleSpec]:
    """The `ensembles` section (optional): name -> EnsembleSpec, checked against the teacher zoo.

    Errors name the entry and the fix: an ensemble of one (or of more than two: nest them), a member that is
    not a teacher or ensemble, the ensemble itself among its members (directly or through other ensembles),
    a name that is also a teacher's, weights that do not match the members or do not sum to a positive number.
    """
    raw = params.get("ensembles") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"ensembles: expected a mapping of name -> {{members: [a, b], ...}}, got {raw!r}")
    teachers = set(params.get("teachers") or {})
    out = {name: from_dict(EnsembleSpec, spec or {}, f"ensembles.{name}") for name, spec in raw.items()}
    for name, spec in out.items():
        _check_ensemble(name, spec, teachers, set(out))
    for name in out:
        _check_no_cycle(name, out, [])
    return out


def _check_ensemble(name: str, spec: EnsembleSpec, teachers: set[str], ensembles: set[str]) -> None:
    where = f"ensembles.{name}"
    members = list(spec.members) if isinstance(spec.members, (list, tuple)) else [spec.members]
    if name in teachers:
        raise ConfigError(f"{where}: '{name}' is also a teacher in `teachers`; give the ensemble another name")
    if len(members) < 2:
        raise ConfigError(
            f"{where}: an ensemble of {len(members)} member(s) {members} is no ensemble (it would be that teacher); "
            "name two members, e.g. members: [cnn, resnet]"
        )
    if len(members) > 2:
        nested = f"{{{members[0]}_{members[1]}: {{members: [{members[0]}, {members[1]}]}}, {name}: {{members: "
        nested += f"[{members[0]}_{members[1]}, {members[2]}], weights: [2, 1]}}}}"
        raise ConfigError(
            f"{where}: {len(members)} members; an ensemble stage combines exactly two stores, because dvc.yaml can "
            "track only a fixed number of member stores per templated stage (DVC cannot template a list into deps, "
            f"iterative/dvc#8171). Nest ensembles instead, e.g. ensembles: {nested} (members of members are "
            "flattened for the per-member losses)"
        )
    if len(set(members)) != len(members):
        raise ConfigError(f"{where}: members {members} repeat a teacher; weight it with `weights` instead")
    if name in members:
        raise ConfigError(f"{where}: the ensemble names itself as a member; members must be other teachers")
    unknown = [m for m in members if m not in teachers | ensembles]
    if unknown:
        raise ConfigError(
            f"{where}: member(s) {unknown} are neither teachers nor ensembles; teachers: {sorted(teachers)}, "
            f"ensembles: {sorted(ensembles)}"
        )
    if spec.weights is not None:
        w = list(spec.weights) if isinstance(spec.weights, (list, tuple)) else [spec.weights]
        if len(w) != len(members):
            raise ConfigError(f"{where}: {len(w)} weight(s) {w} for {len(members)} members {members}; give one each")
        bad = [x for x in w if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0]
        if bad:
            raise ConfigError(f"{where}: weights must be finite numbers >= 0, got {w}")
        if sum(w) <= 0:
            raise ConfigError(f"{where}: weights {w} sum to {sum(w)}; they must sum to a positive number")
    if not isinstance(spec.keep_members, bool):
        raise ConfigError(f"{where}: keep_members must be true or false, got {spec.keep_members!r}")


def _check_no_cycle(name: str, ensembles: dict[str, EnsembleSpec], path: list[str]) -> None:
    """An ensemble may not contain itself through other ensembles (a -> b -> a)."""
    if name in path:
        chain = " -> ".join([*path[path.index(name) :], name])
        raise ConfigError(f"ensembles: {chain} is a cycle; an ensemble cannot contain itself")
    for m in ensembles[name].members:
        if m in ensembles:
            _check_no_cycle(m, ensembles, [*path, name])


def ensemble_spec(params: dict[str, Any], name: str) -> EnsembleSpec:
    """One checked entry of the `ensembles` section; an unknown name lists the ones configured."""
    ensembles = ensembles_section(params)
    if name not in ensembles:
        raise ConfigError(f"unknown ensemble '{name}'; ensembles in params.yaml: {sorted(ensembles)}")
    return ensembles[name]


#: what ranks the unqueried sample-views of an active round (`pipeline.active.scores.SCORES`)
QUERY_SCORES = ("entropy", "margin", "diversity")


@dataclass(frozen=True)
class QuerySpec:
    """One entry of the `query` section: a teacher queried actively, in rounds (the `query@<name>` stage).

    Round 0 asks `teacher` about `initial` sample-views chosen by `seed_strategy` (a fixed order, as
    `teach.strategy`); every later round trains the distill student (`distill.student`, `distill.train` with
    `steps` optimizer steps, loss `loss`) on the calls made so far, scores every unqueried sample-view with it
    (`score`) and asks the teacher about the `per_round` best, until `budget` calls are made. The store,
    `data/logits/<name>.zarr`, is used like any teacher's (`distill.teachers: [<name>]`); it records which round
    asked for each call and their order, so any distill budget below `budget` is the prefix of that order.
    """

    teacher: Name  # a teacher of the `teachers` zoo (its checkpoint answers the calls)
    budget: PosInt  # teacher calls on the train split (above the split's sample-views: clamped, with a warning)
    initial: PosInt  # calls of round 0 (no student yet): at most `budget`
    per_round: PosInt  # calls of every later round
    seed_strategy: Literal["random", "class_balanced"] = "class_balanced"  # round 0's order (teach.strategy's)
    score: Literal["entropy", "margin", "diversity"] = "margin"  # == QUERY_SCORES
    candidates: PosInt = 10  # diversity: k-center greedy among the candidates x per_round lowest-margin views
    loss: Name = "kd"  # the round students' loss: a key of distill.loss_params
    steps: PosInt | None = 500  # optimizer steps of each round's student (None: distill.train's schedule)
    seed: NonNegInt = 0  # round 0's order and the round students' seed

    def __post_init__(self) -> None:
        if self.initial > self.budget:
            raise ConfigError(
                f"initial: {self.initial} calls in round 0 is more than the whole budget of {self.budget}; "
                f"set initial to at most {self.budget} (or raise budget)"
            )


def query_section(params: dict[str, Any]) -> dict[str, QuerySpec]:
    """The `query` section (optional): name -> QuerySpec, checked against the teacher zoo and the ensembles.

    A name is a store's name, so it may not be a teacher's or an ensemble's; `teacher` must be a teacher of the
    zoo (an ensemble has no model to ask).
    """
    raw = params.get("query") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"query: expected a mapping of name -> {{teacher: ..., budget: ...}}, got {raw!r}")
    teachers = set(params.get("teachers") or {})
    ensembles = set(params.get("ensembles") or {})
    out = {name: from_dict(QuerySpec, spec or {}, f"query.{name}") for name, spec in raw.items()}
    for name, spec in out.items():
        where = f"query.{name}"
        if name in teachers | ensembles:
            raise ConfigError(
                f"{where}: '{name}' is also a {'teacher' if name in teachers else 'ensemble'}; a query entry names "
                f"its own store: give it another name, e.g. {spec.teacher}_{spec.score}"
            )
        if spec.teacher not in teachers:
            what = "an ensemble, which has no model to ask" if spec.teacher in ensembles else "not a teacher"
            raise ConfigError(
                f"{where}.teacher: '{spec.teacher}' is {what}; name one of the teachers {sorted(teachers)}",
                where=f"{where}.teacher",
            )
    return out


def query_spec(params: dict[str, Any], name: str) -> QuerySpec:
    """One checked entry of the `query` section; an unknown name lists the ones configured."""
    queries = query_section(params)
    if name not in queries:
        raise ConfigError(f"unknown query '{name}'; query entries in params.yaml: {sorted(queries)}")
    return queries[name]


def load_section(cls: type[T], name: str, params_path: str | Path = DEFAULT_PARAMS) -> T:
    """Read `params.yaml` and return section `name` as dataclass `cls`."""
    return from_dict(cls, section(load_params(params_path), name), name)


# ---------------------------------------------------------------------------------------------
# the whole file, checked up front

#: every top-level section of params.yaml: one per stage (stage name == section), plus the shared `teachers` zoo
#: and the optional `ensembles` and `query` entries. `corrupt` is typed beside its stage's code
#: (`pipeline.data.corruptions.CorruptConfig`); `pipeline.stage.check_all_params` checks it and the loss params.
SECTIONS = (
    "runtime",
    "prepare",
    "teachers",
    "ensembles",
    "query",
    "train_teacher",
    "teach",
    "distill",
    "corrupt",
    "evaluate",
    "report",
)

_TYPED: dict[str, type] = {
    "runtime": RuntimeConfig,
    "prepare": PrepareConfig,
    "train_teacher": TrainTeacherConfig,
    "teach": TeachConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}


def check_params(params: dict[str, Any]) -> None:
    """Check every section of the params file this module types, and the names sections share, before any work.

    A stage reads only its own section, so without this a typo elsewhere (`distill.train.epoch`) would surface
    only when its stage ran, after the stages before it (on a fresh clone: twenty minutes of teacher training).
    No I/O: `check_sections` (each section's types, bounds and choices), then `check_references`.
    `pipeline.stage.check_all_params` adds the sections typed outside the core (`corrupt`, the loss params).
    """
    check_sections(params)
    check_references(params)


def check_sections(params: dict[str, Any]) -> None:
    """Each section on its own: its name is one of `SECTIONS` (a typo of one would leave its stage without
    params), and its values as its stage reads them. An absent section is not an error here: the stage that needs
    it says so."""
    unknown = sorted(map(str, set(params) - set(SECTIONS)))
    if unknown:
        raise ConfigError(f"params: unknown section(s) {unknown}; sections: {list(SECTIONS)}")
    for name, cls in _TYPED.items():
        if name in params:
            from_dict(cls, section(params, name), name)
    if "teachers" in params:
        teachers_section(params)
    ensembles_section(params)  # each checks its members against the zoo
    query_section(params)


def check_references(params: dict[str, Any]) -> None:
    """The names one section gives another: `distill.teachers` names teachers, ensembles or query entries; every
    loss of `distill.losses` and every query entry's `loss` has its `distill.loss_params` entry (a missing one would
    fail those students only when they train)."""
    if "distill" not in params:
        return
    distill = from_dict(DistillConfig, section(params, "distill"), "distill")
    ensembles, queries = ensembles_section(params), query_section(params)
    if "teachers" in params:
        zoo = teachers_section(params)
        unknown = [t for t in distill.teachers if t not in set(zoo) | set(ensembles) | set(queries)]
        if unknown:
            raise ConfigError(
                f"distill.teachers: {unknown} name no teacher, ensemble or query entry; teachers: {sorted(zoo)}, "
                f"ensembles: {sorted(ensembles)}, query: {sorted(queries)}",
                where="distill.teachers",
            )
    wanted = [("distill.losses", loss) for loss in distill.losses]
    wanted += [(f"query.{name}.loss", q.loss) for name, q in queries.items()]
    for where, loss in wanted:
        if loss not in distill.loss_params:
            raise ConfigError(
                f"{where}: no parameters for loss '{loss}': add distill.loss_params.{loss} to params.yaml "
                f"(configured: {sorted(distill.loss_params)})",
                where=where,
            )
