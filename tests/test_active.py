"""Active teacher queries (`pipeline.active`, stage `query`): scores, rounds, the store's order, resume, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.active import rounds as rounds_mod
from pipeline.active.rounds import plan_rounds, rounds_path, run_query
from pipeline.active.scores import entropy, k_center_greedy, margin, select, softmax
from pipeline.cache.budget import selection_order
from pipeline.cache.inspect_store import format_info, inspect_store
from pipeline.cache.store import LogitStore
from pipeline.config import ConfigError, DistillConfig, QuerySpec, TeachConfig, from_dict, query_section
from pipeline.data.shards import Manifest, load_manifest, read_rows, write_dataset
from pipeline.data.sources import load_split
from pipeline.data.views import ViewRecipe
from pipeline.models.predict import classifier_layer, predict_arrays, predict_features
from pipeline.models.registry import build_for
from tests.conftest import assert_same_files, linear_teacher, synthetic_splits, tiny_params

TEACHER = {"name": "small", "arch": "cnn_tiny", "weights_sha256": "w"}


# ---------------------------------------------------------------------------------------------
# scores


def _naive_entropy(p):
    return [-sum(x * np.log(x) for x in row if x > 0) for row in p]


def _naive_k_center(x, centers, k):
    """k-center greedy written out the slow way (float64, explicit loops)."""
    cs = [list(c) for c in centers]
    picks = []
    for _ in range(k):
        best, best_d = None, -1.0
        for i, xi in enumerate(x):
            if i in picks:
                continue
            d = min((sum((a - b) ** 2 for a, b in zip(xi, c, strict=True)) for c in cs), default=np.inf)
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
        cs.append(list(x[best]))
    return picks


def test_entropy_and_margin_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)) * 3
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(entropy(p), _naive_entropy(p), rtol=1e-12)
    top = np.sort(p, axis=1)
    np.testing.assert_allclose(margin(p), top[:, -1] - top[:, -2])
    assert entropy(np.eye(3)).tolist() == [0.0, 0.0, 0.0]  # 0 log 0 = 0
    # most uncertain first: entropy largest, margin smallest
    assert select("entropy", logits, 5).tolist() == np.argsort(-entropy(p), kind="stable")[:5].tolist()
    assert select("margin", logits, 5).tolist() == np.argsort(margin(p), kind="stable")[:5].tolist()


def test_k_center_greedy_matches_the_slow_version():
    rng = np.random.default_rng(1)
    x, centers = rng.normal(size=(40, 3)), rng.normal(size=(5, 3))
    assert k_center_greedy(x, centers, 8).tolist() == _naive_k_center(x, centers, 8)
    assert k_center_greedy(x, centers[:0], 4).tolist() == _naive_k_center(x, centers[:0], 4)  # no centers yet
    assert len(set(k_center_greedy(x, centers, 40).tolist())) == 40  # never the same candidate twice


def test_diversity_spreads_uncertain_picks_apart():
    """Two tight clusters of equally uncertain candidates: margin takes one cluster, diversity both."""
    logits = np.zeros((20, 3))
    logits[:, 0] = np.r_[np.linspace(0.0, 0.01, 10), np.linspace(0.02, 0.03, 10)]  # all nearly uniform
    features = np.r_[np.zeros((10, 2)), np.full((10, 2), 10.0)] + np.arange(20)[:, None] * 1e-3
    pool = np.array([[-50.0, -50.0]])
    by_margin = select("margin", logits, 2)
    spread = select("diversity", logits, 2, features=features, pool_features=pool, shortlist=20)
    assert (features[by_margin, 0] < 5).all() or (features[by_margin, 0] > 5).all()  # one cluster
    assert sorted(features[spread, 0] > 5) == [False, True]  # one from each
    with pytest.raises(ValueError, match="needs the candidates"):
        select("diversity", logits, 2)
    with pytest.raises(ValueError, match="unknown query score"):
        select("greedy", logits, 2)


@given(
    score=st.sampled_from(["entropy", "margin", "diversity"]),
    m=st.integers(1, 60),
    k=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_fewer_picks_are_a_prefix_of_more(score, m, k, seed):
    """The first k picks never depend on how many are taken: budget n is a prefix of budget m > n."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(size=(m, 4)), 1)  # rounded: ties happen and must break the same way
    feats, pool = rng.normal(size=(m, 3)), rng.normal(size=(4, 3))
    kw = {"features": feats, "pool_features": pool, "shortlist": 3 * (k + 5)}  # a query's: candidates x per_round
    small, big = select(score, logits, k, **kw), select(score, logits, k + 5, **kw)
    assert small.tolist() == big[: len(small)].tolist() and len(set(small.tolist())) == len(small)


