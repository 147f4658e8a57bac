"""Which unqueried sample-views an active round asks the teacher about: ranked by the student alone.

Every score returns the candidates in the order they are asked for, a pure function of its inputs with ties
broken by candidate position, so the first k of a ranking never depend on how many are taken: a round that
takes fewer calls (the last round of a smaller budget) takes a prefix of what a larger one would take.

- `entropy`: H(p) = -sum_c p_c log p_c of the student's softmax, largest first (Settles 2009, "Active
  Learning Literature Survey", §3.1 uncertainty sampling).
- `margin`: p_(1) - p_(2), the gap between the two most likely classes, smallest first (Scheffer et al. 2001;
  a strong baseline across benchmarks: Bahri et al. 2022, "Is margin all you need?").
- `diversity`: uncertain *and* far apart: the `shortlist` lowest-margin sample-views (`candidates` x per_round in
  a query: fixed per query, so a round's first k picks are the same whatever k), then k-center greedy
  (Sener & Savarese 2018, "Active Learning for CNNs: A Core-Set Approach") on the student's penultimate features,
  starting from the sample-views already queried: each pick is the candidate farthest (Euclidean) from every
  queried and already-picked one. Margin first, diversity second is Cluster-Margin's order (Citovsky et al. 2021).
"""

from __future__ import annotations

import numpy as np

SCORES = ("entropy", "margin", "diversity")  # == pipeline.config.QUERY_SCORES
NEEDS_FEATURES = ("diversity",)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(M, C) logits -> (M, C) probabilities, in float64 (scores compare small differences)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """(M, C) -> (M,) Shannon entropy in nats (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return -terms.sum(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """(M, C) -> (M,) top-1 minus top-2 probability (1 for a single class)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.partition(probs, -2, axis=1)[:, -2:]  # (M, 2): second largest, largest
    return top2[:, 1] - top2[:, 0]


def _ascending(values: np.ndarray) -> np.ndarray:
    """Positions sorted by value, ties by position (a stable sort: deterministic prefixes)."""
    return np.argsort(values, kind="stable")


def k_center_greedy(candidates: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    """The first k picks of k-center greedy: positions into `candidates` (K, D), starting from `centers` (P, D).

    Each step takes the candidate whose distance to its nearest center is largest (ties: the first) and makes it
    a center. With no centers the first pick is candidate 0 (the most uncertain, in `select`'s use).
    """
    k = min(k, len(candidates))
    x = candidates.astype(np.float64)
    nearest = np.full(len(x), np.inf)
    for start in range(0, len(centers), 1024):  # (K, <=1024) distances at a time
        c = centers[start : start + 1024].astype(np.float64)
        d = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
        nearest = np.minimum(nearest, np.maximum(d, 0.0).min(axis=1))
    picks = np.empty(k, dtype=np.int64)
    for i in range(k):
        j = int(np.argmax(nearest))  # inf (no centers yet) ties resolve to the first candidate
        picks[i] = j
        d = ((x - x[j]) ** 2).sum(1)
        nearest = np.minimum(nearest, d)
        nearest[j] = -1.0  # never picked twice
    return picks


def select(
    score: str,
    logits: np.ndarray,
    k: int,
    *,
    features: np.ndarray | None = None,
    pool_features: np.ndarray | None = None,
    shortlist: int | None = None,
) -> np.ndarray:
    """The k candidates to ask about, best first: positions into the rows of `logits` (M, C).

    features (M, D) and pool_features (P, D): the student's penultimate features of the candidates and of the
    sample-views already queried, and `shortlist` (>= k; default 10 k) how many of the lowest-margin candidates
    k-center greedy chooses from (`diversity` only).
    """
    if score not in SCORES:
        raise ValueError(f"unknown query score '{score}'; available: {list(SCORES)}")
    k = min(k, len(logits))
    probs = softmax(logits)
    if score == "entropy":
        return _ascending(-entropy(probs))[:k]
    by_margin = _ascending(margin(probs))
    if score == "margin":
        return by_margin[:k]
    if features is None or pool_features is None:
        raise ValueError("score 'diversity' needs the candidates' and the queried pool's features")
    short = by_margin[: max(k, shortlist if shortlist is not None else 10 * k)]  # most uncertain first
    return short[k_center_greedy(features[short], pool_features, k)]
