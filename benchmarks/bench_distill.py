"""Benchmark the student data path: is cached-logit distillation as fast as plain training?

    python benchmarks/bench_distill.py [--pairs default cifar] [--shards 4] [--workers 1] [--repeats 2]

For each teacher/student pair, measured side by side in one run (best of `--repeats`, interleaved,
so a noisy neighbour hits every mode alike), all through the real `pipeline.training.loop.train` loop on
the real `DistillDataset` + `make_loader` path, one epoch each:

- `ce`:      plain student training (no store joined; same shards, same augmentation views);
- `kd`:      cached-logit distillation (shards joined with the logit store);
- `online`:  the same KD loop with a live teacher forward per batch instead of the store;
- `loader`:  the cached-logit loader alone, no model;
- `t_s`, `t_t`: in-memory student training step (forward + KD loss + backward + SGD) and teacher
  forward per sample on one fixed batch, for the ideal offline speed-up `(t_s + t_t) / t_s`.

Ratios printed: (a) kd / ce (target >= 0.90); (b) (kd / online) / ideal (target >= 0.95);
(c) loader / kd (must stay well above 1), with the worker count.

Where the loop's time goes (issue 19): one more epoch of `ce` and of `kd` with a
`pipeline.training.phases.PhaseTimer` (ms per batch: wait, input, forward, loss, bookkeeping, backward,
optimizer), next to the same split of the in-memory step; the loop time beyond the in-memory step is
printed as a share of that step (target <= 10%). `--profile` adds `torch.profiler`'s top operators of
one kd epoch. `--device cuda` runs everything on a GPU (default: CUDA when present).

`--ensemble` adds an ensemble teacher (issue 15): a second teacher of the same architecture (another seed)
is cached, the two stores are combined into an ensemble store with its members (`pipeline.cache.ensemble`),
and two more modes run: `ens_kd` (kd from the ensemble store: the same read path as one teacher's store,
since the combination is materialised) and `ens_mtkd` (mtkd, which also joins the (B, M, C) member logits).
Ratios: (d) ens_kd / kd and (e) ens_mtkd / kd.

Pairs: `default` = Fashion-MNIST 28x28x1 shards (data/shards/fashion_mnist, first `--shards`
shards, with the pipeline's cnn_small teacher cache when it matches; otherwise synthetic 28x28x1),
student cnn_tiny, teacher cnn_small. `cifar` = synthetic 32x32x3, student resnet8, teacher resnet32
(~5.5x the student's FLOPs). Caches are built with `pipeline.cache.teach.run_teach` in a temp folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache.ensemble import ensemble_store  # noqa: E402
from pipeline.cache.store import LogitStore, StoreError  # noqa: E402
from pipeline.cache.teach import build_spec, run_teach  # noqa: E402
from pipeline.config import EnsembleSpec, OptimConfig, TrainConfig  # noqa: E402
from pipeline.data.shards import Manifest, iter_shard, load_manifest, sha256_file, write_dataset  # noqa: E402
from pipeline.data.sources import load_split  # noqa: E402
from pipeline.data.views import PadCropFlip, ViewRecipe  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.models import build_for, load_model, to_input  # noqa: E402
from pipeline.training.dataset import DistillDataset  # noqa: E402
from pipeline.training.loop import train  # noqa: E402
from pipeline.training.phases import NO_TIMER, PHASES, PhaseTimer  # noqa: E402
from pipeline.training.schedule import make_optimizer  # noqa: E402
from pipeline.training.transport import make_loader  # noqa: E402

log = logging.getLogger("bench_distill")

KD = {"T": 4.0, "a": 0.1, "b": 0.9}


@dataclasses.dataclass
class Pair:
    name: str
    desc: str
    manifest: Manifest
    store: Path
    teacher: nn.Module
    teacher_arch: str
    student_arch: str
    shards: int  # train shards used per epoch
    ensemble: Path | None = None  # an ensemble store (with members) of this teacher and a second one (--ensemble)


def mmacs(arch_or_model: str | nn.Module, m: Manifest) -> float:
    """Forward multiply-accumulates per sample, in millions (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_for(arch_or_model, m) if isinstance(arch_or_model, str) else arch_or_model
    h, w, c = m.image_shape
    with FlopCounterMode(display=False) as f, torch.no_grad():
        model.eval()(torch.zeros(1, c, h, w))
    return f.get_total_flops() / 2e6


def _teach(m: Manifest, teacher: nn.Module, arch: str, out: Path) -> Path:
    recipes = {"train": PadCropFlip(2, 0, 2, True)}
    spec = build_spec(m, {"name": arch, "arch": arch, "weights_sha256": "random-init"}, recipes)
    run_teach(m, teacher, out, spec, recipes, batch_size=500)
    return out


def _synthetic(tmp: Path, name: str, n: int, size: int, channels: int, shard_size: int) -> Manifest:
    splits = {
        "train": tuple(
            getattr(load_split("synthetic", None, "train", n=n, size=size, channels=channels, num_classes=10), k)
            for k in ("images", "labels")
        )
    }
    return write_dataset(tmp / name, name, splits, [str(k) for k in range(10)], shard_size=shard_size)


def default_pair(tmp: Path, shards: int) -> Pair:
    """Fashion-MNIST shards + the pipeline's cnn_small cache when they match; else synthetic 28x28x1."""
    root = ROOT / "data/shards/fashion_mnist"
    store, ckpt = ROOT / "data/logits/cnn.zarr", Layout("fashion_mnist", ROOT).teacher_checkpoint("cnn")
    if (root / "manifest.json").exists():
        m = load_manifest(root)
        try:
            s = LogitStore(store, "train", m)
            if s.teacher.get("arch") != "cnn_small" or s.teacher.get("weights_sha256") != sha256_file(ckpt):
                raise StoreError(f"{store} is not the cache of {ckpt} (cnn_small)")
            teacher, _ = load_model(ckpt, data=m)
            return Pair("default", f"Fashion-MNIST shards, cache {store.name}", m, store, teacher, "cnn_small",
                        "cnn_tiny", shards)  # fmt: skip
        except (StoreError, FileNotFoundError, ValueError) as e:
            log.warning("not using the pipeline's cache (%s): caching a subset in a temp folder", e)
        # The first `shards` shards as their own data set, cached by a fresh cnn_small.
        keep = m.split("train").shards[:shards]
        imgs, labels = [], []
        for info in keep:
            for _, img, y in iter_shard(m.root / info.path):
                imgs.append(img)
                labels.append(y)
        sub = write_dataset(
            tmp / "fmnist", "fashion_mnist_subset", {"train": (np.stack(imgs), np.array(labels))},
            list(m.classes), shard_size=m.shard_size,
        )  # fmt: skip
        desc = "Fashion-MNIST subset, fresh cache"
    else:
        sub = _synthetic(tmp, "synthetic28", shards * 5000, 28, 1, 5000)
        desc = "synthetic 28x28x1 (no Fashion-MNIST shards), fresh cache"
    torch.manual_seed(0)
    teacher = build_for("cnn_small", sub).eval()
    store = _teach(sub, teacher, "cnn_small", tmp / "cnn_small.zarr")
    return Pair("default", desc, sub, store, teacher, "cnn_small", "cnn_tiny", len(sub.split("train").shards))


def cifar_pair(tmp: Path, shards: int, teacher_arch: str, student_arch: str) -> Pair:
    """Synthetic CIFAR-sized data (32x32x3), a ResNet teacher several times the student's FLOPs."""
    m = _synthetic(tmp, "synthetic32", shards * 1000, 32, 3, 1000)
    torch.manual_seed(0)
    teacher = build_for(teacher_arch, m).eval()
    store = _teach(m, teacher, teacher_arch, tmp / f"{teacher_arch}.zarr")
    return Pair("cifar", "synthetic 32x32x3, fresh cache", m, store, teacher, teacher_arch, student_arch, shards)


def add_ensemble(p: Pair, tmp: Path) -> Pair:
    """Cache a second teacher (same architecture, another seed) and combine both stores into an ensemble store."""
    torch.manual_seed(1)
    second = _teach(
        p.manifest, build_for(p.teacher_arch, p.manifest).eval(), f"{p.teacher_arch}-2", tmp / "second.zarr"
    )
    where = {"a": p.store, "b": second, "ens": tmp / f"{p.name}-ensemble.zarr"}
    ensemble_store(p.manifest, "ens", EnsembleSpec(("a", "b")), where.__getitem__)
    return dataclasses.replace(p, ensemble=where["ens"])


def dataset(p: Pair, cached: bool, store: Path | None = None, members: bool = False) -> DistillDataset:
    """The train split joined with the cache (cached) or plain with the store's views (ce baseline)."""
    if cached:
        ds = DistillDataset(p.manifest, "train", store or p.store, seed=0, shuffle_buffer=2000, members=members)
    else:
        recipe = ViewRecipe.from_dict(LogitStore(p.store, "train").view_recipe)
        ds = DistillDataset(p.manifest, "train", seed=0, shuffle_buffer=2000, recipe=recipe, augment=True)
    ds.urls = ds.urls[: p.shards]  # benchmark-only: an epoch over the first shards
    return ds


def time_train(
    p: Pair, mode: str, cfg: TrainConfig, out: Path, device: torch.device, phases: PhaseTimer | None = None
) -> tuple[float, float, float]:
    """One epoch of the real training loop in `mode` (ce | kd | online): samples/s, and per sample the
    main thread's CPU seconds (what the loop itself costs, whatever else runs on the machine) and
    seconds blocked on the loader. `phases` collects the per-phase step times."""
    torch.manual_seed(0)
    model = build_for(p.student_arch, p.manifest)
    loss = build_loss("ce") if mode == "ce" else build_loss("mtkd" if mode == "ens_mtkd" else "kd", **KD)
    teacher = p.teacher if mode == "online" else None
    ds = dataset(p, mode != "ce", p.ensemble if mode.startswith("ens_") else None, members=mode == "ens_mtkd")
    if mode == "kd_fork":  # the same kd run with workers forked from the trainer (the old start method)
        cfg = dataclasses.replace(cfg, worker_start="fork")
    cpu0 = time.thread_time()
    timings = out / f"{mode}.timings.json"  # the loop's run log: throughput is not part of the history
    train(model, loss, ds, cfg, out / mode, teacher=teacher, desc=mode, run_log=timings, device=device, phases=phases)
    row = json.loads(timings.read_text())[-1]
    n = ds.num_samples()
    return row["samples_per_s"], (time.thread_time() - cpu0) / n, row["data_wait_s"] / n


def time_loader(p: Pair, batch_size: int, workers: int) -> float:
    """Samples/s of the cached-logit loader alone (batches made and handed to the main process)."""
    ds = dataset(p, cached=True)
    ds.set_epoch(0)
    n = 0
    t0 = time.perf_counter()
    for batch in make_loader(ds, batch_size, workers):
        n += len(batch["label"])
    return n / (time.perf_counter() - t0)


def time_steps(
    p: Pair, batch_size: int, seconds: float, device: torch.device, mode: str = "kd", phases: PhaseTimer | None = None
) -> tuple[float, float]:
    """Seconds per sample of (student training step with `mode`'s loss, teacher forward), on one in-memory batch
    already on `device`; `phases` (optional) splits the student step as the loop's timer does."""
    h, w, c = p.manifest.image_shape
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch_size, h, w, c), dtype=torch.uint8, generator=g).to(device)  # (B, H, W, C)
    x = to_input(raw)  # (B, C, H, W) channels_last
    y = torch.randint(0, p.manifest.num_classes, (batch_size,), generator=g).to(device)
    torch.manual_seed(0)
    model = build_for(p.student_arch, p.manifest).to(device, memory_format=torch.channels_last).train()
    teacher = p.teacher.eval().to(device, memory_format=torch.channels_last)
    loss_fn = build_loss("ce") if mode == "ce" else build_loss("kd", **KD)
    opt = make_optimizer(model, OptimConfig())
    with torch.no_grad():
        t = teacher(x).float()  # (B, C)
    timer = phases or NO_TIMER  # a real timer syncs CUDA per phase: only in the phase pass
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def student_step() -> None:
        timer.restart()
        # The uint8 -> float conversion is student-side work of every step (offline and online alike).
        xs = to_input(raw)
        timer.lap("input")
        s = model(xs).float()
        timer.lap("forward")
        parts = loss_fn(s, t, y, epoch=0.0)
        timer.lap("loss")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        timer.lap("backward")
        opt.step()
        timer.lap("optimizer")
        timer.step_done()

    def teacher_fwd() -> None:
        with torch.no_grad():
            teacher(x)

    out = []
    for fn in (student_step, teacher_fwd):
        for _ in range(3):  # warm-up: oneDNN primitive creation
            fn()
        if fn is student_step and phases is not None:  # drop the warm-up steps (never touch NO_TIMER)
            timer.seconds.clear()
            timer.batches = 0
        # As long a window as a training measurement's, so a noisy neighbour cannot favour either side.
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            iters += 1
        sync()
        out.append((time.perf_counter() - t0) / (iters * batch_size))
    return out[0], out[1]


