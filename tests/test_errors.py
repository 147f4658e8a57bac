"""Every user error ends in one line `<command>: error: <message>` and exit code 2; bugs keep their traceback.

`CASES` is the bad-input table of BENCHMARKS.md ("Reliability"): each row is a bad input a new user tries,
the command, and a piece of the message they must get. Each case runs the real `kdcache` entry point in
this process (cheap); the subprocess tests at the end check the same contract on real processes
(`python -m stages.<name>`), with `KDCACHE_DEBUG=1`, and for an internal error.

    python -m tests.test_errors     # prints the table with the messages of this run (BENCHMARKS.md)
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main as kdcache
from pipeline.data.shards import load_manifest
from pipeline.models import save_model
from stages import prepare, teach
from tests.conftest import bump_export_schema, linear_teacher, make_project, tiny_params

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """A bad input: `setup(project, scratch)` makes it and returns the `kdcache` argv; `expect` is in the message."""

    id: str
    what: str  # the bad input, in words (the table's first column)
    setup: Callable[[Path, Path], list[str]]
    expect: str


def _params(scratch: Path, **sections: dict) -> str:
    """A params file: the tiny params with sections replaced/merged (`None` deletes a key)."""
    p = tiny_params()
    for name, values in sections.items():
        for k, v in values.items():
            if v is None:
                p[name].pop(k, None)
            else:
                p[name][k] = v
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return str(path)


def _npy(scratch: Path, name: str, array: np.ndarray, **kw) -> str:
    path = scratch / name
    np.save(path, array, **kw)
    return str(path)


def _logits(n: int = 256, c: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, c)).astype(np.float32)


def _with_row(value: float, row: int = 3, col: int | slice = 2) -> np.ndarray:
    a = _logits()
    a[row, col] = value
    return a


def _corrupt_shard(proj: Path, scratch: Path) -> str:
    shards = scratch / "shards"
    shutil.copytree(proj / "data/shards/tiny", shards)
    tar = shards / load_manifest(shards).split("train").shards[1].path
    tar.write_bytes(tar.read_bytes()[:3000])  # truncated mid-sample
    return str(shards)


def _other_dataset(proj: Path, scratch: Path) -> str:
    """Shards of another data set (more samples) in `scratch`."""
    params = _params(scratch, prepare={"options": {"n": 320, "size": 16, "channels": 1, "num_classes": 4, "seed": 1}})
    prepare.main(["--params", params, "--out", str(scratch / "other")])
    return str(scratch / "other")


def _checkpoint_for_3_classes(proj: Path, scratch: Path) -> str:
    from pipeline.models import build_for

    m = load_manifest(proj / "data/shards/tiny")
    three = type("Spec", (), {"num_classes": 3, "image_shape": m.image_shape, "mean": m.mean, "std": m.std})()
    path = scratch / "three.pt"
    save_model(path, build_for("cnn_tiny", three), "cnn_tiny")
    return str(path)


def _foreign_partial(proj: Path, scratch: Path) -> list[str]:
    out = scratch / "t.zarr"
    teach.main(["--name", "small", "--out", str(out)])
    os.replace(out, out.with_name("t.zarr.partial"))  # a partial store of another run: view_seed differs below
    return ["teach", "--name", "small", "--out", str(out), "--params", _params(scratch, teach={"view_seed": 5})]


def _bad_gzip(scratch: Path) -> str:
    root = scratch / "idx"
    root.mkdir()
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (root / f"{stem}.gz").write_bytes(gzip.compress(b"\0" * 64)[:20])  # truncated gzip stream
    return str(root)


IMPORT = ["import-logits", "--shards", "data/shards/tiny", "--name", "api", "--without-test"]
FM = {"source": "fashion_mnist", "options": {}}

NEEDS_DEPTH = "def build(depth):\n    pass\n"

CASES = [
    Case("params-type", "`prepare.shard_size: abc` in params.yaml",
         lambda p, s: ["prepare", "--params", _params(s, prepare={"shard_size": "abc"})],
         "prepare.shard_size: expected a positive integer, got 'abc'"),
    Case("params-choice", "`teach.dtype: float64`",
         lambda p, s: ["teach", "--name", "small", "--params", _params(s, teach={"dtype": "float64"})],
         "teach.dtype: expected one of ['float16', 'float32'], got 'float64'"),
    Case("params-range", "`distill.train.optim.momentum: 1.5`",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd",
                       "--params", _params(s, distill={"train": {"optim": {"momentum": 1.5}}})],
         "distill.train.optim.momentum: expected a number in [0, 1), got 1.5"),
    Case("params-unknown-key", "a typo: `teach.view: 2`",
         lambda p, s: ["teach", "--name", "small", "--params", _params(s, teach={"view": 2})],
         "teach: unknown key(s) ['view']; valid keys:"),
    Case("params-missing-section", "params.yaml without a `teach` section",
         lambda p, s: ["teach", "--name", "small", "--params", _params(s) and _drop_section(s, "teach")],
         "params.yaml has no section 'teach'"),
    Case("params-missing-file", "`--params` naming no file",
         lambda p, s: ["prepare", "--params", str(s / "nope.yaml")], "params file"),
    Case("params-bad-yaml", "params.yaml that is not YAML",
         lambda p, s: ["prepare", "--params", _write(s / "bad.yaml", "prepare: [unclosed\n")], "is not valid YAML"),
    Case("loss-params", "`distill.loss_params.kd.T: hot`",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd",
                       "--params", _params(s, distill={"loss_params": {"kd": {"T": "hot"}}})],
         "distill.loss_params.kd: T must be a number, got 'hot'"),
    Case("unknown-loss", "`--loss kdd` (no such loss, no params)",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kdd"], "no parameters for loss 'kdd'"),
    Case("unknown-arch", "`distill.student: resnet9`",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd",
                       "--params", _params(s, distill={"student": "resnet9"})], "unknown architecture 'resnet9'"),
    Case("unknown-teacher", "`train-teacher --name nope`",
         lambda p, s: ["train-teacher", "--name", "nope"], "unknown teacher 'nope'; teachers in params.yaml:"),
    Case("bad-budget", "`distill --budget lots`",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd", "--budget", "lots"],
         "budget must be a positive integer or 'full', got 'lots'"),
    Case("prepare-no-root", "`prepare.root` pointing nowhere (Fashion-MNIST not installed)",
         lambda p, s: ["prepare", "--params", _params(s, prepare={**FM, "root": str(s / "none")})],
         "fashion_mnist: missing IDX file(s)"),
    Case("prepare-bad-gzip", "a truncated `.gz` IDX file",
         lambda p, s: ["prepare", "--params", _params(s, prepare={**FM, "root": _bad_gzip(s)})],
         "corrupt or truncated gzip file"),
    Case("prepare-unknown-source", "`prepare.source: fashion`",
         lambda p, s: ["prepare", "--params", _params(s, prepare={"source": "fashion"})], "unknown source 'fashion'"),
    Case("prepare-hf-not-parquet", "`prepare.source: hf` with `root` a CSV file",
         lambda p, s: ["prepare", "--params",
                       _params(s, prepare={"source": "hf", "options": {}, "root": _write(s / "t.csv", "a,b\n")})],
         "t.csv: not a Parquet file; set prepare.root to a `save_to_disk` folder or to Parquet files"),
    Case("prepare-unknown-option", "`prepare.options: {sizee: 8}`",
         lambda p, s: ["prepare", "--params", _params(s, prepare={"options": {"sizee": 8}})],
         "got unknown option(s) ['sizee']; valid options:"),
    Case("no-manifest", "teach before prepare (`--shards` without a manifest)",
         lambda p, s: ["teach", "--name", "small", "--shards", str(s)], "no manifest at"),
    Case("bad-manifest", "a manifest.json that is not JSON",
         lambda p, s: ["teach", "--name", "small", "--shards", _bad_manifest(p, s)], "is not valid JSON"),
    Case("corrupt-shard", "a truncated shard tar",
         lambda p, s: ["teach", "--name", "small", "--shards", _corrupt_shard(p, s), "--out", str(s / "c.zarr")],
         "corrupt or truncated shard"),
    Case("no-checkpoint", "teach without the teacher's checkpoint",
         lambda p, s: ["teach", "--name", "small", "--checkpoint", str(s / "none.pt")], "checkpoint not found"),
    Case("garbage-checkpoint", "a checkpoint file that is not one",
         lambda p, s: ["teach", "--name", "small", "--checkpoint", _write(s / "g.pt", "not a checkpoint")],
         "cannot read checkpoint"),
    Case("checkpoint-misfit", "a teacher for 3 classes on a 4-class data set",
         lambda p, s: ["teach", "--name", "small", "--checkpoint", _checkpoint_for_3_classes(p, s)],
         "is for 3 classes x 1 channels, but data set tiny has 4 classes"),
    Case("store-exists", "teach again onto a finished store (no `--force`/`--reuse`)",
         lambda p, s: ["teach", "--name", "small"], "already exists; pass --force"),
    Case("foreign-partial", "a partial store left by a run with other params",
         _foreign_partial, "holds a partial store of a different run (differs in ['splits'])"),
    Case("no-store", "distill before teach",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd", "--store", str(s / "none.zarr")],
         "no logit store at"),
    Case("store-mismatch", "a store joined with shards of another data set",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd", "--shards", _other_dataset(p, s)],
         "does not match shards"),
    Case("resume-nothing", "`distill --resume` with nothing to resume",
         lambda p, s: ["distill", "--teacher", "small", "--loss", "kd", "--resume", "--out-dir", str(s / "st")],
         "--resume: no resume state"),
    Case("evaluate-no-model", "evaluate a student that was never trained",
         lambda p, s: ["evaluate", "--student", "small-kd-full-0"], "checkpoint not found"),
    Case("inspect-no-store", "`kdcache inspect` of a missing store",
         lambda p, s: ["inspect", str(s / "x.zarr")], "no store at"),
    Case("compare-bad-json", "`kdcache compare` of a file that is not JSON",
         lambda p, s: ["compare", _write(s / "m.json", "{"), _write(s / "n.json", "{}")], "is not a JSON metrics file"),
    Case("import-shape", "import-logits with (N, C+1) logits",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'w.npy', _logits(c=5))}"], "expected (N, C) or (N, V, C)"),
    Case("import-rows", "import-logits with one row too few",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'r.npy', _logits(n=255))}"], "255 rows but split 'train'"),
    Case("import-nan-mixed", "import-logits with NaN mixed into a row",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'n.npy', _with_row(np.nan))}"],
         "row 3 (key 00000003) holds NaN mixed with numbers"),
    Case("import-inf", "import-logits with an Inf (overflow)",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'i.npy', _with_row(np.inf))}"],
         "row 3 (key 00000003) holds Inf (an overflow)"),
    Case("import-all-inf", "import-logits whose train file is all +Inf",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'a.npy', np.full((256, 4), np.inf, np.float32))}"],
         "row 0 (key 00000000) holds Inf (an overflow)"),
    Case("import-empty", "import-logits whose split is all NaN (nothing queried)",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'e.npy', np.full((256, 4), np.nan, np.float32))}"],
         "pass --allow-empty if that is meant"),
    Case("import-pickle", "import-logits of a pickled `.npy`",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'p.npy', np.array([{}]), allow_pickle=True)}"],
         "holds pickled Python objects"),
    Case("import-split", "import-logits for a split the data set does not have",
         lambda p, s: [*IMPORT, "--logits", f"val={_npy(s, 'v.npy', _logits())}"], "split 'val' not in"),
    Case("import-arg", "`--logits train.npy` (no SPLIT=)",
         lambda p, s: [*IMPORT, "--logits", "train.npy"], "--logits expects SPLIT=FILE"),
    Case("import-no-file", "import-logits of a file that does not exist",
         lambda p, s: [*IMPORT, "--logits", f"train={s / 'none.npy'}"], "logits file"),
    Case("import-no-test", "import-logits of train without test",
         lambda p, s: [*IMPORT[:-1], "--logits", f"train={_npy(s, 't.npy', _logits())}"],
         "no logits for the test split (given: ['train'])"),
    Case("import-near-chance", "import-logits of a teacher at chance (constant logits)",
         lambda p, s: [*IMPORT, "--logits", f"train={_npy(s, 'z.npy', np.zeros((256, 4), np.float32))}"],
         "near chance (25.0% for 4 classes): its logits do not match this data set"),
    Case("py-no-import", "`arch: py:net.py:Net` whose file does not import",
         lambda p, s: _teacher(s, arch=f"py:{_write(s / 'net.py', 'import not_installed_pkg')}:Net"),
         "net.py failed: ModuleNotFoundError: No module named 'not_installed_pkg'"),
    Case("py-arguments", "a `py:` callable that needs other arguments",
         lambda p, s: _teacher(s, arch=f"py:{_write(s / 'net.py', NEEDS_DEPTH)}:build"),
         "needs arguments ['depth'] that kdcache cannot give"),
    Case("onnx-size", "an ONNX teacher made for 24x24 inputs on 16x16 images",
         lambda p, s: _teacher(s, checkpoint=_onnx(s, 24)), "takes only 24x24 inputs but would see 16x16 images"),
    Case("onnx-dynamic", "an ONNX teacher of dynamic input size with `preprocess: model`",
         lambda p, s: _teacher(s, checkpoint=_onnx(s, None), preprocess="model"),
         "takes the input size from the file, but its input size is dynamic"),
    Case("pt2-newer", "a `.pt2` saved by a newer torch",
         lambda p, s: _teacher(s, checkpoint=_newer_pt2(s)), "was saved by a newer torch (export schema"),
    Case("endpoint-html", "an endpoint URL that answers an HTML page",
         lambda p, s: _teacher(s, endpoint=_html_server()), "answers an HTML page, not kdcache's wire format"),
    Case("parquet-truncated", "import-logits of a truncated Parquet file",
         lambda p, s: [*IMPORT, "--logits", f"train={_write(s / 't.parquet', 'PAR1 half a file')}"],
         "not a readable Parquet file"),
]  # fmt: skip


def _teacher(scratch: Path, **entry) -> list[str]:
    """`train-teacher --name bad` with teacher `bad` = `entry` in the params."""
    return ["train-teacher", "--name", "bad", "--params", _params(scratch, teachers={"bad": entry})]


def _onnx(scratch: Path, size: int | None) -> str:
    """A cnn_tiny for the tiny data set exported to ONNX, for `size` x `size` inputs (None: dynamic H, W)."""
    import torch

    net = linear_teacher(load_manifest("data/shards/tiny")).net
    axes = {0: "b"} if size else {0: "b", 2: "h", 3: "w"}
    path = scratch / "t.onnx"
    with torch.no_grad():
        x = torch.zeros(2, 1, size or 16, size or 16)
        torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": axes})
    return str(path)


def _newer_pt2(scratch: Path) -> str:
    """A `.pt2` whose archive says a newer export schema than this torch reads."""
    import torch

    net = linear_teacher(load_manifest("data/shards/tiny")).net.eval()
    src, path = scratch / "t.pt2", scratch / "newer.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 16, 16),)), str(src))
    return str(bump_export_schema(src, path))


def _html_server() -> str:
    """A real HTTP server on 127.0.0.1 (Python's http.server, in a thread) answering every GET with a login page."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _drop_section(scratch: Path, name: str) -> str:
    path = scratch / "params.yaml"
    p = yaml.safe_load(path.read_text())
    del p[name]
    path.write_text(yaml.safe_dump(p))
    return str(path)


def _bad_manifest(proj: Path, scratch: Path) -> str:
    shards = scratch / "shards"
    shutil.copytree(proj / "data/shards/tiny", shards)
    (shards / "manifest.json").write_text('{"version": 1, "splits": ')
    return str(shards)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny project with an (untrained) teacher checkpoint and its finished store."""
    # no validation split: the import cases below give logits for all 256 train rows of the tiny source
    proj = make_project(tmp_path_factory.mktemp("errors") / "proj", tiny_params(prepare={"val": 0}))
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        prepare.main([])
        save_model("data/teachers/small.safetensors", linear_teacher(load_manifest("data/shards/tiny")), "cnn_tiny")
        teach.main(["--name", "small"])
    finally:
        os.chdir(cwd)
    return proj


def run_case(case: Case, proj: Path, scratch: Path, capsys: pytest.CaptureFixture) -> str:
    """Run the case's command; check the one-line contract; return the line."""
    argv = case.setup(proj, scratch)
    capsys.readouterr()
    code = kdcache(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"kdcache {argv[0]}: error: "), line
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_clean_line(case, project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    line = run_case(case, project, tmp_path, capsys)
    assert case.expect in line, line


def test_import_allow_empty_accepts_a_split_nobody_queried(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    empty = _npy(tmp_path, "e.npy", np.full((256, 4), np.nan, np.float32))
    out = tmp_path / "e.zarr"
    assert kdcache([*IMPORT, "--logits", f"train={empty}", "--allow-empty", "--out", str(out)]) == 0
    from pipeline.cache.store import LogitStore

    assert LogitStore(out, "train").teacher_calls == 0


def test_a_bug_keeps_its_traceback(capsys):
    """An exception outside the user-error family propagates: Python's handler prints its traceback (exit 1)."""
    from pipeline.stage import run_command

    with pytest.raises(ZeroDivisionError):
        run_command("kdcache x", lambda: 1 / 0)
    assert run_command("kdcache x", lambda: 0) == 0


def test_debug_shows_the_traceback_too(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setenv("KDCACHE_DEBUG", "1")
    assert kdcache(["prepare", "--params", _params(tmp_path, prepare={"shard_size": "abc"})]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "pipeline/config.py" in err
    assert (
        err.strip().splitlines()[-1]
        == "kdcache prepare: error: prepare.shard_size: expected a positive integer, got 'abc'"
    )


def test_a_real_stage_process_exits_2_with_exactly_one_line(tmp_path):
    params = _params(tmp_path, prepare={"shard_size": "abc"})
    env = {k: v for k, v in os.environ.items() if k != "KDCACHE_DEBUG"}
    res = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--params", params],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr == "python -m stages.prepare: error: prepare.shard_size: expected a positive integer, got 'abc'\n"


def table() -> str:
    """The bad-input table of BENCHMARKS.md, with the messages of this run."""
    import contextlib
    import io
    import tempfile

    rows = ["| bad input | command | what the user gets (stderr, exit 2) | test |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project(Path(tmp) / "proj", tiny_params(prepare={"val": 0}))
        os.chdir(proj)
        prepare.main([])
        save_model("data/teachers/small.safetensors", linear_teacher(load_manifest("data/shards/tiny")), "cnn_tiny")
        teach.main(["--name", "small"])
        for case in CASES:
            scratch = Path(tmp) / case.id
            scratch.mkdir()
            argv = case.setup(proj, scratch)
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):
                code = kdcache(argv)
            line = buf.getvalue().strip().splitlines()[-1].replace(tmp, "…").replace("|", "\\|")
            assert code == 2 and case.expect in line, (case.id, line)
            line = line if len(line) <= 200 else line[:199] + "…"
            rows.append(f"| {case.what} | `kdcache {argv[0]}` | `{line}` | `test_errors.py::{case.id}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    print(table())
