"""Every stage checks the whole params file before it does any work (issue 32): a typo in any section, in a loss's
parameters or in a name one section gives another fails the first stage that runs, in one line, with nothing
written, instead of the stage that reads it after the others have run for hours."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import SECTIONS, ConfigError
from pipeline.stage import USER_ERROR_EXIT, run_command
from stages import prepare, report
from tests.conftest import TINY_PARAMS, make_project


def _set(params: dict, dotted: str, value) -> dict:
    p = copy.deepcopy(params)
    *head, last = dotted.split(".")
    node = p
    for k in head:
        node = node[k]
    node[last] = value
    return p


def _typo(params: dict, dotted: str) -> dict:
    """Rename key `dotted` to itself + 'x' (a misspelt key)."""
    p = copy.deepcopy(params)
    *head, last = dotted.split(".")
    node = p
    for k in head:
        node = node[k]
    node[last + "x"] = node.pop(last)
    return p


ENSEMBLE = {"both": {"members": ["small", "other"], "combine": "mean_logits", "weights": None, "keep_members": True}}
QUERY = {"q": {"teacher": "small", "budget": 40, "initial": 20, "per_round": 10, "loss": "kd"}}
BASE = _set(
    _set(TINY_PARAMS, "teachers.other", dict(TINY_PARAMS["teachers"]["small"])), "ensembles", copy.deepcopy(ENSEMBLE)
)
BASE = _set(BASE, "query", copy.deepcopy(QUERY))

# (what is wrong, the params, what the one-line error must say): one case per section, plus the cross-references
CASES = [
    ("runtime", _typo(BASE, "runtime.reproducible"), r"runtime: unknown key\(s\) \['reproduciblex'\]"),
    ("teachers", _set(BASE, "teachers.small.epochs", 0), r"teachers.small.epochs: expected null or a positive integer"),
    ("ensembles", _set(BASE, "ensembles.both.members", ["small", "nope"]), r"ensembles.both: member\(s\) \['nope'\]"),
    ("query", _typo(BASE, "query.q.per_round"), r"query.q: unknown key\(s\) \['per_roundx'\]"),
    ("train_teacher", _typo(BASE, "train_teacher.train.seed"), r"train_teacher.train: unknown key\(s\) \['seedx'\]"),
    ("teach", _set(BASE, "teach.dtype", "float8"), r"teach.dtype: expected one of \['float16', 'float32'\]"),
    ("distill", _typo(BASE, "distill.train.epochs"), r"distill.train: unknown key\(s\) \['epochsx'\]"),
    ("loss params", _typo(BASE, "distill.loss_params.kd.T"), r"distill.loss_params.kd: unknown parameter\(s\) \['Tx"),
    ("loss values", _set(BASE, "distill.loss_params.dkd.T", -1.0), r"distill.loss_params.dkd: T must be > 0"),
    ("corrupt", _set(BASE, "corrupt.severities", [1, 9]), r"corrupt.severities\[1\]"),
    ("evaluate", _typo(BASE, "evaluate.topk"), r"evaluate: unknown key\(s\) \['topkx'\]"),
    ("report", _typo(BASE, "report.title"), r"report: unknown key\(s\) \['titlex'\]"),
    ("a section", _typo(BASE, "distill"), r"params: unknown section\(s\) \['distillx'\]"),
    ("distill.teachers", _set(BASE, "distill.teachers", ["smal"]), r"distill.teachers: \['smal'\] name no teacher"),
    ("distill.losses", _set(BASE, "distill.losses", ["ce", "kdd"]), r"distill.losses: no parameters for loss 'kdd'"),
    ("query loss", _set(BASE, "query.q.loss", "dkd+cmkd"), r"query.q.loss: no parameters for loss 'dkd\+cmkd'"),
]


def test_the_cases_cover_every_section():
    covered = {c[0].split(".")[0] for c in CASES} | {"prepare"}  # prepare: the stage below reads it itself
    assert set(SECTIONS) <= covered, set(SECTIONS) - covered


@pytest.mark.parametrize(("what", "params", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_typo_anywhere_fails_the_first_stage_before_it_works(tmp_path, monkeypatch, capsys, what, params, message):
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        prepare.main([])  # the first stage of a fresh clone: it reads none of these sections itself
    assert not Path("data").exists()  # no shard written
    # as a stage's command: one line on stderr and exit code 2
    assert run_command("python -m stages.prepare", lambda: prepare.main([])) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m stages.prepare: error: ") and "\n" not in err


def test_the_unchanged_params_pass(tmp_path, monkeypatch):
    """The base of every case is valid: each case fails for its own typo, not another."""
    make_project(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    assert Path("data/shards/tiny/manifest.json").is_file()


def test_the_committed_params_and_profiles_pass():
    from pipeline.stage import check_all_params

    root = Path(__file__).resolve().parents[1]
    for path in [root / "params.yaml", *sorted((root / "profiles").glob("*.yaml"))]:
        check_all_params(yaml.safe_load(path.read_text()))


def test_the_report_stage_checks_too(tmp_path, monkeypatch):
    """Every stage, not only prepare: the report fails on a loss typo before reading any metrics."""
    make_project(tmp_path, _typo(BASE, "distill.loss_params.ckd.T"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"distill.loss_params.ckd: unknown parameter\(s\) \['Tx'\]"):
        report.main([])
