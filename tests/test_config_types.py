"""Typed config: every params.yaml value is checked for type, range and choices, with the key's full path.

The property tests mutate valid params (the project's params.yaml and the tiny test params) one value at
a time. `accepts` below is the rule written out independently of `pipeline.config._coerce`: a value it
rejects must give a ConfigError naming the key's path (never another exception), a value it accepts must
load.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.cache.budget import STRATEGIES
from pipeline.cache.store import COMPRESSORS
from pipeline.config import (
    ConfigError,
    DistillConfig,
    EvaluateConfig,
    NonEmpty,
    PrepareConfig,
    Range,
    ReportConfig,
    TeachConfig,
    TeacherSpec,
    TrainTeacherConfig,
    from_dict,
    section,
    teachers_section,
)
from pipeline.data.corruptions import PARAMS as CORRUPTION_PARAMS
from pipeline.data.corruptions import CorruptConfig
from tests.conftest import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train_teacher": TrainTeacherConfig,
    "teach": TeachConfig,
    "distill": DistillConfig,
    "corrupt": CorruptConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}
VALID = {"params.yaml": yaml.safe_load((ROOT / "params.yaml").read_text()), "tiny": TINY_PARAMS}


def load_all(params: dict) -> None:
    """Read every typed section the way the stages do."""
    for name, cls in SECTIONS.items():
        from_dict(cls, section(params, name), name)
    teachers_section(params)


# ---------------------------------------------------------------------------------------------
# the rule, written out: does annotation `tp` accept `value`?


def _split(tp: Any) -> tuple[Any, tuple]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *marks = typing.get_args(tp)
        return base, tuple(marks)
    return tp, ()


def accepts(tp: Any, value: Any) -> bool:
    tp, marks = _split(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else accepts(a, value) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return value is None or isinstance(value, dict)  # the inside is checked field by field
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        try:
            ok = not isinstance(value, bool) and isinstance(value, (int, float, str)) and math.isfinite(float(value))
        except ValueError:
            ok = False
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (tuple, list):
        ok = isinstance(value, list) and all(accepts(typing.get_args(tp)[0], v) for v in value)
    elif origin is dict:
        kt, vt = typing.get_args(tp)
        ok = value is None or (
            isinstance(value, dict) and all(accepts(kt, k) and accepts(vt, v) for k, v in value.items())
        )
    else:
        raise AssertionError(f"annotation {tp} not covered by the test's rule")
    if not ok:
        return False
    for m in marks:
        if isinstance(m, Range) and not m.holds(float(value)):
            return False
        if isinstance(m, NonEmpty) and len(value) == 0:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# the typed leaves of a params dict: (path, annotation)


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def leaves(params: dict) -> list[tuple[tuple, Any]]:
    found: list[tuple[tuple, Any]] = []

    def walk(cls: type, data: dict, path: tuple) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for key, value in data.items():
            tp = hints[key]
            here = (*path, key)
            found.append((here, tp))
            base, _ = _split(tp)
            if dataclasses.is_dataclass(base) and isinstance(value, dict):
                walk(base, value, here)
            elif typing.get_origin(base) is tuple and isinstance(value, list):
                item = typing.get_args(base)[0]
                found.extend(((*here, i), item) for i in range(len(value)))

    for name, cls in SECTIONS.items():
        walk(cls, params[name] or {}, (name,))
    for teacher, spec in params["teachers"].items():
        found.append((("teachers", teacher), TeacherSpec))
        walk(TeacherSpec, spec, ("teachers", teacher))
    return found


def put(params: dict, path: tuple, value: Any) -> dict:
    p = copy.deepcopy(params)
    node = p
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return p


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["abc", "1e-3", "-1", "0", "full", "float64", "cosine", "nan", "inf", "", "ce", "random"]),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(sorted(VALID)), data=st.data(), value=JUNK)
def test_a_mutated_value_is_a_config_error_naming_its_key_or_loads(which, data, value):
    base = VALID[which]
    path, tp = data.draw(st.sampled_from(leaves(base)), label="key")
    # A mapping in place of a section is checked key by key (the next test); here: values of the wrong kind.
    assume(not (dataclasses.is_dataclass(_split(tp)[0]) and isinstance(value, (dict, type(None)))))
    mutated = put(base, path, value)
    if accepts(tp, value):
        # A value of the right type loads, or fails a check across values (a teacher listed twice) with a
        # ConfigError naming its key; never another exception.
        try:
            load_all(mutated)
        except ConfigError as e:
            # the key itself, or the list holding it (an item listed twice: `distill.losses: ['ce'] listed twice`)
            named = e.where.startswith(_dotted(path)) or _dotted(path).startswith(f"{e.where}[")
            assert named and str(e).startswith(f"{e.where}: "), (str(e), path)
        return
    with pytest.raises(ConfigError) as err:
        load_all(mutated)
    msg, where = str(err.value), err.value.where
    assert where.startswith(_dotted(path)) and msg.startswith(f"{where}: expected "), (msg, path)  # full path first
    if where == _dotted(path):  # else an item inside the value was the wrong one
        assert msg.endswith(f", got {value!r}"), msg


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(sorted(VALID)), data=st.data())
def test_missing_sections_keys_and_unknown_keys_are_config_errors(which, data):
    base = VALID[which]
    kind = data.draw(st.sampled_from(["drop section", "null teachers", "drop arch", "unknown key", "not a mapping"]))
    p = copy.deepcopy(base)
    if kind == "drop section":
        name = data.draw(st.sampled_from([*SECTIONS, "teachers"]))
        del p[name]
        expect = f"no section '{name}'"
    elif kind == "null teachers":
        p["teachers"] = {"t": None}
        expect = "teachers.t.arch: required: a zoo name"  # unless the checkpoint is a .pt2/.onnx file
    elif kind == "drop arch":
        teacher = data.draw(st.sampled_from(sorted(p["teachers"])))
        del p["teachers"][teacher]["arch"]
        expect = f"teachers.{teacher}.arch: required: a zoo name"  # unless the checkpoint is a .pt2/.onnx file
    elif kind == "unknown key":
        mappings = [path for path, tp in leaves(base) if dataclasses.is_dataclass(_split(tp)[0])]
        path = data.draw(st.sampled_from([(name,) for name in SECTIONS] + mappings))
        node = p
        for key in path:
            node = node[key]
        node["tpyo"] = 1
        expect = f"{_dotted(path)}: unknown key(s) ['tpyo']; valid keys:"
    else:
        name = data.draw(st.sampled_from(sorted(SECTIONS)))
        p[name] = [1, 2]
        expect = f"{name}: expected a mapping"
    with pytest.raises(ConfigError) as err:
        load_all(p)
    assert expect in str(err.value)


@pytest.mark.parametrize("which", sorted(VALID))
def test_valid_params_load(which):
    load_all(VALID[which])


@pytest.mark.parametrize(
    ("section_name", "values", "message"),
    [
        ("prepare", {"shard_size": "abc"}, "prepare.shard_size: expected a positive integer, got 'abc'"),
        ("prepare", {"limit": 0}, "prepare.limit: expected null or a positive integer, got 0"),
        ("teach", {"dtype": "float64"}, "teach.dtype: expected one of ['float16', 'float32'], got 'float64'"),
        ("teach", {"augment": {"pad": -2}}, "teach.augment.pad: expected null or a non-negative integer, got -2"),
        ("teach", {"budget": 1.5}, "teach.budget: expected null or a positive integer, got 1.5"),
        ("distill", {"budgets": ["full", "fll"]}, "distill.budgets[1]: expected a positive integer or 'full'"),
        ("distill", {"train": {"optim": {"momentum": 1.0}}}, "distill.train.optim.momentum: expected a number in"),
        ("distill", {"train": {"optim": {"schedule": "cos"}}}, "distill.train.optim.schedule: expected one of"),
        ("distill", {"unqueried": "keep"}, "distill.unqueried: expected one of ['drop', 'ce'], got 'keep'"),
        ("distill", {"teacher_source": "live"}, "distill.teacher_source: expected one of ['cache', 'online']"),
        ("distill", {"losses": []}, "distill.losses: expected a non-empty list, got []"),
        ("train_teacher", {"train": {"epochs": True}}, "train_teacher.train.epochs: expected null or a positive"),
        ("corrupt", {"severities": [6]}, "corrupt.severities[0]: expected one of [1, 2, 3, 4, 5], got 6"),
        ("corrupt", {"corruptions": ["fog"]}, "corrupt.corruptions[0]: expected one of ['gaussian_noise'"),
        ("evaluate", {"topk": [0]}, "evaluate.topk[0]: expected a positive integer, got 0"),
    ],
)  # fmt: skip
def test_messages_name_the_key_and_what_it_must_be(section_name, values, message):
    p = copy.deepcopy(TINY_PARAMS)
    for k, v in values.items():
        p[section_name][k] = v
    with pytest.raises(ConfigError) as err:
        load_all(p)
    assert str(err.value).startswith(message), str(err.value)


def test_yaml_number_spellings_still_read_as_numbers():
    """YAML 1.1 reads `5e-4` as a string: a float field takes it; an int field never takes a float."""
    cfg = from_dict(DistillConfig, {"train": {"optim": {"lr": "5e-4", "weight_decay": 0}}}, "distill")
    assert cfg.train.optim.lr == 5e-4 and isinstance(cfg.train.optim.weight_decay, float)
    assert from_dict(PrepareConfig, {"splits": ["train"]}, "prepare").splits == ("train",)


def test_choices_agree_with_the_code_that_uses_them():
    """The Literal choices in config are the options the library implements (config may not import it)."""
    hints = typing.get_type_hints(TeachConfig)
    assert typing.get_args(hints["strategy"]) == STRATEGIES
    assert typing.get_args(hints["compressor"]) == COMPRESSORS
    corrupt = typing.get_type_hints(CorruptConfig, include_extras=True)["corruptions"]
    assert typing.get_args(typing.get_args(_split(corrupt)[0])[0]) == tuple(CORRUPTION_PARAMS)


def test_bad_loss_parameters_name_their_key(tmp_path, monkeypatch):
    """Loss parameters are checked by the loss (it knows its names); the error names the params.yaml key."""
    from stages import distill, prepare
    from tests.conftest import make_project, tiny_params

    p = tiny_params()
    p["distill"]["loss_params"]["kd"] = {"T": "hot", "a": 0.1, "b": 0.9}
    make_project(tmp_path, p)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^distill\.loss_params\.kd: T must be a number, got 'hot'"):
        prepare.main([])  # every stage checks the whole params file first: prepare too, which reads no loss
    with pytest.raises(ConfigError, match=r"^distill\.loss_params\.kd: T must be a number, got 'hot'"):
        distill.main(["--teacher", "small", "--loss", "kd"])
