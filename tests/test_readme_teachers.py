"""README "Any teacher": its code and params snippets, exactly as printed, on tiny data.

The section shows a model file (`weights/mynet.py`) and three params snippets: a `py:` teacher and student, an
exported ONNX teacher, and a live endpoint with an active query. This test writes the file, merges each snippet into
the tiny test params (the snippets' keys win, taken verbatim, except the endpoint's port: a free one), and runs them:
the `py:` teacher is trained and cached and a `py:` student distilled from it; the trained teacher is exported to the
snippet's ONNX file and imported; `kdcache serve` (a real server process) serves the trained teacher and the
endpoint snippet's teacher and active query run against it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cache.store import LogitStore
from pipeline.cli import main as kdcache
from pipeline.layout import Layout
from pipeline.models import load_model
from tests.conftest import ROOT, make_project, tiny_params

pytest.importorskip("onnx")
pytest.importorskip("uvicorn")

SECTION = "## Any teacher: your own code, a model file, a live endpoint"


def section_blocks(lang: str) -> list[str]:
    body = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{lang}\n(.*?)^```", body, flags=re.S | re.M)


def merge(params: dict, snippet: dict) -> None:
    for sec, values in snippet.items():
        if sec in ("teachers", "query"):
            params.setdefault(sec, {}).update(values)
        else:
            params[sec].update(values)


def write(params: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_teacher_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = section_blocks("python")
    py, onnx_teacher, endpoint = (yaml.safe_load(b) for b in section_blocks("yaml"))
    assert code.startswith("# weights/mynet.py\n")
    assert py["teachers"]["mine"]["arch"] == "py:weights/mynet.py:MyNet"
    assert onnx_teacher["teachers"]["exported"] == {"checkpoint": "weights/teacher.onnx"}
    assert endpoint["teachers"]["api"]["endpoint"].startswith("http://127.0.0.1:")

    params = tiny_params()
    merge(params, py)
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    Path("weights/mynet.py").write_text(code)
    layout = Layout(params["prepare"]["name"])

    # 1. your own code: teacher trained from it, cached, and a student of it distilled
    for cmd in (["prepare"], ["teachers"], ["train-teacher", "--name", "mine"], ["teach", "--name", "mine"]):
        assert kdcache(cmd) == 0, cmd
    assert kdcache(["distill", "--teacher", "mine", "--loss", "kd"]) == 0
    model, meta = load_model(layout.teacher_checkpoint("mine"))
    assert meta["code"]["file"] == "weights/mynet.py"
    _, smeta = load_model(layout.student_model("mine-kd-full-0"))
    assert smeta["arch"] == "py:weights/mynet.py:MyNet"

    # 2. the trained teacher exported to the snippet's ONNX file, imported as a teacher of its own
    with torch.no_grad():
        torch.onnx.export(
            model.net.eval(), (torch.zeros(2, 1, 16, 16),), "weights/teacher.onnx", dynamo=False,  # tiny: 16x16x1
            input_names=["x"], dynamic_axes={"x": {0: "b"}},
        )  # fmt: skip
    merge(params, onnx_teacher)
    write(params)
    for cmd in (["teachers"], ["train-teacher", "--name", "exported"], ["teach", "--name", "exported"]):
        assert kdcache(cmd) == 0, cmd
    mine = LogitStore(layout.store("mine"), "train").read_all()
    exported = LogitStore(layout.store("exported"), "train").read_all()
    np.testing.assert_allclose(exported, mine, atol=2e-2, rtol=2e-3)  # float16 stores of float32-close logits

    # 3. the endpoint snippet against `kdcache serve` (a real server process), with its active query
    port = free_port()
    url = endpoint["teachers"]["api"]["endpoint"]
    endpoint["teachers"]["api"]["endpoint"] = re.sub(r":\d+$", f":{port}", url)
    merge(params, endpoint)
    write(params)
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", str(layout.teacher_checkpoint("mine")), "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=1).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "kdcache serve did not start"
                time.sleep(0.2)
        for cmd in (["train-teacher", "--name", "api"], ["teach", "--name", "api"], ["query", "--name", "q"]):
            assert kdcache(cmd) == 0, cmd
    finally:
        server.terminate()
        server.wait(timeout=30)
    api = LogitStore(layout.store("api"), "train").read_all()
    np.testing.assert_allclose(api, mine, atol=1e-3, rtol=1e-3)  # merged batches: equal up to float rounding
    q = LogitStore(layout.store("q"), "train")
    assert q.teacher_calls == endpoint["query"]["q"]["budget"]
    assert kdcache(["distill", "--teacher", "q", "--loss", "kd"]) == 0
