"""Teachers shipped as model files (issue 28): the teach stage's forward pass on a `.pt2` and an ONNX file vs eager.

    python -m benchmarks.bench_teacher_files [--rounds-small 15] [--rounds-large 6] [--batch 256]

For each of two models, one set of **random weights** (`torch.manual_seed(--seed)` then `build_for(arch, manifest)`,
a freshly initialised kdcache model, eval mode) is run three ways, exactly as the teach stage runs a teacher
(`pipeline.cache.teach.shard_logits` -> `pipeline.models.predict.predict_arrays(model, images, batch, cpu)`: uint8
(N, H, W, C) arrays -> `to_input` -> the `Normalized` wrapper's mean/std -> the network, in batches of --batch):

    (a) eager: the `Normalized` model `build_for` returns (PyTorch eager, what a zoo/torchvision teacher runs);
    (b) export: its bare network (`model.net.eval()`) exported with `torch.export.export(net, (example,),
        dynamic_shapes=({0: Dim("b")},))`, written with `torch.export.save` (`.pt2`) and loaded back with
        `import_model(path, "export", manifest)` (an `ExportedNet`: `ExportedProgram.module()`, run by torch);
    (c) onnx: the same network through `torch.onnx.export(net, (example,), path, dynamo=False, input_names=["x"],
        dynamic_axes={"x": {0: "b"}})` and `import_model(path, "onnx", manifest)` (an `OnnxNet`: an onnxruntime
        `InferenceSession` on the CPU provider).

Normalisation stays kdcache's in every path (the files hold the bare network). The models: `resnet8x4` (the
zoo's CIFAR ResNet, 32x32x3, 10 classes) and `tv:resnet18` (torchvision's, 224x224x3, 10 classes). The manifest
`import_model` checks the files against is a tiny synthetic data set (`tests.conftest.synthetic_splits` +
`write_dataset`, in a temp dir); the timed inputs are random uint8 images of the model's size (--images-small /
--images-large of them, the same for every path).

One process, `torch.set_num_threads(1)` before anything is built (`OnnxNet` gives onnxruntime
`torch.get_num_threads()` intra-op threads when it is constructed), so every figure is **per core**. Started as
`python -m benchmarks...`, the package pins torch's kernels to AVX2 as the stages do (`pipeline/kernels.py`);
onnxruntime picks its own kernels. A warm-up call of every path on all the images comes first; its logits give the
max |logit difference| of (b) and (c) against (a) (printed with the largest |logit| of (a) for scale).

Then --rounds rounds, each timing every path once on all the images in a rotated order (no path always first), so a
burst of load on this shared machine hits the three paths of a round alike: that is what makes the ratios fair. A
ratio (export/eager, onnx/eager, as images/s) is the median over rounds of each round's ratio, with its
interquartile range and a 95% percentile-bootstrap interval of that median (--boot resamples of the rounds).
Images/s are per CPU second of this process (`time.process_time`: other processes cannot inflate it) and per wall
second; every round is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import write_dataset
from pipeline.models.checkpoint import import_model
from pipeline.models.predict import predict_arrays
from pipeline.models.registry import Normalized, build_for
from tests.conftest import synthetic_splits

CPU = torch.device("cpu")
PATHS = ("eager", "export", "onnx")
NAMES = {
    "eager": "(a) eager PyTorch (`build_for`)",
    "export": "(b) `.pt2` (`torch.export`, `import_model(..., 'export')`)",
    "onnx": "(c) `.onnx` (onnxruntime CPU, `import_model(..., 'onnx')`)",
}
RATIOS = (("export", "eager"), ("onnx", "eager"))


def export_files(net: torch.nn.Module, size: int, out: Path) -> dict[str, Path]:
    """`net` (eval) as a `.pt2` and an `.onnx` file with a dynamic batch dimension; prints sizes and export times."""
    example = torch.randn(2, 3, size, size)  # batch 2: an example batch of 1 would specialise the dimension
    files = {"export": out / "teacher.pt2", "onnx": out / "teacher.onnx"}
    t0 = time.perf_counter()
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, files["export"])
    t1 = time.perf_counter()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), files["onnx"], dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    t2 = time.perf_counter()
    print(
        f"exported: {files['export'].name} {files['export'].stat().st_size / 1e6:.1f} MB in {t1 - t0:.1f} s, "
        f"{files['onnx'].name} {files['onnx'].stat().st_size / 1e6:.1f} MB in {t2 - t1:.1f} s"
    )
    return files


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def iqr(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) as the other benchmarks report them (`statistics.quantiles`, n=4)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4)
    return q1, med, q3


def bootstrap_median(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of `values` (rounds resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))
    lo, hi = np.percentile(np.median(v[idx], axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def bench_model(arch: str, size: int, n_images: int, rounds: int, args: argparse.Namespace) -> dict:
    """Build, export, load and time one model; prints every round; returns the summary for the final table."""
    print(f"\n## {arch} at {size}x{size}x3, 10 classes: {n_images} images, batch {args.batch}, {rounds} rounds\n")
    with tempfile.TemporaryDirectory(prefix="bench_teacher_files_") as d:
        tmp = Path(d)
        splits, classes = synthetic_splits(16, 8, size, 3, 10)
        manifest = write_dataset(tmp / "data", "bench", splits, classes, 64)
        torch.manual_seed(args.seed)
        eager = build_for(arch, manifest)
        net = eager.net.eval()
        print(f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
        files = export_files(net, size, tmp)  # before any forward: predict_arrays makes the eager net channels_last
        models: dict[str, Normalized] = {
            "eager": eager,
            "export": import_model(files["export"], "export", manifest),
            "onnx": import_model(files["onnx"], "onnx", manifest),
        }
        images = np.random.default_rng(args.seed).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)

        def path(name: str) -> Callable[[], np.ndarray]:
            return lambda: predict_arrays(models[name], images, args.batch, CPU)

        paths = {name: path(name) for name in PATHS}
        logits = {name: fn() for name, fn in paths.items()}  # warm-up: lazy inits, oneDNN primitives, ORT's arena
        scale = float(np.abs(logits["eager"]).max())
        diffs = {name: float(np.abs(logits[name] - logits["eager"]).max()) for name in ("export", "onnx")}
        same_top1 = {name: float((logits[name].argmax(1) == logits["eager"].argmax(1)).mean()) for name in diffs}
        for name, diff in diffs.items():
            print(
                f"max |logit difference| {name} vs eager: {diff:.3g} (largest |logit| of eager {scale:.3g}; "
                f"same top-1 on {100 * same_top1[name]:.1f}% of {n_images} images)"
            )

        cpu: dict[str, list[float]] = {k: [] for k in PATHS}
        wall: dict[str, list[float]] = {k: [] for k in PATHS}
        order = list(PATHS)
        head = [f"{x}/{y}" for x, y in RATIOS]
        print("\nimages/s per CPU second (per wall second), every round; ratios on CPU time\n")
        print("| round | order | " + " | ".join(order) + " | " + " | ".join(head) + " |")
        print("|---:|---|" + "---:|" * (len(order) + len(head)))
        for r in range(rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]  # rotated: no path always goes first
            for name in rotated:
                c, w = timed(paths[name])
                cpu[name].append(n_images / c)
                wall[name].append(n_images / w)
            cells = [f"{cpu[k][-1]:.1f} ({wall[k][-1]:.1f})" for k in order]
            cells += [f"{cpu[x][-1] / cpu[y][-1]:.3f}" for x, y in RATIOS]
            print(f"| {r + 1} | {','.join(rotated)} | " + " | ".join(cells) + " |", flush=True)

        summary: dict = {"arch": arch, "size": size, "diffs": diffs, "scale": scale, "rates": {}, "ratios": {}}
        print(f"\n### {arch}: summary ({rounds} rounds; ratio = median of the rounds' ratios [IQR] (95% bootstrap))\n")
        print("| path | images/s per CPU s | images/s per wall s |")
        print("|---|---:|---:|")
        for k in PATHS:
            summary["rates"][k] = (statistics.median(cpu[k]), statistics.median(wall[k]))
            print(f"| {NAMES[k]} | {summary['rates'][k][0]:.1f} | {summary['rates'][k][1]:.1f} |")
        print("\n| ratio | CPU time: median [IQR] (95% bootstrap of the median) | wall time: the same |")
        print("|---|---:|---:|")
        for x, y in RATIOS:
            cells = []
            for t, kind in ((cpu, "cpu"), (wall, "wall")):
                ratios = [a / b for a, b in zip(t[x], t[y], strict=True)]
                q1, med, q3 = iqr(ratios)
                lo, hi = bootstrap_median(ratios, args.boot, args.seed)
                summary["ratios"][(x, kind)] = (med, q1, q3, lo, hi)
                cells.append(f"{med:.3f}x [{q1:.3f}, {q3:.3f}] ({lo:.3f}, {hi:.3f})")
            print(f"| {x}/{y} | {cells[0]} | {cells[1]} |")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="predict_arrays batch size (default 256)")
    ap.add_argument("--images-small", type=int, default=512, help="images per timed call, resnet8x4 (default 512)")
    ap.add_argument("--rounds-small", type=int, default=15, help="timed rounds, resnet8x4 (default 15)")
    ap.add_argument("--images-large", type=int, default=256, help="images per timed call, tv:resnet18 (default 256)")
    ap.add_argument("--rounds-large", type=int, default=6, help="timed rounds, tv:resnet18 (default 6)")
    ap.add_argument("--models", choices=("both", "small", "large"), default="both", help="which model(s) to run")
    ap.add_argument("--boot", type=int, default=10000, help="bootstrap resamples of the rounds (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="weights, images and bootstrap seed (default 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # before import_model: OnnxNet sizes onnxruntime's intra-op pool from it
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} thread, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    specs = []
    if args.models in ("both", "small"):
        specs.append(("resnet8x4", 32, args.images_small, args.rounds_small))
    if args.models in ("both", "large"):
        specs.append(("tv:resnet18", 224, args.images_large, args.rounds_large))
    t0 = time.perf_counter()
    results = [bench_model(arch, size, n, rounds, args) for arch, size, n, rounds in specs]

    took = time.perf_counter() - t0
    print(f"\n## All models (per core; ratios on CPU time: median [IQR] (95% bootstrap)); {took:.0f} s in all")
    print("\n| model | eager img/s | .pt2 img/s | .onnx img/s | .pt2 / eager | .onnx / eager | max abs diff (of max) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in results:
        rates = " | ".join(f"{s['rates'][k][0]:.1f}" for k in PATHS)
        ratio = " | ".join(
            "{:.3f}x [{:.3f}, {:.3f}] ({:.3f}, {:.3f})".format(*s["ratios"][(x, "cpu")]) for x, _ in RATIOS
        )
        diff = f"{s['diffs']['export']:.2g}, {s['diffs']['onnx']:.2g} (of {s['scale']:.2g})"
        print(f"| {s['arch']} {s['size']}px | {rates} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
