"""Test-split evaluation: predictions in index order and the metrics computed from them.

Everything here is plain numpy on `(N, C)` logit arrays (no scipy), so each metric can be checked
against a by-hand computation:

- top-k accuracy; teacher-student top-1 agreement `mean_i [argmax s_i == argmax t_i]`;
- the mean per-sample Pearson and Spearman correlation between student and teacher logits, the
  diagnostic of the CMKD paper (how well the student reproduces the teacher's class *ranking*, not
  just its arg-max);
- expected calibration error (Guo et al. 2017) and the per-bin data of a reliability diagram;
- a confusion-matrix CSV for DVC's `confusion` plot template;
- accuracy on the corrupted copies of the test split made by `pipeline.data.corruptions`
  (Hendrycks & Dietterich 2019): per corruption (mean over severities) and their mean (mCA).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.models.predict import predict_arrays
from pipeline.training.validate import topk_accuracy

if TYPE_CHECKING:
    from pipeline.data.corruptions import CorruptedSet


ECE_BINS = 15  # Guo et al. 2017 use M = 15 equal-width bins


# ---------------------------------------------------------------------------------------------
# accuracy and agreement


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement between two sets of logits (N, C): mean_i [argmax a_i == argmax b_i]."""
    return float((a.argmax(1) == b.argmax(1)).mean())


