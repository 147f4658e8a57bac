"""Forward+backward cost of each distillation loss, relative to ``kd`` and to one student training step.

All candidates for one (B, C) are timed side by side in one run, round-robin (one call of each per
round, after a warm-up), and the median over rounds is reported, so background load on a shared
machine hits every candidate alike. Prints Markdown tables (copied to BENCHMARKS.md).

Example::

    python benchmarks/bench_losses.py                      # B=256, C=100 and C=1000, 1 thread
    python benchmarks/bench_losses.py --classes 100 --rounds 50 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy
import torch
import torchsort

from pipeline.losses import build_loss
from pipeline.losses.functional import soft_rank, zscore

LOSS_NAMES = ["ce", "kd", "dkd", "dist", "cmkd", "ckd", "dkd+cmkd"]


def time_round_robin(
    candidates: dict[str, Callable[[], None]], rounds: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved round by round (`sync`: wait for the device)."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(warmup + rounds):
        for name, fn in candidates.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def loss_step(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    precomputed: bool = False,
    composed: bool = False,
    **params,
) -> Callable:
    """One forward+backward of a loss on a leaf ``student`` (B, C).

    precomputed: the loss's teacher side (``teacher_features``) is handed in, as the training loop does
    with cached logits (the loader's worker computes it); it is timed separately.
    composed: CMKD with its fused student side switched off (the autograd composition it replaces).
    """
    loss = build_loss(name, **params)
    if composed:
        loss.fused = lambda num_classes: False
    kw = {"teacher_features": loss.teacher_features(teacher)} if precomputed else {}

    def step() -> None:
        student.grad = None
        loss(student, teacher, target, epoch=30.0, **kw)["loss"].backward()

    return step


def student_step(
    arch: str, batch: int, classes: int, image_size: int, device: torch.device | None = None
) -> Callable | None:
    """One SGD step (forward, CE, backward, update) of the default student, or None if unavailable."""
    try:
        from pipeline.models import build_model
    except ImportError:
        return None
    model = build_model(arch, num_classes=classes, in_channels=3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def variants(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> dict[str, Callable]:
    """CMKD cost breakdown and knobs that might make it cheaper."""
    z_t = zscore(teacher)
    out: dict[str, Callable] = {
        "cmkd (default: l2, float32; student side fused)": loss_step("cmkd", student, teacher, target),
        "cmkd composed with autograd (fused off)": loss_step("cmkd", student, teacher, target, composed=True),
        "cmkd Pearson+z only (no soft rank)": loss_step(
            "cmkd", student, teacher, target, use_spearman=False, entropy_weighting=False
        ),
        "cmkd Spearman only": loss_step("cmkd", student, teacher, target, use_pearson=False, entropy_weighting=False),
        "cmkd regularization=kl": loss_step("cmkd", student, teacher, target, regularization="kl"),
        "cmkd float64 inputs": loss_step(
            "cmkd", student.detach().double().requires_grad_(True), teacher.double(), target
        ),
    }

    def student_rank() -> None:
        student.grad = None
        soft_rank(zscore(student)).sum().backward()

    def student_rank_sorted() -> None:
        student.grad = None
        soft_rank(zscore(student), "l2", 0.01).sum().backward()

    def student_rank_torchsort() -> None:
        student.grad = None
        torchsort.soft_rank(zscore(student)).sum().backward()

    def teacher_rank() -> None:
        with torch.no_grad():
            soft_rank(z_t)

    def teacher_rank_rowwise() -> None:
        with torch.no_grad():
            for row in z_t:
                soft_rank(row[None])

    z_t_np = z_t.numpy()
    out["soft_rank student fwd+bwd (z-scored rows: closed form)"] = student_rank
    out["soft_rank student fwd+bwd, strength 0.01 (numpy argsort + isotonic)"] = student_rank_sorted
    out["torchsort.soft_rank student fwd+bwd (torch.sort)"] = student_rank_torchsort
    out["soft_rank teacher fwd (batched, used)"] = teacher_rank
    out["soft_rank teacher fwd (row by row)"] = teacher_rank_rowwise
    out["torch.sort alone"] = lambda: torch.sort(z_t, dim=1, descending=True)
    out["numpy.argsort alone"] = lambda: numpy.argsort(-z_t_np, axis=1)
    return out


def table(title: str, times: dict[str, float], ref: str, step: float | None) -> str:
    lines = [f"**{title}**", ""]
    head = "| candidate | median ms | x kd |" + (" % of student step |" if step else "")
    lines += [head, "|---|---:|---:|" + ("---:|" if step else "")]
    for name, sec in times.items():
        row = f"| {name} | {sec * 1e3:.3f} | {sec / times[ref]:.2f} |"
        if step:
            row += f" {100 * sec / step:.1f}% |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--student", default="cnn_tiny", help="student arch for the step reference ('' to skip)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda[:i] (on CUDA, CMKD's teacher soft rank is torchsort's CUDA kernel)"
    )
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the CMKD breakdown")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={args.batch}, {args.rounds} rounds, median, "
          f"device {device}\n")  # fmt: skip
    for C in args.classes:
        student = torch.randn(args.batch, C, device=device).mul_(3).requires_grad_(True)
        teacher = torch.randn(args.batch, C, device=device).mul_(3)
        target = torch.randint(0, C, (args.batch,), device=device)
        candidates = {name: loss_step(name, student, teacher, target) for name in LOSS_NAMES}
        for name in ("cmkd", "dkd+cmkd"):  # what the training step pays with cached logits
            candidates[f"{name}, teacher side from the loader"] = loss_step(
                name, student, teacher, target, precomputed=True
            )
        candidates["cmkd teacher side alone (loader worker)"] = partial(build_loss("cmkd").teacher_features, teacher)
        step_fn = student_step(args.student, args.batch, C, args.image_size, device) if args.student else None
        if step_fn is not None:
            candidates[f"student step ({args.student}, {args.image_size}px)"] = step_fn
        times = time_round_robin(candidates, args.rounds, args.warmup, sync)
        step = times.get(f"student step ({args.student}, {args.image_size}px)")
        print(table(f"B={args.batch}, C={C}: loss forward+backward", times, "kd", step), "\n")
        if not args.breakdown or device.type != "cpu":  # the breakdown compares CPU code paths
            continue
        extra = {"kd": candidates["kd"], **variants(student, teacher, target)}
        times = time_round_robin(extra, args.rounds, args.warmup)
        print(table(f"B={args.batch}, C={C}: CMKD breakdown", times, "kd", step), "\n")


if __name__ == "__main__":
    main()
