"""Budget-limited teacher queries: selection order, prefixes, reuse of earlier calls, training on the queried set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache.budget import BudgetSpec, query_mask, resolve_budget, selection_order
from pipeline.cache.store import LogitStore
from pipeline.cache.teach import PreviousCalls, build_spec, run_teach
from pipeline.data.views import PadCropFlip
from tests.conftest import linear_teacher

RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}


@given(
    n=st.integers(1, 300),
    views=st.integers(1, 3),
    seed=st.integers(0, 100),
    strategy=st.sampled_from(["random", "class_balanced"]),
)
@settings(max_examples=40, deadline=None)
def test_selection_is_a_seeded_permutation(n, views, seed, strategy):
    labels = np.random.default_rng(seed).integers(0, 5, n)
    order = selection_order(labels, views, strategy, seed)
    assert sorted(order.tolist()) == list(range(n * views))
    assert np.array_equal(order, selection_order(labels, views, strategy, seed))


def test_class_balanced_prefixes_are_balanced():
    labels = np.repeat(np.arange(10), 100)
    order = selection_order(labels, 2, "class_balanced", 0)
    for k in (10, 30, 100, 500):
        counts = np.bincount(labels[order[:k] // 2], minlength=10)
        assert counts.max() - counts.min() <= 1, (k, counts)


def test_budget_n_is_a_prefix_of_budget_m():
    labels = np.random.default_rng(0).integers(0, 4, 500)
    small = query_mask(labels, 2, 100, "random", 3)
    big = query_mask(labels, 2, 300, "random", 3)
    assert small.sum() == 100 and big.sum() == 300 and not (small & ~big).any()


def test_bad_budgets():
    assert resolve_budget("full", 10) == 10 and resolve_budget(None, 10) == 10
    assert resolve_budget(50, 10) == 10  # clamped, with a warning
    for bad in (0, -3, "lots"):
        with pytest.raises(ValueError, match="budget"):
            resolve_budget(bad, 10)
    with pytest.raises(ValueError, match="unknown budget strategy 'greedy'"):
        selection_order(np.zeros(3, int), 1, "greedy", 0)


class CountingTeacher(torch.nn.Module):
    """Wraps a teacher and counts the sample-views it is asked about."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.inner(x)


def _spec(m, n):
    return build_spec(
        m,
        {"name": "t", "arch": "cnn_tiny", "weights_sha256": "w"},
        RECIPES,
        dtype="float32",
        topk=0,
        compressor="blosc-zstd",
        chunk_rows=32,
        budget=BudgetSpec(n, "random", 0),
    )


def test_only_selected_views_reach_the_teacher_and_raising_the_budget_reuses_calls(tiny_manifest, tmp_path):
    m = tiny_manifest
    out = tmp_path / "t.zarr"
    t = CountingTeacher(linear_teacher(m))
    run_teach(m, t, out, _spec(m, 100), RECIPES)
    assert t.calls == 100 + 96  # 100 train sample-views + the (unbudgeted) test split
    s = LogitStore(out, "train", m)
    assert s.teacher_calls == 100 and s.queried().sum() == 100
    assert np.isnan(s.read_all()[~s.queried()]).all()
    small = s.read_all()

    t.calls = 0
    run_teach(m, t, out, _spec(m, 300), RECIPES, previous=PreviousCalls.find(out, _spec(m, 300)))
    assert t.calls == 200  # only the 200 new train sample-views; old train and test calls reused
    s = LogitStore(out, "train", m)
    assert s.teacher_calls == 300 and s.attrs["calls_reused"] == 100 + 96
    q_small = ~np.isnan(small[..., 0])
    np.testing.assert_array_equal(s.read_all()[q_small], small[q_small])
    assert not (tmp_path / "t.zarr.previous").exists()

    # The result equals a store made with budget 300 from scratch.
    fresh = CountingTeacher(linear_teacher(m))
    run_teach(m, fresh, tmp_path / "f.zarr", _spec(m, 300), RECIPES)
    np.testing.assert_allclose(LogitStore(tmp_path / "f.zarr", "train").read_all(), s.read_all(), atol=1e-6)


def test_store_of_another_teacher_is_not_reused(tiny_manifest, tmp_path):
    m = tiny_manifest
    out = tmp_path / "t.zarr"
    run_teach(m, linear_teacher(m), out, _spec(m, 100), RECIPES)
    other = build_spec(
        m,
        {"name": "t", "arch": "cnn_tiny", "weights_sha256": "OTHER"},
        RECIPES,
        dtype="float32",
        topk=0,
        compressor="blosc-zstd",
        chunk_rows=32,
        budget=BudgetSpec(300, "random", 0),
    )
    assert PreviousCalls.find(out, other) is None
    assert not out.exists()  # the stale store is gone; the caller recomputes everything