# ---------------------------------------------------------------------------------------------
# correlations (CMKD's diagnostic)


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Ranks 1..C within each row of (N, C), ties getting the average of their ranks (as scipy's 'average').

    E.g. [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]. Vectorised: sort each row, number the runs of equal
    values across the whole array, and give every member of a run the mean of its sorted positions.
    """
    x = np.asarray(x)
    n, c = x.shape
    if c == 0:
        return np.zeros((n, 0))
    order = np.argsort(x, axis=1, kind="stable")
    s = np.take_along_axis(x, order, axis=1)  # (N, C) sorted rows
    new_run = np.ones((n, c), dtype=bool)
    new_run[:, 1:] = s[:, 1:] != s[:, :-1]  # a run starts at every row start and every value change
    run = np.cumsum(new_run.ravel()) - 1  # global run id of each sorted position
    pos = np.tile(np.arange(1, c + 1, dtype=np.float64), n)  # 1-based rank of each sorted position
    avg = np.bincount(run, weights=pos) / np.bincount(run)  # mean rank per run
    ranks = np.empty((n, c), dtype=np.float64)
    np.put_along_axis(ranks, order, avg[run].reshape(n, c), axis=1)
    return ranks


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between row i of `a` and row i of `b` (N, C) -> (N,).

    r_i = sum_c (a_ic - mean a_i)(b_ic - mean b_i) / sqrt(sum_c (a_ic - mean a_i)^2 sum_c (b_ic - mean b_i)^2);
    NaN where a row is constant (r is undefined there).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _nanmean(x: np.ndarray) -> float:
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def mean_pearson(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean over samples of the Pearson correlation between student and teacher logits (constant rows skipped)."""
    return _nanmean(rowwise_pearson(student, teacher))


def mean_spearman(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean over samples of Spearman's rho: Pearson r of the rows' average-tie ranks (`rank_rows`).

    Teacher logits cached as float16 tie more often than float32 ones, which is why ties are averaged.
    """
    return _nanmean(rowwise_pearson(rank_rows(student), rank_rows(teacher)))


# ---------------------------------------------------------------------------------------------
# calibration


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C), shifted by the row max for stability."""
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def reliability_bins(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[Any]]:
    """Reliability-diagram data: per equal-width confidence bin B_b = (b/M, (b+1)/M], b = 0..M-1.

    Confidence is max_c softmax(z)_c; a sample is correct when its arg-max is its label. Returns
    `count` |B_b|, `accuracy` acc(B_b) = mean correct and `confidence` conf(B_b) = mean confidence
    (None for an empty bin), and the bin `edges` (M + 1). Confidence exactly 0 falls into bin 0.
    """
    p = softmax(np.asarray(logits, dtype=np.float64))
    conf = p.max(1)
    correct = p.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # bin b = (edges[b], edges[b+1]]
    count = np.bincount(which, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    return {
        "edges": [float(e) for e in edges],
        "count": [int(c) for c in count],
        "accuracy": [float(a / c) if c else None for a, c in zip(acc_sum, count, strict=True)],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
    }


def ece_from_bins(rel: dict[str, list[Any]]) -> float:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| from `reliability_bins` output (empty bins add 0)."""
    n = sum(rel["count"])
    if n == 0:
        return float("nan")
    return float(
        sum(c / n * abs(a - f) for c, a, f in zip(rel["count"], rel["accuracy"], rel["confidence"], strict=True) if c)
    )


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    return ece_from_bins(reliability_bins(logits, labels, bins))


# ---------------------------------------------------------------------------------------------
# confusion matrix


def write_confusion_csv(path: str | Path, labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> Path:
    """One row per test sample with columns `actual,predicted` (class names): DVC's `confusion` template input.

    `pipeline.evaluation.study.read_correct` reads it back as per-image correctness (the report's paired tests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(classes)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((names[int(a)], names[int(p)]) for a, p in zip(labels, predicted, strict=True))
    return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = actual class, column = predicted class."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


# ---------------------------------------------------------------------------------------------
# assembling a student's metrics (the record layout of `pipeline.records`)


def split_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray | None = None,
    topk: Sequence[int] = (1, 5),
    bins: int = ECE_BINS,
) -> dict[str, Any]:
    """A student's clean test-split metrics, and its relation to the teacher when `teacher_logits` are given.

    Top level (the numbers compared, `pipeline.records.SUMMARY_KEYS`): `accuracy` (top-1), `ece`, and with a
    teacher `agreement`. Nested: `test` = {`n`, `top{k}` for each other k of `topk`, `reliability` =
    {edges [M + 1], count, accuracy, confidence [M]}}; with a teacher, `teacher` = the teacher's cached logits
    on the same images: {`n`, `ece`, `pearson`, `spearman` (mean per-sample correlation with the student's
    logits), `reliability`}. The teacher's own top-1 is not here: it is computed once, by `train_teacher`, in
    the teacher's record. Every teacher row must be finite (`teacher_test_logits` refuses a store that lacks rows).
    """
    rel_s = reliability_bins(logits, labels, bins)
    out: dict[str, Any] = {"accuracy": topk_accuracy(logits, labels, 1), "ece": ece_from_bins(rel_s)}
    test: dict[str, Any] = {"n": int(len(labels))}
    test.update({f"top{k}": topk_accuracy(logits, labels, k) for k in topk if k != 1})
    test["reliability"] = rel_s
    out["test"] = test
    if teacher_logits is not None:
        t = np.asarray(teacher_logits, dtype=np.float32)
        ok = np.isfinite(t).all(1)
        if not ok.all():  # the store's reader refuses such rows first: a subset would not compare across students
            raise ValueError(f"teacher logits are not finite for {int((~ok).sum())} of {len(ok)} test rows")
        s, y = logits, labels
        out["agreement"] = agreement(s, t)
        rel_t = reliability_bins(t, y, bins)
        out["teacher"] = {
            "n": int(ok.sum()),
            "ece": ece_from_bins(rel_t),
            "pearson": mean_pearson(s, t),
            "spearman": mean_spearman(s, t),
            "reliability": rel_t,
        }
    return out


def robustness_metrics(
    model: nn.Module,
    cset: CorruptedSet,
    clean_logits: np.ndarray | None,
    batch_size: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Accuracy on a corrupted test set (Hendrycks & Dietterich 2019), one batched pass per corruption.

    Keys: `mca` = mean corruption accuracy (the mean over corruptions of each corruption's mean over
    severities); `robustness` = {`per_corruption`: {name: mean over severities}, `severities`: [levels],
    `per_severity`: {name: [accuracy at each severity]}, `clean`: the accuracy on the same rows uncorrupted,
    from `clean_logits` (N_test, C), so the drop is comparable}.
    """
    k, s, n = cset.images.shape[:3]
    per_corruption: dict[str, float] = {}
    per_sev: dict[str, list[float]] = {}
    for ki, name in enumerate(cset.corruptions):
        flat = cset.images[ki].reshape(s * n, *cset.images.shape[3:])  # (S*N, H, W, C): one pass for all severities
        pred = predict_arrays(model, flat, batch_size, device).argmax(1).reshape(s, n)
        accs = (pred == cset.labels[None, :]).mean(1)
        per_sev[name] = [float(a) for a in accs]
        per_corruption[name] = float(accs.mean())
    rob: dict[str, Any] = {
        "per_corruption": per_corruption,
        "severities": [int(v) for v in cset.severities],
        "per_severity": per_sev,
    }
    if clean_logits is not None:
        rob["clean"] = float((clean_logits[cset.index].argmax(1) == cset.labels).mean())
    return {"mca": float(np.mean(list(per_corruption.values()))), "robustness": rob}
