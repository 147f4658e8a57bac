"""What the CPU kernel pin costs (`runtime.reproducible`, pipeline/kernels.py): training steps pinned vs native.

    python -m benchmarks.bench_kernels [--rounds 5] [--steps 60]

Each measurement is a fresh process (the pin must be set before torch loads), alternating pinned and native round
by round so drifts in machine load hit both; per mode the median of the rounds. Two workloads, as the pipeline
runs them: the default student step (cnn_tiny, batch 128, 28x28x1, 1 thread: `distill.train`) and a teacher
training step (cnn_small and resnet8, batch 128, 2 threads: `train_teacher.train`). A step is forward, loss,
backward and SGD on random data (the data path is not what the pin touches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from pipeline.kernels import PIN

CHILD = """
import json, sys, time, torch
from pipeline.models import build_model
arch, threads, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 128
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(arch, 10, 1).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(10):
    step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"ms": 1000 * (time.perf_counter() - t0) / steps, "isa": torch.backends.cpu.get_cpu_capability()}))
"""

WORKLOADS = [("student cnn_tiny, 1 thread", "cnn_tiny", 1), ("teacher cnn_small, 2 threads", "cnn_small", 2),
             ("teacher resnet8, 2 threads", "resnet8", 2)]  # fmt: skip


def measure(arch: str, threads: int, steps: int, pinned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN}
    if pinned:
        env.update(PIN)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arch, str(threads), str(steps)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    print(
        "| workload | native ms/step | pinned ms/step | pinned / native [IQR] | every round's ratio "
        "| ISA (native / pinned) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for name, arch, threads in WORKLOADS:
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for k in range(args.rounds):
            for pinned in (False, True) if k % 2 == 0 else (True, False):
                runs[pinned].append(measure(arch, threads, args.steps, pinned))
        native = statistics.median(r["ms"] for r in runs[False])
        pin = statistics.median(r["ms"] for r in runs[True])
        # Each round's pinned / native (run back to back, so a drift in machine load hits both): their median and
        # interquartile range say more on a noisy machine than the ratio of the two medians.
        ratios = [p["ms"] / n["ms"] for p, n in zip(runs[True], runs[False], strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        isa = f"{runs[False][0]['isa']} / {runs[True][0]['isa']}"
        every = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"| {name} | {native:.2f} | {pin:.2f} | {med:.3f}x [{q1:.3f}, {q3:.3f}] | {every} | {isa} |", flush=True)


if __name__ == "__main__":
    main()