def test_plan_rounds():
    assert plan_rounds(60, 20, 15) == [20, 15, 15, 10]
    assert plan_rounds(20, 20, 15) == [20]
    assert plan_rounds(10, 20, 15) == [10]  # a clamped budget below initial
    with pytest.raises(ConfigError):
        plan_rounds(60, 20, 0)


# ---------------------------------------------------------------------------------------------
# penultimate features


ZOO = ["cnn_tiny", "resnet8", "wrn_16_2", "mobilenetv2", "shufflenetv1", "vgg8", "tv:resnet18"]


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_students_have_a_classifier_whose_input_is_the_features(arch):
    meta = type("M", (), {"num_classes": 4, "image_shape": (16, 16, 3), "mean": [0.5] * 3, "std": [0.25] * 3})
    model = build_for(arch, meta).eval()
    layer = classifier_layer(model)
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 4
    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    logits, feats = predict_features(model, images, 2)
    assert feats.shape == (5, layer.in_features)
    np.testing.assert_allclose(logits, predict_arrays(model, images, 2), atol=1e-5)
    with torch.no_grad():  # the features are what the classifier maps to the logits
        np.testing.assert_allclose(layer(torch.from_numpy(feats)).numpy(), logits, atol=1e-4)


def test_a_model_without_a_classifier_layer_has_no_features():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(8, 4), torch.nn.Identity())

    net = Net()
    assert classifier_layer(net) is net.head[1]  # the last Linear of a named head block
    assert classifier_layer(torch.nn.Conv2d(1, 4, 3)) is None
    assert classifier_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4))) is None  # unnamed
    with pytest.raises(ValueError, match="no identifiable classifier"):
        predict_features(torch.nn.Conv2d(1, 4, 3), np.zeros((1, 4, 4, 1), np.uint8), 1)


# ---------------------------------------------------------------------------------------------
# the rounds, on a tiny data set with a validation split


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    splits, classes = synthetic_splits(n_train=192, n_test=64)
    val = load_split("synthetic", None, "test", n=64, size=16, channels=1, num_classes=4, seed=1)
    splits["val"] = (val.images, val.labels)
    return write_dataset(tmp_path_factory.mktemp("active") / "tiny", "tiny", splits, classes, shard_size=64)


def _configs(**query):
    p = tiny_params()
    p["distill"]["train"].update({"threads": 1})
    teach = from_dict(TeachConfig, p["teach"], "teach")
    distill = from_dict(DistillConfig, {**p["distill"], "pool_epoch_samples": 64}, "distill")
    base = {"teacher": "small", "budget": 50, "initial": 20, "per_round": 12, "score": "margin", "steps": 4}
    return teach, distill, from_dict(QuerySpec, {**base, **query}, "query.x")


class RecordingTeacher:
    """A teacher (callable on uint8 images) that keeps every image it is asked about."""

    def __init__(self, manifest: Manifest, fail_after: int | None = None) -> None:
        self.model = linear_teacher(manifest)
        self.seen: list[np.ndarray] = []
        self.fail_after = fail_after

    @property
    def calls(self) -> int:
        return sum(len(x) for x in self.seen)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and self.calls + len(images) > self.fail_after:
            raise KeyboardInterrupt("killed")  # as a SIGINT would: not an Exception, nothing catches it
        self.seen.append(images.copy())
        return predict_arrays(self.model, images, 64)


def _query(manifest, out, teacher, *, reuse=False, **query):
    teach, distill, spec = _configs(**query)
    return run_query(manifest, teacher, out, spec, teach, distill, "x", teacher=TEACHER, reuse=reuse)


def _sorted_bytes(images: np.ndarray) -> list[bytes]:
    return sorted(x.tobytes() for x in images)


