"""A live HTTP teacher (issue 28): real server processes on 127.0.0.1 (`kdcache serve`'s app under uvicorn, with
faults injected in front by `tests/endpoint_server.py`), the teach, train_teacher and query stages as clients.

What must hold: the endpoint's logits equal the local teacher's bit for bit; the server is asked about each
sample-view once, across retries, a server crash and restart, and a killed and resumed teach (counted server-side
in its answer log); 5xx bursts, timeouts and malformed bodies are retried; a wrong logit width, a changed model
fingerprint, an HTML page and retries running out end in one line (exit 2) with the rows already stored intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cache.store import LogitStore
from pipeline.cli import main as kdcache
from pipeline.layout import Layout
from tests.conftest import ROOT, TINY_PARAMS, taught_project, tiny_params

pytest.importorskip("uvicorn")

TINY_TEACHER = TINY_PARAMS["teachers"]["small"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m tests.endpoint_server` as a child process; `restart_on_exit` brings it back after a crash."""

    def __init__(self, checkpoint: Path, log: Path, plan: dict | None = None, restart_plan: dict | None = None) -> None:
        self.checkpoint, self.log, self.port = Path(checkpoint).resolve(), log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.restart_plan, self.starts = restart_plan, 0
        self._stop = threading.Event()
        self.proc = self._start(plan or {})
        self._watch = threading.Thread(target=self._watcher, daemon=True)
        self._watch.start()

    def _start(self, plan: dict) -> subprocess.Popen:
        self.starts += 1
        path = self.log.with_name(f"plan-{self.port}-{self.starts}.json")
        path.write_text(json.dumps(plan))
        cmd = [sys.executable, "-m", "tests.endpoint_server", str(self.checkpoint), "--port", str(self.port)]
        cmd += ["--plan", str(path), "--answer-log", str(self.log)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/v1/info", timeout=1).read()
                return proc
            time.sleep(0.2)
        proc.kill()
        raise RuntimeError("server did not start in 90 s")

    def _watcher(self) -> None:
        while not self._stop.is_set():
            if self.proc.poll() is not None and self.restart_plan is not None and not self._stop.is_set():
                self.proc = self._start(self.restart_plan)
            time.sleep(0.1)

    def answered(self) -> Counter:
        """(split, index, view) -> how many times the server answered it (all its processes)."""
        seen: Counter = Counter()
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                rec = json.loads(line)
                seen.update((rec["split"], i, v) for i, v in zip(rec["index"], rec["view"], strict=True))
        return seen

    def close(self) -> None:
        self._stop.set()
        self._watch.join(timeout=5)
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A tiny project with its demo teacher trained and cached locally (the reference store), shards of 32 rows."""
    proj = tmp_path_factory.mktemp("endpoint") / "proj"
    params = tiny_params(prepare={"shard_size": 32})
    params["teach"]["batch_size"] = 16
    taught_project(proj, params)
    layout = Layout(params["prepare"]["name"])
    return {"proj": proj, "params": params, "layout": layout}


@pytest.fixture
def project(served, tmp_path, monkeypatch):
    """A copy of the served project (shards, the small teacher and its store) to run endpoint teachers in."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(served["proj"], proj, symlinks=True)
    monkeypatch.chdir(proj)
    return proj


def use_endpoint(url: str, **settings) -> None:
    """params.yaml with teacher `api` at `url` (request size = teach.batch_size: the local pass's batches)."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    entry = {"endpoint": url, "batch_size": params["teach"]["batch_size"], "concurrency": 1, **settings}
    params["teachers"]["api"] = entry
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def splits(layout: Layout) -> list[str]:
    from pipeline.data.shards import load_manifest

    return list(load_manifest(layout.shards).splits)


def reference(layout: Layout) -> dict[str, np.ndarray]:
    return {s: LogitStore(layout.store("small"), s).read_all() for s in splits(layout)}


def assert_same_logits(layout: Layout, name: str = "api") -> None:
    for split, ref in reference(layout).items():
        got = LogitStore(layout.store(name), split).read_all()
        assert np.array_equal(got, ref, equal_nan=True), split


def store_ids(layout: Layout) -> set:
    """Every (split, index, view) the store holds."""
    ids = set()
    for split in splits(layout):
        s = LogitStore(layout.store("small"), split)
        ids |= {(split, i, k) for i in range(s.n) for k in range(s.views)}
    return ids


def test_endpoint_teacher_equals_the_local_one_bit_for_bit(served, project, tmp_path):
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl")
    try:
        use_endpoint(server.url, cost_per_call=0.002)
        assert kdcache(["train-teacher", "--name", "api"]) == 0  # checks the server, evaluates through it
        record = json.loads(layout.teacher_details("api").read_text())
        evaluated = sum(n for (split, *_), n in server.answered().items() if split == "eval")
        assert record["endpoint"]["calls"] == evaluated > 0 and record["endpoint"]["cost"] == pytest.approx(
            0.002 * evaluated
        )
        small = json.loads(layout.teacher_details("small").read_text())
        assert record["accuracy"] == small["accuracy"] and record["val_accuracy"] == small["val_accuracy"]
        assert kdcache(["teach", "--name", "api"]) == 0
        assert_same_logits(layout)
        store = LogitStore(layout.store("api"), "train")
        from pipeline.data.shards import sha256_file

        assert store.teacher["fingerprint"] == sha256_file(layout.teacher_checkpoint("small"))
        asked = Counter({k: n for k, n in server.answered().items() if k[0] != "eval"})
        assert set(asked) == store_ids(layout) and max(asked.values()) == 1  # each sample-view asked once
        run_log = json.loads(layout.run_log("teach", "api").read_text())
        assert run_log["endpoint"]["rows"] == len(asked) and run_log["endpoint"]["cost"] == pytest.approx(
            0.002 * len(asked)
        )
        assert not Path(f"{layout.store('api')}.answers").exists()  # the journal is gone once the store is
        assert kdcache(["distill", "--teacher", "api", "--loss", "kd"]) == 0
    finally:
        server.close()


@pytest.mark.slow
def test_5xx_bursts_timeouts_malformed_bodies_and_a_crash_are_survived(served, project, tmp_path):
    layout = served["layout"]
    plan = {"fail": [2, 3, 4], "retry_after": 0.1, "slow": [6], "slow_s": 3, "malformed": [8], "die_at": 11}
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl", plan, restart_plan={})
    try:
        use_endpoint(server.url, timeout_s=1.0, max_retries=6)
        from pipeline.cache.endpoint import write_endpoint_record

        info = json.loads(urllib.request.urlopen(server.url + "/v1/info").read())
        write_endpoint_record(layout.teacher_checkpoint("api"), info, 1)  # what train_teacher@api writes
        assert kdcache(["teach", "--name", "api"]) == 0
        assert server.starts == 2  # it crashed once and came back
        assert_same_logits(layout)
        asked = server.answered()
        assert set(asked) == store_ids(layout) and max(asked.values()) == 1
        run_log = json.loads(layout.run_log("teach", "api").read_text())["endpoint"]
        assert run_log["retries"] >= 6 and run_log["failures"] == 0
    finally:
        server.close()


@pytest.mark.slow
def test_a_killed_teach_resumes_without_asking_again(served, project, tmp_path):
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl", {"delay_s": 0.15})
    try:
        use_endpoint(server.url)
        from pipeline.cache.endpoint import write_endpoint_record

        info = json.loads(urllib.request.urlopen(server.url + "/v1/info").read())
        write_endpoint_record(layout.teacher_checkpoint("api"), info, 1)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.teach", "--name", "api"], env=env, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while sum(server.answered().values()) < 40 and time.monotonic() < deadline:  # mid-shard: 32-row shards
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first = server.answered()
        assert 40 <= sum(first.values()) < len(store_ids(layout)), "killed mid-run"
        assert Path(f"{layout.store('api')}.answers").exists()  # answers not yet in the store wait in the journal
        assert kdcache(["teach", "--name", "api"]) == 0
        assert_same_logits(layout)
        asked = server.answered()
        assert set(asked) == store_ids(layout)
        # Asked twice: at most the request in flight when the process died (answered by the server, never received,
        # so never journaled); every answer the client had received was taken from the journal, not asked again.
        twice = [k for k, n in asked.items() if n > 1]
        assert max(asked.values()) <= 2 and len(twice) <= 16, twice  # concurrency 1 x batch_size 16
        journal_rows = json.loads(layout.run_log("teach", "api").read_text())["endpoint"]["journal_rows"]
        assert journal_rows > 0
    finally:
        server.close()


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"width_from": 3, "width": 5}, r"returns 5 logits per row, but the data set has 4 classes"),
        ({"fingerprint_from": 3}, r"the endpoint's model changed mid-run \(fingerprint .* now\); the rows already"),
        (
            {"fail": list(range(3, 40))},
            r"failed 3 times, last with HTTP 503 overloaded; the rows already stored are kept",
        ),
    ],
    ids=["width", "fingerprint", "retries"],
)
def test_what_retrying_cannot_fix_is_one_line_and_keeps_the_stored_rows(
    served, project, tmp_path, capsys, plan, message
):
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl", plan)
    try:
        use_endpoint(server.url, max_retries=2)
        from pipeline.cache.endpoint import write_endpoint_record

        info = json.loads(urllib.request.urlopen(server.url + "/v1/info").read())
        write_endpoint_record(layout.teacher_checkpoint("api"), info, 1)
        assert kdcache(["teach", "--name", "api"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        import re

        assert len(err) == 1 and re.search(message, err[0]), err
        assert err[0].startswith("kdcache teach: error: teachers.api")
        partial = Path(f"{layout.store('api')}.partial")
        assert partial.exists() and not layout.store("api").exists()  # never taken for a finished store
        journal = Path(f"{layout.store('api')}.answers")
        kept = sum(1 for _ in journal.glob("*/*.npz"))
        assert kept == 2  # the two answers received before the fault, journaled for the rerun
    finally:
        server.close()


def test_an_endpoint_answering_html_is_one_line(served, project, tmp_path, capsys):
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl", {"html_info": True})
    try:
        use_endpoint(server.url)
        assert kdcache(["train-teacher", "--name", "api"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "teachers.api.endpoint:" in err[0] and "answers an HTML page" in err[0], err
        assert not layout.teacher_checkpoint("api").exists()
    finally:
        server.close()


def test_a_server_that_is_not_there_is_one_line_after_its_retries(served, project, capsys):
    use_endpoint(f"http://127.0.0.1:{free_port()}", max_retries=1)
    assert kdcache(["train-teacher", "--name", "api"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed 2 times, last with" in err[0] and "Connection refused" in err[0], err


def test_an_endpoint_teacher_cannot_be_asked_online(served, project, capsys):
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), project / "answers.jsonl")
    try:
        use_endpoint(server.url)
        assert kdcache(["train-teacher", "--name", "api"]) == 0
        assert kdcache(["teach", "--name", "api"]) == 0
    finally:
        server.close()
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["distill"]["teacher_source"] = "online"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert kdcache(["distill", "--teacher", "api", "--loss", "kd"]) == 2
    assert "is a live endpoint" in capsys.readouterr().err


def test_an_active_query_asks_the_endpoint_only_about_its_rounds_picks(served, project, tmp_path):
    """`query@q` against the endpoint with a budget: the rounds ask exactly the budget's sample-views of the train
    split (each once), the other splits whole, and the store equals the local teacher's on every call made."""
    layout = served["layout"]
    server = Server(layout.teacher_checkpoint("small"), tmp_path / "answers.jsonl")
    try:
        use_endpoint(server.url, cost_per_call=0.01)
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["query"] = {"q": {"teacher": "api", "budget": 60, "initial": 20, "per_round": 20, "steps": 20}}
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert kdcache(["train-teacher", "--name", "api"]) == 0
        evaluated = Counter({k: n for k, n in server.answered().items() if k[0] == "eval"})
        assert kdcache(["query", "--name", "q"]) == 0
        store = LogitStore(layout.store("q"), "train")
        asked = Counter({k: n for k, n in server.answered().items() if k[0] != "eval"})
        train = {k for k in asked if k[0] == "train"}
        queried = store.queried()
        assert len(train) == store.teacher_calls == int(queried.sum()) == 60 and max(asked.values()) == 1
        assert train == {("train", int(i), int(v)) for i, v in zip(*np.nonzero(queried), strict=True)}
        ref = LogitStore(layout.store("small"), "train").read_all()
        assert np.array_equal(store.read_all()[queried], ref[queried])  # the endpoint's answers, bit for bit
        assert sum(evaluated.values()) > 0
    finally:
        server.close()


def test_the_report_prices_the_calls_students_used():
    """`cost_per_call` of an endpoint teacher (and of the query stores asking it) becomes the report's cost column."""
    from pipeline.config import call_costs
    from pipeline.evaluation.report import _cost, _cost_head, _cost_note

    params = tiny_params()
    params["teachers"]["api"] = {"endpoint": "http://127.0.0.1:1", "cost_per_call": 0.25}
    params["query"] = {"q": {"teacher": "api", "budget": 10, "initial": 5, "per_round": 5}}
    costs = call_costs(params)
    assert costs == {"api": 0.25, "q": 0.25}  # the demo teacher has no price: left out
    assert _cost(costs, "q", [8, 12]) == ["2.50"] and _cost(costs, "small", [8]) == [""]
    assert _cost_head(costs) == ["cost"] and "api 0.25, q 0.25" in _cost_note(costs)[0]
    assert _cost({}, "q", [8]) == [] and _cost_head({}) == [] and _cost_note({}) == []
