"""Process-level plumbing shared by every stage: device, threads, seeding, logging.

Kept apart from training code so the teacher stage does not depend on (and rerun for) student code.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch


def pick_device(name: str | None = None) -> torch.device:
    """`cuda` when available (or when asked), else CPU. `KDCACHE_DEVICE` overrides."""
    name = name or os.environ.get("KDCACHE_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int | None) -> None:
    """Limit torch intra-op threads (workers sharing a machine must not oversubscribe its cores)."""
    if n:
        torch.set_num_threads(int(n))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(level: str | int | None = None) -> None:
    """Stage entry points log to stderr; the library itself only uses `logging.getLogger`."""
    level = level or os.environ.get("KDCACHE_LOG", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