def _drain(ds: DistillDataset, batch_size: int) -> None:
    """Run the cached-logit loader forever in this (child) process: the load a DataLoader worker puts on the machine."""
    torch.set_num_threads(1)
    epoch = 0
    while True:
        ds.set_epoch(epoch)
        for _ in make_loader(ds, batch_size, 0):
            pass
        epoch += 1


def time_phases(
    p: Pair, cfg: TrainConfig, tmp: Path, device: torch.device, mode: str, seconds: float = 3.0
) -> tuple[dict, dict, dict]:
    """Milliseconds per batch of each phase: one epoch of the loop in `mode`, the in-memory step in `mode`, and
    the in-memory step while a second process runs the loader (what the loop's worker does to the step's speed:
    the two share the machine's cores, caches and memory bandwidth)."""
    import multiprocessing

    loop = PhaseTimer(device)
    time_train(p, mode, cfg, tmp / f"{p.name}-phases", device, phases=loop)
    step = PhaseTimer(device)
    time_steps(p, cfg.batch_size, seconds, device, mode=mode, phases=step)
    busy = PhaseTimer(device)
    drain = multiprocessing.get_context("fork").Process(target=_drain, args=(dataset(p, cached=True), cfg.batch_size))
    drain.start()
    try:
        time.sleep(min(1.0, seconds))  # past its start-up
        time_steps(p, cfg.batch_size, seconds, device, mode=mode, phases=busy)
    finally:
        drain.kill()
        drain.join()
    return loop.per_batch_ms(), step.per_batch_ms(), busy.per_batch_ms()