@pytest.mark.parametrize("score", ["entropy", "margin", "diversity"])
def test_the_teacher_sees_exactly_the_selected_sample_views(manifest, tmp_path, score):
    t = RecordingTeacher(manifest)
    path = _query(manifest, tmp_path / "x.zarr", t, score=score)
    store = LogitStore(path, "train", manifest)
    queried, rounds, order = store.queried(), store.query_rounds(), store.query_order()
    n_other = manifest.split("val").n + manifest.split("test").n
    assert t.calls == 50 + n_other and store.teacher_calls == 50  # the budget, plus the unbudgeted splits
    assert np.bincount(rounds[queried]).tolist() == [20, 12, 12, 6]
    assert ((rounds >= 0) == queried).all() and sorted(order[queried].tolist()) == list(range(50))
    # The train images it saw are exactly the selected sample-views, each with its view's augmentation.
    rows, views = np.nonzero(queried)
    recipe = ViewRecipe.from_dict(store.view_recipe)
    expected = recipe.apply(read_rows(manifest, "train", rows)[0], rows, views)
    seen = _sorted_bytes(np.concatenate(t.seen))
    others = [read_rows(manifest, s, np.arange(manifest.split(s).n))[0] for s in ("val", "test")]
    assert seen == _sorted_bytes(np.concatenate([expected, *others]))
    np.testing.assert_allclose(  # and the store holds its answers there, NaN elsewhere
        store.read_all()[rows, views], predict_arrays(t.model, expected, 64), rtol=1e-2, atol=1e-2
    )
    assert np.isnan(store.read_all()[~queried]).all()
    # round 0 is the seed strategy's fixed order; the round log says what each round cost
    log_rows = store.group.attrs["rounds"]
    assert [r["calls"] for r in log_rows] == [20, 12, 12, 6] and [r["pool"] for r in log_rows] == [0, 20, 32, 44]
    assert [r["student_steps"] for r in log_rows] == [0, 4, 4, 4]
    assert store.attrs["budget"] == {"n": 50, "strategy": "active", "seed": 0}
    assert not rounds_path(path).exists()  # the round checkpoints are gone once the store is complete


@pytest.mark.parametrize("score", ["margin", "diversity"])
def test_budget_n_is_a_prefix_and_raising_it_goes_on_from_the_last_round(manifest, tmp_path, score):
    fresh = _query(manifest, tmp_path / "fresh" / "x.zarr", RecordingTeacher(manifest), budget=50, score=score)
    small = _query(manifest, tmp_path / "grow" / "x.zarr", RecordingTeacher(manifest), budget=26, score=score)
    big, small_store = LogitStore(fresh, "train"), LogitStore(small, "train")
    s_order, b_order = small_store.query_order(), big.query_order()
    assert ((s_order >= 0) == ((b_order >= 0) & (b_order < 26))).all()  # the same first 26 calls, in order
    np.testing.assert_array_equal(s_order[s_order >= 0], b_order[s_order >= 0])
    t = RecordingTeacher(manifest)
    grown = _query(manifest, tmp_path / "grow" / "x.zarr", t, budget=50, reuse=True, score=score)
    assert t.calls == 50 - 26  # only the new calls: round 1 grows from 6 to 12, then rounds 2 and 3
    assert_same_files(grown, fresh)  # byte for byte the store a fresh run with the larger budget writes


def test_a_killed_run_resumes_in_its_round_keeping_the_calls_made(manifest, tmp_path, monkeypatch):
    fresh = _query(manifest, tmp_path / "fresh" / "x.zarr", RecordingTeacher(manifest))
    out = tmp_path / "killed" / "x.zarr"
    n_other = manifest.split("val").n + manifest.split("test").n
    # 1. killed by the teacher in round 2 (after 20 + 12 + 5 train calls)
    with pytest.raises(KeyboardInterrupt):
        _query(manifest, out, RecordingTeacher(manifest, fail_after=n_other + 37))
    stored = int(LogitStore(Path(f"{out}.partial"), "train", partial=True).queried().sum())
    assert 32 <= stored < 44 and not out.exists()  # rounds 0-1, and the shards of round 2 written before the kill
    # 2. then killed while training round 3's student, after its first epoch checkpoint
    real_train = rounds_mod.fit_student.__globals__["train"]

    killed: list[bool] = []

    def train_then_die(*args, **kwargs):
        if kwargs.get("desc", "").endswith("round 3") and not killed:
            killed.append(True)
            real_train(*args, **kwargs, stop_after_epoch=0)
            raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setitem(rounds_mod.fit_student.__globals__, "train", train_then_die)
    t = RecordingTeacher(manifest)
    with pytest.raises(KeyboardInterrupt):
        _query(manifest, out, t)
    assert t.calls == 44 - stored  # only round 2's calls still owed (the other splits were done before)
    assert (rounds_path(out) / "round-3" / "resume" / "resume.json").is_file()
    # 3. the third run resumes round 3's student from its checkpoint and finishes
    t = RecordingTeacher(manifest)
    done = _query(manifest, out, t)
    assert t.calls == 6
    assert_same_files(done, fresh)


