"""Budget-limited teacher queries: which sample-views the teacher may see.

`budget: n` means the teacher is called on only n sample-views (CKD's few-teacher-inference
setting, Xu et al. 2023, arXiv 2311.02253). The selection *order* is a pure function of
`(labels, views, strategy, seed)`, so budget n is always a prefix of budget m > n: raising a budget
only adds calls, and every experiment can say exactly which calls it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("random", "class_balanced")


def selection_order(labels: np.ndarray, views: int, strategy: str, seed: int) -> np.ndarray:
    """All N*V sample-view ids (`i * views + v`) in the order the teacher is asked for them.

    random: a seeded permutation. class_balanced: classes take turns (round robin over a seeded
    class order), each class's sample-views in seeded random order, so any prefix is balanced to
    within one call per class.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown budget strategy '{strategy}'; available: {list(STRATEGIES)}")
    n = len(labels)
    rng = np.random.default_rng([seed, 0xB0D6E7])
    ids = rng.permutation(n * views)
    if strategy == "random":
        return ids
    cls = np.asarray(labels)[ids // views]
    # Rank of each id within its class (in permuted order), then interleave classes by that rank.
    order = np.argsort(cls, kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    counts = np.bincount(cls)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(len(ids)) - np.repeat(starts, counts)
    class_pos = rng.permutation(len(counts))[cls]  # seeded tie-break between classes in a round
    return ids[np.lexsort((class_pos, rank))]


def resolve_budget(budget: int | str | None, total: int) -> int:
    """Budget param -> number of calls. None / 'full' = all; larger than the data set = clamp, with a warning."""
    b = parse_budget(budget)
    if b is None:
        return total
    if b > total:
        log.warning("budget %d exceeds the %d sample-views available; using all of them", b, total)
        return total
    return b


def parse_budget(budget: int | str | None) -> int | None:
    """A budget as given (params.yaml, `--budget`): a positive integer, or None / 'full' (no limit)."""
    if budget is None or budget == "full":
        return None
    try:
        b = int(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"budget must be a positive integer or 'full', got {budget!r}") from None
    if b <= 0 or isinstance(budget, bool) or (isinstance(budget, float) and budget != b):
        raise ConfigError(f"budget must be a positive integer or 'full', got {budget!r}")
    return b


def query_mask(labels: np.ndarray, views: int, budget: int | str | None, strategy: str, seed: int) -> np.ndarray:
    """(N, V) bool: the sample-views the first `budget` calls of the selection order cover."""
    n = len(labels)
    k = resolve_budget(budget, n * views)
    mask = np.zeros(n * views, dtype=bool)
    if k == n * views:
        mask[:] = True
    else:
        mask[selection_order(labels, views, strategy, seed)[:k]] = True
    return mask.reshape(n, views)


@dataclass(frozen=True)
class BudgetSpec:
    """A teacher-call budget: how many sample-views (`n`, None = all) and how they are chosen.

    The store records it (`to_attrs`) so a student can take exactly the first `k` calls of the same order.
    """

    n: int | None = None
    strategy: str = "random"
    seed: int = 0

    @property
    def is_full(self) -> bool:
        return self.n in (None, "full")

    def mask(self, labels: np.ndarray, views: int) -> np.ndarray:
        """(N, V) bool of the sample-views this budget queries."""
        if self.is_full:
            return np.ones((len(labels), views), dtype=bool)
        return query_mask(labels, views, self.n, self.strategy, self.seed)

    def prefix(self, n: int | str | None) -> BudgetSpec:
        """The same selection order, cut at `n` calls (a distill budget below the store's)."""
        return BudgetSpec(parse_budget(n), self.strategy, self.seed)

    def to_attrs(self) -> dict[str, Any]:
        return {"n": self.n, "strategy": self.strategy, "seed": self.seed}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> BudgetSpec:
        """From a store's `budget` attribute (stores without one hold every call)."""
        attrs = attrs or {}
        return cls(attrs.get("n"), attrs.get("strategy", "random"), int(attrs.get("seed", 0)))
