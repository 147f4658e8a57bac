"""What the training loop trains on: the `BatchSource` protocol and its per-epoch plan.

Two sources implement it: `DistillDataset` streams a split's shards joined with cached logits (full
runs, teacher training, evaluation), and `QueriedPool` holds the few sample-views a budgeted teacher
answered in memory (budget runs). `pipeline.training.loop.train` and `make_loader` see only this
protocol, so a new source (e.g. an active-learning pool) needs no change to either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe

#: the loss's teacher side, computed next to the batch: teacher logits (B, C) -> {name: (B, ...)}
TeacherFeatures = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch delivers to each DDP rank: samples and DataLoader batches (per-worker partial batches count)."""

    samples: tuple[int, ...]  # per rank
    batches: tuple[int, ...]  # per rank

    @property
    def steps(self) -> int:
        """Optimizer steps every rank runs this epoch (ranks with fewer batches pad with zero-weight steps)."""
        return max(self.batches, default=0)

    def active(self, step: int) -> int:
        """How many ranks hold a real batch at `step`."""
        return sum(b > step for b in self.batches)


@runtime_checkable
class BatchSource(Protocol):
    """An epoch-by-epoch stream of numpy batches that the training loop can plan before it starts.

    Batches are dicts of numpy arrays: ``image (B, H, W, C) uint8``, ``label (B,)``, ``index (B,)``,
    ``view (B,)`` and, with a teacher, ``logits (B, C) float32`` + ``has_teacher (B,) bool``; a source
    may add more (the pool's ``pool_id``). ``teacher_features`` (or None) is applied to every batch by
    the loader, next to the batch (see `pipeline.training.transport`).
    """

    manifest: Manifest
    num_classes: int
    teacher_features: TeacherFeatures | None
    recipe: ViewRecipe  # how its images were made: its view 0 is the eval transform for the held-out splits

    @property
    def max_workers(self) -> int:
        """DataLoader worker processes this source can use (0: batches are made in the training process)."""
        ...

    def world(self) -> int:
        """DDP ranks the source splits its epoch over (1: every rank sees all of it)."""
        ...

    def set_epoch(self, epoch: int) -> None: ...

    def num_samples(self) -> int:
        """Samples one epoch yields over all ranks and workers."""
        ...

    def plan(self, batch_size: int, workers: int, drop_last: bool = False, epoch: int | None = None) -> EpochPlan:
        """Samples and batches per rank for an epoch, computed before any data is read."""
        ...

    def numpy_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """This process's (rank's, worker's) batches of the current epoch."""
        ...


def describe(source: Any) -> str:
    """A short name for logs: the class and its sample count."""
    return f"{type(source).__name__}({source.num_samples()} samples)"