def test_students_distil_from_an_active_store_and_their_record_says_how_it_was_chosen(tmp_path, monkeypatch):
    """The query stage through to distill and evaluate: prefix budgets, the record's `student.query`, inspect."""
    from pipeline.records import read_record
    from stages import distill, evaluate, prepare, query, teach, train_teacher
    from tests.conftest import make_project

    q = {"teacher": "small", "budget": 40, "initial": 16, "per_round": 12, "seed_strategy": "class_balanced"}
    q.update({"score": "diversity", "candidates": 4, "loss": "kd", "steps": 4, "seed": 0})
    params = tiny_params(query={"small_div": q}, distill={"teachers": ["small_div"], "budgets": [20, "full"]})
    params["teachers"]["small"]["epochs"] = 1
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    train_teacher.main(["--name", "small"])
    query.main(["--name", "small_div"])
    store = LogitStore("data/logits/small_div.zarr", "train")
    assert store.teacher_calls == 40 and store.teacher["name"] == "small"
    for budget in ("20", "full"):
        distill.main(["--teacher", "small_div", "--loss", "dist", "--budget", budget])
        evaluate.main(["--student", f"small_div-dist-{budget}-0"])
    rec = read_record("metrics/details/small_div-dist-20-0.json", "student")
    assert rec["teacher_calls"] == 20 and rec["student"]["train_samples"] == 20
    assert rec["student"]["query"] == {"strategy": "active", "score": "diversity", "rounds": 2,
                                       "selection_steps": 4, "seed": 0}  # fmt: skip
    assert read_record("metrics/details/small_div-dist-full-0.json")["student"]["query"]["rounds"] == 3
    with pytest.raises(ConfigError, match=r"budget 41 needs teacher calls.*query.<name>.budget"):
        distill.main(["--teacher", "small_div", "--loss", "dist", "--budget", "41"])
    labels = load_manifest("data/shards/tiny").iter_labels("train")
    info = inspect_store("data/logits/small_div.zarr", labels=labels)
    assert info["queries_per_round"] == {0: 16, 1: 12, 2: 12} and sum(info["queries_per_class"].values()) == 40
    round0 = (store.query_rounds() == 0).any(1)
    counts = np.bincount(labels[round0], minlength=4)
    assert counts.max() - counts.min() <= 1  # class_balanced seed round
    assert "round   2:      12 calls" in format_info(info)
    # the teach stage is not involved: no store of the teacher itself was made
    assert not Path("data/logits/small.zarr").exists()
    teach.main(["--name", "small"])  # and one made now is independent of the active one
    assert LogitStore("data/logits/small.zarr", "train").teacher_calls == 2 * store.n


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_query_entries_are_config_errors_naming_the_key():
    teachers = {"small": {"arch": "cnn_tiny"}}

    def check(entry, match, extra=None):
        with pytest.raises(ConfigError, match=match):
            query_section({"teachers": teachers, "query": {"q": entry}, **(extra or {})})

    base = {"teacher": "small", "budget": 100, "initial": 20, "per_round": 10}
    check({**base, "initial": 200}, r"query.q.initial: 200 calls in round 0 is more than the whole budget of 100")
    check({**base, "per_round": 0}, r"query.q.per_round: expected a positive integer, got 0")
    check({**base, "score": "greedy"}, r"query.q.score: expected one of \['entropy', 'margin', 'diversity'\]")
    check({**base, "teacher": "nope"}, r"query.q.teacher: 'nope' is not a teacher; name one of the teachers")
    check({**base, "teacher": "both"}, r"'both' is an ensemble, which has no model", {"ensembles": {"both": {}}})
    with pytest.raises(ConfigError, match=r"query.small: 'small' is also a teacher"):
        query_section({"teachers": teachers, "query": {"small": base}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rounds'\]"):
        query_section({"teachers": teachers, "query": {"q": {**base, "rounds": 3}}})
    assert query_section({"teachers": teachers, "query": {}}) == {}


def test_a_score_on_features_needs_a_student_with_a_classifier(manifest, tmp_path, monkeypatch):
    headless = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    monkeypatch.setattr(rounds_mod, "build_for", lambda *a, **k: headless)
    t = RecordingTeacher(manifest)
    with pytest.raises(ConfigError, match=r"query.x.score: 'diversity' compares the student's penultimate features"):
        _query(manifest, tmp_path / "x.zarr", t, score="diversity")
    assert t.calls == 0 and not (tmp_path / "x.zarr.partial").exists()  # refused before any teacher call


def test_a_budget_above_the_data_set_is_clamped_with_a_warning(manifest, tmp_path, caplog):
    t = RecordingTeacher(manifest)
    total = 2 * manifest.split("train").n
    with caplog.at_level(logging.WARNING):
        path = _query(manifest, tmp_path / "x.zarr", t, budget=10_000, initial=total - 24, per_round=500)
    assert f"budget 10000 exceeds the {total} sample-views available" in caplog.text
    store = LogitStore(path, "train")
    assert store.teacher_calls == total and store.query_rounds().max() == 1  # every view; round 1 took the rest


def test_a_round_loss_without_params_fails_before_any_call(manifest, tmp_path):
    t = RecordingTeacher(manifest)
    with pytest.raises(ConfigError, match="no parameters for loss 'kdd'"):
        _query(manifest, tmp_path / "x.zarr", t, loss="kdd")
    assert t.calls == 0


def test_a_partial_store_of_another_query_is_not_resumed(manifest, tmp_path):
    out = tmp_path / "x.zarr"
    n_other = manifest.split("val").n + manifest.split("test").n
    with pytest.raises(KeyboardInterrupt):
        _query(manifest, out, RecordingTeacher(manifest, fail_after=n_other + 25))
    with pytest.raises(ValueError, match="holds a partial store of a different run"):
        _query(manifest, out, RecordingTeacher(manifest), score="entropy")


def test_the_sweep_driver_end_to_end_on_a_tiny_project(tmp_path, monkeypatch):
    """benchmarks/active_sweep.py: one store per strategy/budget/seed (the project's data untouched), every loss
    on every store, tables against random with intervals, the figure; a rerun trains and queries nothing."""
    import benchmarks.active_sweep as sweep
    import benchmarks.students as students
    from pipeline.models import save_model
    from stages import prepare
    from tests.conftest import make_project

    make_project(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    m = load_manifest("data/shards/tiny")
    save_model("data/teachers/small.safetensors", linear_teacher(m), "cnn_tiny")
    trained: list[str] = []
    orig = students.train_student
    monkeypatch.setattr(students, "train_student", lambda *a, **k: trained.append(a[2].sid) or orig(*a, **k))
    argv = ["--teacher", "small", "--budgets", "16", "--seeds", "0", "1", "--strategies", "random", "margin"]
    argv += ["--losses", "kd", "--steps", "2", "--round-steps", "2", "--pool-epoch", "32", "--rounds", "2"]
    sweep.main([*argv, "--out", "work"])
    assert sorted(trained) == sorted(["small-kd-16-0", "small-kd-16-1"] * 2)  # one per strategy and seed
    assert not Path("data/logits").exists()  # the project's stores are not touched
    active = LogitStore("work/stores/margin-16-1-kd.zarr", "train")
    assert active.teacher_calls == 16 and np.bincount(active.query_rounds()[active.queried()]).tolist() == [8, 8]
    fixed = LogitStore("work/stores/random-16-1.zarr", "train")
    assert fixed.attrs["budget"] == {"n": 16, "strategy": "random", "seed": 1}
    # round 0 of the active store is the random order's first 8 calls (the same seed)
    ids = selection_order(m.iter_labels("train"), 2, "random", 1)[:8]
    assert (active.query_rounds().reshape(-1)[ids] == 0).all() and fixed.queried().reshape(-1)[ids].all()
    md = Path("work/results.md").read_text()
    assert "| kd | " in md and "Against `random`" in md and "| margin | 16 | 2 | 2 |" in md
    res = json.loads(Path("work/results.json").read_text())
    assert len(res["cells"]["margin|kd|16"]) == 2 and "margin|kd|16" in res["vs_random"]
    assert Path("work/active.png").stat().st_size > 1000
    trained.clear()
    sweep.main([*argv, "--out", "work"])
    assert trained == []  # resumable: finished students and stores are kept
