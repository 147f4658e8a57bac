"""Evaluation metrics against by-hand values and naive (loop) implementations on small fixed inputs."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.data.corruptions import CorruptConfig, load_corrupted, write_corrupted
from pipeline.data.shards import read_rows
from pipeline.evaluation.metrics import (
    agreement,
    confusion_matrix,
    expected_calibration_error,
    mean_pearson,
    mean_spearman,
    rank_rows,
    reliability_bins,
    robustness_metrics,
    rowwise_pearson,
    split_metrics,
    write_confusion_csv,
)
from pipeline.evaluation.study import read_correct
from pipeline.models import predict_arrays
from pipeline.training.dataset import DistillDataset
from pipeline.training.validate import predict_split, topk_accuracy
from tests.conftest import linear_teacher

# Six samples, three classes, given as probabilities (logits = log p + a per-row shift, which softmax ignores).
# Confidences avoid bin edges k/15 so float rounding cannot move a sample across one.
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # conf .90 -> bin 13, label 0: correct
        [0.95, 0.03, 0.02],  # conf .95 -> bin 14, label 1: wrong
        [0.62, 0.28, 0.10],  # conf .62 -> bin 9,  label 0: correct
        [0.20, 0.70, 0.10],  # conf .70 -> bin 10, label 1: correct
        [0.10, 0.25, 0.65],  # conf .65 -> bin 9,  label 0: wrong
        [0.42, 0.33, 0.25],  # conf .42 -> bin 6,  label 0: correct
    ]
)
LABELS = np.array([0, 1, 0, 1, 0, 0])
LOGITS = np.log(PROBS) + np.arange(6)[:, None] * 3.0


def test_ece_by_hand():
    # bin 13: |1 - .90| = .10; bin 14: |0 - .95| = .95; bin 9: |1/2 - (.62 + .65)/2| = .135 (2 samples);
    # bin 10: |1 - .70| = .30; bin 6: |1 - .42| = .58  ->  ECE = (.10 + .95 + 2 * .135 + .30 + .58) / 6
    assert expected_calibration_error(LOGITS, LABELS) == pytest.approx(2.2 / 6, abs=1e-12)
    rel = reliability_bins(LOGITS, LABELS)
    assert rel["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 2, 1, 0, 0, 1, 1]
    assert rel["accuracy"][9] == 0.5 and rel["confidence"][9] == pytest.approx(0.635)
    assert rel["accuracy"][14] == 0.0 and rel["confidence"][14] == pytest.approx(0.95)
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None  # empty bin
    assert len(rel["edges"]) == 16 and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    # one bin: ECE = |accuracy - mean confidence|
    assert expected_calibration_error(LOGITS, LABELS, bins=1) == pytest.approx(abs(4 / 6 - PROBS.max(1).mean()))


def test_ece_of_a_calibrated_predictor_is_small():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4) * 0.5, size=20000)
    labels = np.array([rng.choice(4, p=row) for row in p])  # labels drawn from p: calibrated by construction
    assert expected_calibration_error(np.log(p), labels) < 0.02
    assert expected_calibration_error(np.log(p) * 4, labels) > 0.1  # sharpened: overconfident


def test_topk_and_agreement():
    assert topk_accuracy(LOGITS, LABELS, 1) == pytest.approx(4 / 6)
    # top-2: row 1 (label 1 second), row 4 (label 0 is last) -> 5 of 6
    assert topk_accuracy(LOGITS, LABELS, 2) == pytest.approx(5 / 6)
    assert topk_accuracy(LOGITS, LABELS, 5) == 1.0  # k > C: all classes
    teacher = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]], dtype=float)
    # student arg-max: 0, 0, 0, 1, 2, 0; teacher: 0, 1, 2, 1, 2, 1 -> agree on rows 0, 3, 4
    assert agreement(LOGITS, teacher) == pytest.approx(3 / 6)
    assert agreement(teacher, teacher) == 1.0


def naive_rank(row: list[float]) -> list[float]:
    """Average rank by definition: 1 + #smaller + (#equal - 1) / 2."""
    return [1 + sum(v < x for v in row) + (sum(v == x for v in row) - 1) / 2 for x in row]


def naive_pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def test_ranks_with_ties_by_hand():
    x = np.array([[10, 20, 20, 5], [1, 1, 1, 1], [3, 2, 1, 0], [2, 1, 2, 1]], dtype=np.float16)
    expected = [[2, 3.5, 3.5, 1], [2.5, 2.5, 2.5, 2.5], [4, 3, 2, 1], [3.5, 1.5, 3.5, 1.5]]
    np.testing.assert_array_equal(rank_rows(x), expected)


def test_correlations_by_hand():
    s = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    t = np.array([[1.0, 1, 2, 2], [4, 3, 2, 1], [1, 2, 3, 4]])
    # row 0: ranks of t = [1.5, 1.5, 3.5, 3.5]; centred s . centred t = 4, |s|^2 = 5, |t|^2 = 4 -> 4 / sqrt(20)
    # row 1: reversed order -> -1; row 2: constant student -> undefined, left out of the mean
    r = rowwise_pearson(rank_rows(s), rank_rows(t))
    assert r[0] == pytest.approx(4 / math.sqrt(20)) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    assert mean_spearman(s, t) == pytest.approx((4 / math.sqrt(20) - 1) / 2)
    # Pearson on raw values: row 0 = cov([-1.5,-.5,.5,1.5], [-.5,-.5,.5,.5]) = 2 / sqrt(5 * 1)
    assert mean_pearson(s, t) == pytest.approx((2 / math.sqrt(5) - 1) / 2)
    assert mean_pearson(s[2:], t[2:]) != mean_pearson(s[2:], t[2:])  # all rows undefined -> NaN


