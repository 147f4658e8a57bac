"""Where a training step's time goes: a per-phase wall-clock timer for the loop (profiling only).

`train(..., phases=PhaseTimer(device))` attributes the time between consecutive `lap` calls of the step
to named phases: `startup` (the epoch's first batch: loader workers fork, open the store and fill their
shuffle buffer; hidden by the early start of the next epoch's loader after the first epoch), `wait`
(blocked on the loader for every later batch, including the device prefetch), `input` (to the device
and uint8 -> float), `forward`, `loss`, `bookkeeping` (epoch totals, learning rate, progress bar),
`backward` (zero_grad + backward) and `optimizer` (clipping + step). On CUDA every lap synchronizes the
device, so kernels are charged to the phase that launched them: that adds host syncs, which is why the
timer exists for benchmarks only; without one the loop uses `NO_TIMER`, whose laps do nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("startup", "wait", "input", "forward", "loss", "bookkeeping", "backward", "optimizer")


class PhaseTimer:
    """Seconds per phase, summed over the batches of a run (see the module doc)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sync = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.batches = 0
        self._t = time.perf_counter()

    def restart(self) -> None:
        """Start the clock (the epoch's first step): time before it belongs to no phase."""
        if self.sync:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase`."""
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now

    def step_done(self) -> None:
        self.batches += 1

    def per_batch_ms(self) -> dict[str, float]:
        """Milliseconds per batch of each phase, in `PHASES` order."""
        n = max(self.batches, 1)
        return {p: 1e3 * self.seconds.get(p, 0.0) / n for p in PHASES}


class _NoTimer(PhaseTimer):
    """The loop's timer when nobody profiles: every call is a no-op."""

    def restart(self) -> None:
        pass

    def lap(self, phase: str) -> None:
        pass

    def step_done(self) -> None:
        pass


NO_TIMER = _NoTimer()
