"""Process-level plumbing shared by every stage: device, threads, seeding, logging, rank and world size.

Kept apart from training code so the teacher stage does not depend on (and rerun for) student code.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (for run logs, never for artifacts)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_run_log(path: str | Path | None, record: Any) -> None:
    """Write what varies from run to run (wall-clock times, throughput) as JSON to `path` (None: nowhere).

    Artifacts never carry these, so equal inputs give byte-identical DVC outputs; `path` is a run log
    (`Layout.run_log`: `logs/<stage>/<item>.json`, git-ignored, tracked by no stage). Replaced atomically.
    """
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: the live process group, else torchrun's environment, else (0, 1).

    The one place the project asks; it agrees with `webdataset.split_by_node` (which reads the same
    environment first), so the loader's shard split and the training loop's plan always match.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> torch.device | None:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this rank's device (None: single process).

    gloo on CPU, nccl on CUDA (one GPU per local rank). The rendezvous (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK) comes from torchrun's environment. Ranks other than 0 log warnings only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available() and os.environ.get("KDCACHE_DEVICE", "cuda").startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    logging.getLogger(__name__).info("DDP: %d ranks, backend %s", dist.get_world_size(), backend)
    return device


def close_distributed() -> None:
    """Tear down the process group `init_distributed` joined (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