def profile_kd(p: Pair, cfg: TrainConfig, tmp: Path, device: torch.device, rows: int = 15) -> None:
    """`torch.profiler`'s top operators (by self time) over one kd epoch of the loop."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        time_train(p, "kd", cfg, tmp / f"{p.name}-profile", device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n   torch.profiler, one kd epoch of pair '{p.name}' (main process; top {rows} by self time):")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def bench(p: Pair, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    device = torch.device(args.device)
    cfg = TrainConfig(
        epochs=1, batch_size=args.batch_size, workers=args.workers, shuffle_buffer=2000, seed=0,
        threads=args.threads, optim=OptimConfig(lr=0.05), eval_every=0,
    )  # fmt: skip
    load0 = os.getloadavg()[0]
    modes = (
        "ce",
        "kd",
        "online",
        *(("ens_kd", "ens_mtkd") if p.ensemble else ()),
        *(("kd_fork",) if args.fork else ()),
    )
    runs: dict[str, list[float]] = {k: [] for k in (*modes, "loader", "t_s", "t_t")}
    diag: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for r in range(args.repeats):  # interleaved: noise from neighbours hits every mode alike
        for mode in modes:
            sps, cpu, wait = time_train(p, mode, cfg, tmp / f"{p.name}-{r}", device)
            runs[mode].append(sps)
            diag[mode].append((cpu, wait))
        runs["loader"].append(time_loader(p, args.batch_size, args.workers))
        window = sum(c.count for c in p.manifest.split("train").shards[: p.shards]) / runs["kd"][-1]
        t_s, t_t = time_steps(p, args.batch_size, window, device)
        runs["t_s"].append(t_s)
        runs["t_t"].append(t_t)
        log.info("%s repeat %d: %s", p.name, r, {k: v[-1] for k, v in runs.items()})
    best = {k: max(v) for k, v in runs.items() if not k.startswith("t_")}  # best samples/s
    best.update({k: min(v) for k, v in runs.items() if k.startswith("t_")})  # best seconds/sample
    best["spread"] = max((max(v) - min(v)) / statistics.mean(v) for v in runs.values())
    best["load0"], best["load1"] = load0, os.getloadavg()[0]
    for mode, v in diag.items():  # medians: main-thread CPU and loader wait per sample
        best[f"cpu_{mode}"] = statistics.median(c for c, _ in v)
        best[f"wait_{mode}"] = statistics.median(w for _, w in v)
    if args.phases:
        for mode in ("ce", "kd"):
            best[f"phases_{mode}"], best[f"phases_mem_{mode}"], best[f"phases_busy_{mode}"] = time_phases(
                p, cfg, tmp, device, mode, args.step_seconds
            )
    if args.profile:
        profile_kd(p, cfg, tmp, device)
    return best


def report(p: Pair, r: dict[str, float], args: argparse.Namespace) -> None:
    n = sum(c.count for c in p.manifest.split("train").shards[: p.shards])
    modes = [m for m in ("ce", "kd", "online", "ens_kd", "ens_mtkd", "kd_fork") if m in r]
    s_mac, t_mac = mmacs(p.student_arch, p.manifest), mmacs(p.teacher, p.manifest)
    h, w, c = p.manifest.image_shape
    ideal = (r["t_s"] + r["t_t"]) / r["t_s"]
    speedup = r["kd"] / r["online"]
    print(f"\n== pair '{p.name}': {p.desc}; {h}x{w}x{c}, {n} samples/epoch")
    print(f"   student {p.student_arch} ({s_mac:.1f} MMAC/sample), teacher {p.teacher_arch} ({t_mac:.1f} MMAC, "
          f"{t_mac / s_mac:.1f}x); batch {args.batch_size}, torch threads {args.threads}, DataLoader workers "
          f"{args.workers}; best of {args.repeats} (max spread {r['spread']:.0%})")  # fmt: skip
    print(
        f"   load average before/after: {r['load0']:.2f} / {r['load1']:.2f} on {os.cpu_count()} cores"
        + ("  (others were busy too: this run uses ~1.3)" if max(r["load0"], r["load1"]) > 2.0 else "")
    )
    step_ms = 1e3 * args.batch_size * (1 / r["kd"] - r["t_s"])
    print(f"   kd loop time per batch beyond the in-memory student step: {step_ms:.2f} ms "
          f"(step itself {1e3 * args.batch_size * r['t_s']:.1f} ms)")  # fmt: skip
    print(
        "   main-thread CPU per sample (median; immune to other processes): "
        + ", ".join(f"{m} {1e6 * r[f'cpu_{m}']:.0f} us" for m in modes)
        + f"; kd/ce by CPU {r['cpu_ce'] / r['cpu_kd']:.3f}"
    )
    print(
        "   blocked on the loader per sample (median): "
        + ", ".join(f"{m} {1e6 * r[f'wait_{m}']:.1f} us" for m in modes)
    )
    if "phases_kd" in r:
        print_phases(r, args.batch_size)
    print(f"   {'mode':<44}{'samples/s':>12}")
    rows = [
        ("ce: plain student training (no store)", r["ce"]),
        ("kd: cached-logit distillation", r["kd"]),
        ("online: KD with a live teacher", r["online"]),
        ("loader alone (cached logits, no model)", r["loader"]),
        ("student step in memory (1 / t_s)", 1 / r["t_s"]),
        ("teacher forward in memory (1 / t_t)", 1 / r["t_t"]),
    ]
    if "ens_kd" in r:
        rows += [
            ("ens_kd: kd from the ensemble store", r["ens_kd"]),
            ("ens_mtkd: mtkd with member logits", r["ens_mtkd"]),
        ]
    if "kd_fork" in r:
        rows.append(("kd_fork: kd, loader workers forked", r["kd_fork"]))
    for name, v in rows:
        print(f"   {name:<44}{v:>12.0f}")
    print(f"   (a) kd / ce                                   {r['kd'] / r['ce']:6.3f}   target >= 0.90")
    print(f"   (b) offline speed-up kd/online = {speedup:5.2f}, ideal (t_s+t_t)/t_s = {ideal:5.2f}: "
          f"ratio {speedup / ideal:6.3f}   target >= 0.95")  # fmt: skip
    print(f"   (c) loader / kd                               {r['loader'] / r['kd']:6.2f}   "
          f"(>> 1; {args.workers} worker(s))")  # fmt: skip
    if "kd_fork" in r:
        print(f"   (f) kd (forkserver workers) / kd_fork          {r['kd'] / r['kd_fork']:6.3f}   "
              f"(by main-thread CPU {r['cpu_kd_fork'] / r['cpu_kd']:.3f})")  # fmt: skip
    if "ens_kd" in r:
        print(f"   (d) ens_kd / kd: kd from a two-teacher ensemble store {r['ens_kd'] / r['kd']:6.3f}   "
              f"(by main-thread CPU {r['cpu_kd'] / r['cpu_ens_kd']:.3f})")  # fmt: skip
        print(f"   (e) ens_mtkd / kd: mtkd joining the member logits    {r['ens_mtkd'] / r['kd']:6.3f}   "
              f"(by main-thread CPU {r['cpu_kd'] / r['cpu_ens_mtkd']:.3f})")  # fmt: skip


def print_phases(r: dict, batch_size: int) -> None:
    """The per-phase table (ms per batch) and the loop's time beyond the in-memory step, as a share of it."""
    cols = [(f"{m} {kind}", r[f"phases{key}_{m}"]) for m in ("ce", "kd")
            for kind, key in (("loop", ""), ("step", "_mem"), ("busy", "_busy"))]  # fmt: skip
    print(f"   where a batch's time goes (ms per batch of {batch_size}; 'step' = the in-memory step split alike, "
          "'busy' = the same while another process runs the loader):")  # fmt: skip
    print("   " + f"{'phase':<12}" + "".join(f"{name:>10}" for name, _ in cols))
    for ph in (*PHASES, "total"):
        vals = [sum(c.values()) if ph == "total" else c[ph] for _, c in cols]
        print("   " + f"{ph:<12}" + "".join(f"{v:>10.2f}" for v in vals))
    model_work = ("forward", "backward")
    for mode in ("ce", "kd"):
        loop, step, busy = (r[f"phases{k}_{mode}"] for k in ("", "_mem", "_busy"))
        t_loop, t_step, t_busy = (sum(d.values()) for d in (loop, step, busy))
        own = sum(v - step[ph] for ph, v in loop.items() if ph not in model_work)  # startup/wait/input/loss/...
        extra = t_loop - t_step
        print(f"   {mode}: loop beyond the in-memory step {extra:+.2f} ms = {extra / t_step:+.1%} "
              f"of the step (target <= 10%); the loop's own phases (all but forward/backward) {own:+.2f} ms = "
              f"{own / t_step:+.1%}; the step itself next to a running loader {t_busy - t_step:+.2f} ms = "
              f"{(t_busy - t_step) / t_step:+.1%}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=["default", "cifar"], choices=["default", "cifar"])
    ap.add_argument("--shards", type=int, default=4, help="default pair: 5000-sample shards per epoch")
    ap.add_argument("--cifar-shards", type=int, default=5, help="cifar pair: 1000-sample shards per epoch")
    ap.add_argument("--cifar-teacher", default="resnet32")
    ap.add_argument("--cifar-student", default="resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ensemble", action="store_true", help="also time kd and mtkd from a two-teacher ensemble store")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda[:i]")
    ap.add_argument("--no-phases", dest="phases", action="store_false", help="skip the per-phase breakdown")
    ap.add_argument("--fork", action="store_true", help="also time kd with loader workers forked (the old start)")
    ap.add_argument("--step-seconds", type=float, default=3.0, help="timing window of each in-memory phase split")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one kd epoch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KDCACHE_LOG", "WARNING"), format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as d:
        tmp = Path(d)
        for name in args.pairs:
            t0 = time.perf_counter()
            if name == "default":
                p = default_pair(tmp, args.shards)
            else:
                p = cifar_pair(tmp, args.cifar_shards, args.cifar_teacher, args.cifar_student)
            if args.ensemble:
                p = add_ensemble(p, tmp)
            log.warning("pair %s ready in %.1f s; timing", name, time.perf_counter() - t0)
            report(p, bench(p, args, tmp), args)


if __name__ == "__main__":
    main()