def test_spearman_is_invariant_to_monotone_maps_pearson_is_not():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(50, 10)), rng.normal(size=(50, 10))
    assert mean_spearman(s, t) == pytest.approx(mean_spearman(np.exp(s), t**3))
    assert mean_pearson(s, t) != pytest.approx(mean_pearson(np.exp(s), t**3))
    assert mean_spearman(s, s) == pytest.approx(1.0) and mean_pearson(s, 2 * s + 1) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.int8, st.tuples(st.integers(1, 5), st.integers(2, 7)), elements=st.integers(-3, 3)),
    st.randoms(use_true_random=False),
)
def test_rank_and_correlations_match_naive(a, rnd):
    """Integer logits in [-3, 3]: many ties. Vectorised ranks/correlations == the by-definition loops."""
    b = np.array([[rnd.randint(-3, 3) for _ in row] for row in a], dtype=np.int8)
    np.testing.assert_allclose(rank_rows(a), [naive_rank(list(map(float, row))) for row in a])
    rows = [(list(map(float, x)), list(map(float, y))) for x, y in zip(a, b, strict=True)]
    sp = [naive_pearson(naive_rank(x), naive_rank(y)) for x, y in rows]
    pe = [naive_pearson(x, y) for x, y in rows]
    for got, want in ((mean_spearman(a, b), sp), (mean_pearson(a, b), pe)):
        want = [w for w in want if not math.isnan(w)]
        if want:
            assert got == pytest.approx(sum(want) / len(want), abs=1e-9)
        else:
            assert math.isnan(got)


def test_confusion_csv_and_matrix(tmp_path):
    labels, pred = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    classes = ["t-shirt", "trouser, long", "bag"]  # a comma must survive the CSV round trip
    path = write_confusion_csv(tmp_path / "c" / "x.csv", labels, pred, classes)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["actual"], r["predicted"]) for r in rows] == [
        ("t-shirt", "t-shirt"),
        ("trouser, long", "bag"),
        ("bag", "bag"),
        ("bag", "trouser, long"),
    ]
    np.testing.assert_array_equal(confusion_matrix(labels, pred, 3), [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


def test_split_metrics_keys_and_missing_teacher_rows_refused():
    teacher = LOGITS.copy()
    m = split_metrics(LOGITS, LABELS, teacher, topk=(1, 5))
    # the compared numbers on top (pipeline.records.SUMMARY_KEYS), the rest nested
    assert m["accuracy"] == pytest.approx(4 / 6) and m["test"]["top5"] == 1.0 and m["test"]["n"] == 6
    assert "top1" not in m["test"]  # top-1 is `accuracy`, once
    assert m["agreement"] == 1.0
    t = m["teacher"]
    assert t["spearman"] == pytest.approx(1.0) and t["pearson"] == pytest.approx(1.0) and t["n"] == 6
    assert m["ece"] == pytest.approx(2.2 / 6) and t["ece"] == pytest.approx(2.2 / 6, abs=1e-6)  # float32 cache
    assert "top1" not in t and "accuracy" not in t  # the teacher's accuracy is its own record's (one computation)
    rel = m["test"]["reliability"]
    assert len(rel["count"]) == 15 and t["reliability"]["count"] == rel["count"]
    assert len(rel["edges"]) == 16
    teacher[0] = np.nan  # a missing teacher row: never a subset that other students' numbers would not match
    with pytest.raises(ValueError, match="not finite for 1 of 6 test rows"):
        split_metrics(LOGITS, LABELS, teacher)
    bare = split_metrics(LOGITS, LABELS, None)
    assert "agreement" not in bare and "teacher" not in bare


def test_confusion_csv_reads_back_as_per_image_correctness(tmp_path):
    labels, pred = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 1, 1])
    path = write_confusion_csv(tmp_path / "x.csv", labels, pred, ["a", "b, with comma", "c"])
    np.testing.assert_array_equal(read_correct(path), labels == pred)
    (tmp_path / "bad.csv").write_text("label,pred\n0,0\n")
    with pytest.raises(ValueError, match="actual,predicted"):
        read_correct(tmp_path / "bad.csv")


def test_predict_arrays_matches_the_shard_path_and_robustness(tiny_manifest, tmp_path):
    torch.manual_seed(0)
    model = linear_teacher(tiny_manifest)
    logits, labels = predict_split(model, DistillDataset(tiny_manifest, "test", shuffle=False), 32)
    images, labels2 = read_rows(tiny_manifest, "test", np.arange(tiny_manifest.split("test").n))
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_allclose(predict_arrays(model, images, 40), logits, rtol=1e-5, atol=1e-5)

    cfg = CorruptConfig(corruptions=("gaussian_noise", "contrast"), severities=(1, 5), seed=0, limit=24)
    cset = load_corrupted(write_corrupted(tmp_path / "corrupt", tiny_manifest, cfg), tiny_manifest)
    m = robustness_metrics(model, cset, logits, batch_size=16)
    rob = m["robustness"]
    for k, name in enumerate(cfg.corruptions):
        accs = [(predict_arrays(model, cset.images[k, s], 64).argmax(1) == cset.labels).mean() for s in range(2)]
        assert rob["per_severity"][name] == pytest.approx(accs)
        assert rob["per_corruption"][name] == pytest.approx(np.mean(accs))
    assert m["mca"] == pytest.approx((rob["per_corruption"]["gaussian_noise"] + rob["per_corruption"]["contrast"]) / 2)
    assert rob["clean"] == pytest.approx((logits[cset.index].argmax(1) == labels[cset.index]).mean())
    assert rob["severities"] == [1, 5]
