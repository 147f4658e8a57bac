"""Is a teacher meant for this data set? The rules every teacher check shares.

`train_teacher` (an imported checkpoint's validation top-1), `kdcache import-logits` (imported logits on every
labelled split) and `kdcache verify` (a store's rows) all judge a teacher by `near_chance`, the one definition of
"no better than guessing", and look for the label order under which it would agree far better
(`class_permutation`: a teacher trained with another class order is the commonest cause).
"""

from __future__ import annotations

import numpy as np


def near_chance(top1: float, num_classes: int) -> bool:
    """top-1 within the lowest fifth of the range between chance (1/C) and perfect: a teacher no better than a guess
    by any reasonable standard (its class order or input normalisation does not match the data set)."""
    chance = 1.0 / num_classes
    return top1 < chance + 0.2 * (1.0 - chance)


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows = the teacher's predicted class, columns = the true label."""
    return np.bincount(pred * num_classes + labels, minlength=num_classes * num_classes).reshape(num_classes, -1)


def class_permutation(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """The relabelling of the teacher's classes that agrees best with the labels, and the top-1 it would give.

    counts: (C, C) `confusion` of predictions vs labels. Returns (perm, top1) with perm[k] = the data set's label of
    the teacher's class k. Greedy matching, largest cell first: exact in the case it is for (a teacher trained
    with another class order, whose confusion is a permuted diagonal), O(C^2 log C), so it also runs at 21k
    classes where the Hungarian method's O(C^3) would not.
    """
    c = len(counts)
    perm = np.full(c, -1, dtype=np.int64)
    taken = np.zeros(c, dtype=bool)
    for flat in np.argsort(-counts, axis=None, kind="stable"):
        k, y = divmod(int(flat), c)
        if perm[k] < 0 and not taken[y]:
            perm[k], taken[y] = y, True
            if taken.all():
                break
    total = counts.sum()
    return perm, float(counts[np.arange(c), perm].sum() / total) if total else 0.0


def permutation_hint(counts: np.ndarray, top1: float) -> str:
    """'; relabelling ... would give 97.0%' when some class order agrees far better (20+ points) than `top1`."""
    perm, better = class_permutation(counts)
    if better < top1 + 0.2:
        return ""
    shown = f"as {perm.tolist()} (teacher class k -> label perm[k])" if len(perm) <= 100 else "by a permutation"
    return f"; relabelling the teacher's classes {shown} would give {better:.1%}"