def test_same_budget_rerun_recomputes(tiny_manifest, tmp_path):
    """DVC reruns teach when its code changes: that must not silently keep the old logits."""
    m = tiny_manifest
    out = tmp_path / "t.zarr"
    run_teach(m, linear_teacher(m), out, _spec(m, 100), RECIPES)
    assert PreviousCalls.find(out, _spec(m, 100)) is None


def test_budget_students_train_on_the_queried_pool(tmp_path, monkeypatch):
    """distill --budget n: n teacher calls, pool in memory, CKD counts its distinct comparisons."""
    import json
    from pathlib import Path

    from pipeline.records import read_record
    from stages import distill, evaluate, prepare, teach, train_teacher
    from tests.conftest import make_project, tiny_params

    params = tiny_params(distill={"losses": ["kd", "ckd"], "budgets": [40], "pool_epoch_samples": 128})
    params["distill"]["loss_params"]["ckd"] = {"T": 4.0, "groups_per_step": 16}
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    train_teacher.main(["--name", "small"])
    teach.main(["--name", "small"])
    for loss in ("kd", "ckd"):
        distill.main(["--teacher", "small", "--loss", loss, "--budget", "40"])
        evaluate.main(["--student", f"small-{loss}-40-0"])
        m = read_record(f"metrics/details/small-{loss}-40-0.json", "student")
        assert m["teacher_calls"] == 40 and m["student"]["train_samples"] == 40
    curves = json.loads(Path("plots/curves/small-ckd-40-0.json").read_text())
    n = curves[-1]["distinct_comparisons"]
    assert 16 < n <= 40 * 39  # many distinct ordered pairs out of 40 calls, never more than exist
    assert m["student"]["distinct_comparisons"] == n
    # unqueried: ce trains on every sample (the queried ones with the loss, the rest with CE)
    params["distill"]["unqueried"] = "ce"
    make_project(tmp_path, params)
    distill.main(["--teacher", "small", "--loss", "kd", "--budget", "40", "--out-dir", "s2", "--curves", "c2.json"])
    assert json.loads(Path("c2.json").read_text())[-1]["train_ce_unqueried"] > 0


def test_pool_draws_cover_the_pool_evenly_and_ckd_groups_never_repeat_a_sample(tiny_manifest, tmp_path):
    from pipeline.losses import build_loss
    from pipeline.training.pool import ComparisonTracker, QueriedPool

    m = tiny_manifest
    run_teach(m, linear_teacher(m), tmp_path / "t.zarr", _spec(m, 30), RECIPES)
    allowed = LogitStore(tmp_path / "t.zarr", "train").queried()
    pool = QueriedPool(m, "train", tmp_path / "t.zarr", allowed, seed=0, epoch_samples=95)
    d = pool.draws(0)
    assert len(d) == 95 and np.bincount(d, minlength=30).min() == 3  # 3 full passes + 5 extra
    assert not np.array_equal(d, pool.draws(1))
    batch = next(pool.numpy_batches(64, False))  # pool of 30 < batch of 64: repeats are unavoidable
    tracker = ComparisonTracker(build_loss("ckd", groups_per_step=200))
    groups = tracker.draw({k: torch.from_numpy(v) for k, v in batch.items()})
    ids = torch.from_numpy(batch["pool_id"])[groups]
    assert len(groups) > 0 and (ids[:, 0] != ids[:, 1]).all()
    assert tracker.distinct <= 30 * 29


def test_pool_batches_carry_the_loss_teacher_features(tiny_manifest, tmp_path):
    """Budget runs train from the in-memory pool: its batches get the loss's teacher side like streamed ones."""
    from pipeline.losses import build_loss
    from pipeline.training.pool import QueriedPool
    from pipeline.training.transport import make_loader

    m = tiny_manifest
    run_teach(m, linear_teacher(m), tmp_path / "t.zarr", _spec(m, 30), RECIPES)
    allowed = LogitStore(tmp_path / "t.zarr", "train").queried()
    loss = build_loss("cmkd")
    pool = QueriedPool(
        m, "train", tmp_path / "t.zarr", allowed, seed=0, epoch_samples=40, teacher_features=loss.teacher_features
    )
    for workers in (0, 1):
        batch = next(iter(make_loader(pool, 16, workers)))
        want = loss.teacher_features(batch["logits"])
        assert sorted(k for k in batch if k.startswith("tf/")) == sorted(f"tf/{k}" for k in want)
        for k, v in want.items():
            assert torch.equal(batch[f"tf/{k}"], v), k
