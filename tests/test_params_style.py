"""params.yaml and the profiles survive `dvc exp run -S`: DVC's own params writer changes only the values it sets.

`dvc exp run -S key=value` rewrites the params file through `dvc.utils.hydra.apply_overrides` (ruamel round-trip,
values replaced through OmegaConf). It keeps comments and short flow maps, but re-emits every list in block style,
null as an empty value, long flow maps wrapped, aliases expanded, and drops the blank line after a list it rewrote.
A file written in the style it keeps is a fixed point: setting any one key changes exactly that key's line(s).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]

apply_overrides = pytest.importorskip("dvc.utils.hydra").apply_overrides


def _leaves(d: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(d, dict) and d:
        return [leaf for k, v in d.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, d)]


def _hydra(v: object) -> str:
    """A value in Hydra's override grammar (strings quoted: paths, `tv:...` and URLs have special characters)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_hydra(x) for x in v) + "]"
    return "'" + str(v).replace("'", "\\'") + "'"


def _changed(v: object) -> object:
    if v is None:
        return 7
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 0.5
    if isinstance(v, list):
        return [*v, v[-1] if v else 1]
    if isinstance(v, dict):
        return None  # an empty mapping (`options: {}`): not a leaf to set
    return f"{v}x"


def _diff(a: str, b: str) -> tuple[list[str], list[str]]:
    lines = list(difflib.ndiff(a.splitlines(), b.splitlines()))
    return [x[2:] for x in lines if x.startswith("- ")], [x[2:] for x in lines if x.startswith("+ ")]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_dvc_params_writer_changes_only_the_value_it_sets(path, tmp_path):
    original = path.read_text()
    work = tmp_path / "params.yaml"
    # 1. A no-op override rewrites the whole file: it must come back byte for byte.
    work.write_text(original)
    first = _leaves(yaml.safe_load(original))[0]
    apply_overrides(work, [f"{first[0]}={_hydra(first[1])}"])
    removed, added = _diff(original, work.read_text())
    assert (removed, added) == ([], []), f"{path.name} is not in the style DVC's writer keeps:\n-{removed}\n+{added}"
    # 2. Every single setting changes its own line(s) only (lists: one added item; scalars: one line).
    leaves = [(k, v) for k, v in _leaves(yaml.safe_load(original)) if re.fullmatch(r"[\w.]+", k) and v != {}]
    # Every list and null (the styles DVC rewrites) and, for params.yaml, the first scalar of every mapping (block
    # or flow: the style of its line); the profiles share params.yaml's style, their risky keys suffice.
    parents: set[str] = set()
    picked = []
    for k, v in leaves:
        parent = k.rsplit(".", 1)[0]
        if v is None or isinstance(v, list) or (path.name == "params.yaml" and parent not in parents):
            picked.append((k, v))
        parents.add(parent)
    leaves = picked
    for key, value in leaves:
        work.write_text(original)
        new = _changed(value)
        apply_overrides(work, [f"{key}={_hydra(new)}"])
        text = work.read_text()
        assert yaml.safe_load(text) == _set(yaml.safe_load(original), key, new), key
        removed, added = _diff(original, text)
        if isinstance(value, list):
            assert removed == [] and len(added) == 1 and added[0].strip().startswith("- "), (key, removed, added)
        else:
            name = key.rsplit(".", 1)[-1]
            assert len(removed) == 1 and len(added) == 1 and f"{name}:" in added[0], (key, removed, added)


def _set(d: dict, key: str, value: object) -> dict:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return d


def test_the_check_catches_a_file_dvc_would_reformat(tmp_path):
    """Not vacuous: an inline list and an explicit null are rewritten by DVC's writer."""
    work = tmp_path / "params.yaml"
    original = "a:\n  xs: [1, 2]\n  n: null\n  k: 1\n"
    work.write_text(original)
    apply_overrides(work, ["a.k=1"])
    removed, added = _diff(original, work.read_text())
    assert removed == ["  xs: [1, 2]", "  n: null"] and added == ["  xs:", "  - 1", "  - 2", "  n:"]
