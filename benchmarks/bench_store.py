"""Logit-store benchmark: size, compressors, teach overhead, read speed. Ratios measured side by side in one run.

    python benchmarks/bench_store.py [--n 50000] [--classes 100] [--repeats 5]

1. Bytes: store bytes / raw float16 bytes for realistic logits (a trained-teacher-like distribution:
   one confident class + Gaussian rest), dense with Blosc-zstd+byte-shuffle vs plain zstd, and top-k.
2. Teach overhead: `run_teach` throughput / bare teacher inference throughput on the same shards and
   batches (decode + augmentation + compression + writes must overlap the forward pass). Target >= 0.90.
3. Reads (C=100, page cache warm, one core): shard-aligned block reads (target >= 1,000,000 rows/s)
   and random batches of 256 rows (target >= 50,000 rows/s), via `LogitStore.read_rows` vs zarr's own
   fancy indexing.
4. Integrity cost: the same reads from the same logits stored with and without the per-chunk CRC32C, and with
   and without the value rule (queried rows finite, unqueried empty), interleaved round by round. Target: the
   shipped reader (checksums + value rule) at most 5% slower than a reader of neither.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache.store import LogitStore, SplitSpec, StoreSpec, StoreWriter
from pipeline.cache.teach import build_spec, load_shard, run_teach
from pipeline.data.shards import write_dataset
from pipeline.data.sources import load_split
from pipeline.data.views import PadCropFlip
from pipeline.models import build_for, predict_arrays


def fake_logits(n: int, v: int, c: int, seed: int = 0) -> np.ndarray:
    """Teacher-like logits: N(0, 2) noise plus a +8 margin on one 'true' class per sample."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, v, c)).astype(np.float32)
    z[np.arange(n), :, rng.integers(0, c, n)] += 8.0
    return z


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_store(
    path: Path, logits: np.ndarray, shard_rows: int, compressor: str, topk: int, chunk_rows: int = 1000
) -> float:
    n, v, c = logits.shape
    spec = StoreSpec(
        teacher={"name": "bench", "arch": "none", "weights_sha256": "0"},
        dataset={"name": "bench", "manifest_sha256": "0"},
        splits={"train": SplitSpec(n, c, v, shard_rows, PadCropFlip(v).to_dict())},
        compressor=compressor,
        topk=topk,
        chunk_rows=min(chunk_rows, shard_rows),
    )
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    w = StoreWriter(path, spec)
    for j in range(spec.splits["train"].num_shards):
        s, e = spec.splits["train"].shard_range(j)
        w.write_shard("train", j, logits[s:e])
    w.finalize()
    return time.perf_counter() - t0


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_bytes_and_reads(tmp: Path, n: int, c: int, repeats: int) -> None:
    v, shard_rows = 1, 5000
    logits = fake_logits(n, v, c)
    raw = n * v * c * 2
    print(f"\n## 1. Store size (N={n}, V={v}, C={c}; raw float16 = {raw / 1e6:.1f} MB)\n")
    print("| layout | compressor | bytes / raw fp16 | write s |")
    print("|---|---|---:|---:|")
    for comp, k in [("blosc-zstd", 0), ("zstd", 0), ("none", 0), ("blosc-zstd", 5), ("blosc-zstd", 10)]:
        path = tmp / f"s-{comp}-{k}.zarr"
        secs = write_store(path, logits, shard_rows, comp, k)
        layout = f"top-{k}" if k else "dense"
        print(f"| {layout} | {comp} | {disk_bytes(path / 'train') / raw:.3f} | {secs:.2f} |")

    torch.set_num_threads(1)
    store = LogitStore(tmp / "s-blosc-zstd-0.zarr", "train")
    shards = [(j * shard_rows, min((j + 1) * shard_rows, n)) for j in range((n + shard_rows - 1) // shard_rows)]

    def block_reads(dtype: type | None) -> None:
        for s, e in shards:
            store.read_block(s, e, dtype=dtype)

    t_block = median_time(lambda: block_reads(None), repeats)  # stored float16: what the loader reads
    t_block32 = median_time(lambda: block_reads(np.float32), repeats)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, n, 256) for _ in range(200)]

    def random_reads() -> None:
        for b in batches:
            store.read_rows(b, cache_shards=len(shards))

    t_rand = median_time(random_reads, repeats)
    arr = zarr.open_group(str(tmp / "s-blosc-zstd-0.zarr"), mode="r")["train"]["logits"]

    def zarr_fancy() -> None:
        for b in batches[:20]:
            arr.get_orthogonal_selection((np.sort(b), slice(None), slice(None)))

    t_fancy = median_time(zarr_fancy, max(1, repeats // 2))
    print(f"\n## 3. Reads (C={c}, warm page cache, one core)\n")
    print("| read | rows/s | target |")
    print("|---|---:|---:|")
    print(f"| shard-aligned block (read_block, stored float16, loader path) | {n / t_block:,.0f} | >= 1,000,000 |")
    print(f"| shard-aligned block (read_block, converted to float32) | {n / t_block32:,.0f} | (for comparison) |")
    print(f"| random batches of 256 (read_rows, shard LRU) | {256 * len(batches) / t_rand:,.0f} | >= 50,000 |")
    print(f"| random batches of 256 (zarr orthogonal selection) | {256 * 20 / t_fancy:,.0f} | (for comparison) |")


def without_checksums(src: Path, dst: Path) -> None:
    """A copy of store `src` whose arrays drop the CRC32C codec (the bytes a schema-1 store held), same chunks."""
    from zarr.codecs import Crc32cCodec

    shutil.rmtree(dst, ignore_errors=True)
    root = zarr.open_group(str(src), mode="r")
    out = zarr.open_group(str(dst), mode="w")
    out.attrs.update(dict(root.attrs))
    for split, g in root.groups():
        h = out.create_group(split)
        h.attrs.update(dict(g.attrs))
        for name, a in g.arrays():
            comps = tuple(c for c in a.compressors if not isinstance(c, Crc32cCodec))
            b = h.create_array(
                name,
                shape=a.shape,
                dtype=a.dtype,
                chunks=a.chunks,
                shards=a.shards,
                compressors=comps or None,
                fill_value=a.fill_value,
            )
            b[...] = a[...]


def bench_integrity(tmp: Path, n: int, c: int, repeats: int) -> None:
    """Block and random-batch reads: shipped reader vs no checksums vs no value rule, interleaved rounds."""
    v, shard_rows = 1, 5000
    with_crc = tmp / "crc.zarr"
    write_store(with_crc, fake_logits(n, v, c), shard_rows, "blosc-zstd", 0)
    no_crc = tmp / "nocrc.zarr"
    without_checksums(with_crc, no_crc)
    one_chunk = tmp / "onechunk.zarr"  # the same logits, one inner chunk per store shard
    write_store(one_chunk, fake_logits(n, v, c), shard_rows, "blosc-zstd", 0, chunk_rows=shard_rows)
    torch.set_num_threads(1)
    shards = [(j * shard_rows, min((j + 1) * shard_rows, n)) for j in range((n + shard_rows - 1) // shard_rows)]
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, n, 256) for _ in range(200)]
    real_check = LogitStore.check_values

    def skip_rule(*_a: object) -> None:
        return None

    readers = {  # name -> (store path, value rule on?)
        "shipped: CRC32C + value rule": (with_crc, True),
        "CRC32C only": (with_crc, False),
        "neither (schema-1 reads)": (no_crc, False),
        "shipped, one chunk per shard (chunk_rows = shard size)": (one_chunk, True),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"block": [], "random": []} for k in readers}
    names = list(readers)
    for k in range(repeats + 1):  # round 0 warms the page cache; each round times every reader once
        for name in names[k % len(names) :] + names[: k % len(names)]:  # rotated: no reader always goes first
            path, rule = readers[name]
            LogitStore.check_values = real_check if rule else skip_rule  # type: ignore[method-assign]
            store = LogitStore(path, "train")
            t0 = time.perf_counter()
            for s, e in shards:
                store.read_block(s, e, dtype=None)
            t1 = time.perf_counter()
            store = LogitStore(path, "train")
            for b in batches:
                store.read_rows(b, cache_shards=len(shards))
            t2 = time.perf_counter()
            times[name]["block"].append(t1 - t0)
            times[name]["random"].append(t2 - t1)
    LogitStore.check_values = real_check  # type: ignore[method-assign]
    ref = "neither (schema-1 reads)"
    print(f"\n## 4. Integrity cost (N={n}, C={c}, V={v}, float16; {repeats} interleaved rounds)\n")
    print("Speed vs `neither`: the median over rounds of each round's ratio (both read in that round, so drifts in")
    print("machine load cancel), with the interquartile range of those ratios.\n")
    print("| reader | block rows/s | vs neither [IQR] | random-batch rows/s | vs neither [IQR] |")
    print("|---|---:|---:|---:|---:|")
    for name in readers:
        cells = []
        for k, rows in (("block", n), ("random", 256 * len(batches))):
            ratios = [b / a for a, b in zip(times[name][k][1:], times[ref][k][1:], strict=True)]
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            cells.append(f"{rows / statistics.median(times[name][k][1:]):,.0f} | {med:.3f}x [{q1:.3f}, {q3:.3f}]")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def bench_teach(tmp: Path, n: int, repeats: int, threads: int, device: torch.device | None = None) -> None:
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(threads)
    d = load_split("synthetic", None, "train", n=n, size=28, channels=1, num_classes=10, seed=0)
    m = write_dataset(tmp / "shards", "bench", {"train": (d.images, d.labels)}, d.classes, shard_size=5000)
    model = build_for("cnn_small", m).eval().to(device, memory_format=torch.channels_last)
    recipes = {"train": PadCropFlip(2, 0, 2, True)}
    spec = build_spec(m, {"name": "b", "arch": "cnn_small", "weights_sha256": "0"}, recipes)
    batches = [load_shard(m, "train", j) for j in range(len(m.split("train").shards))]
    views = []
    for b in batches:  # the exact inputs the teach stage feeds the teacher, prepared outside the timing
        idx = np.arange(b.start, b.start + len(b.images))
        views += [recipes["train"].apply(b.images, idx, np.full(len(idx), v)) for v in range(2)]

    def bare() -> None:
        for imgs in views:
            predict_arrays(model, imgs, 1000, device)
        sync()

    def teach() -> None:
        run_teach(m, model, tmp / "t.zarr", spec, recipes, batch_size=1000, force=True, device=device)
        sync()

    ratios, t_b, t_t = [], [], []
    bare()  # warm-up
    for _ in range(repeats):  # interleaved A/B pairs: drift on a noisy machine hits both alike
        a = median_time(bare, 1)
        b = median_time(teach, 1)
        t_b.append(a)
        t_t.append(b)
        ratios.append(a / b)
    sv = n * 2
    print(
        f"\n## 2. Teach overhead (N={n} 28x28 images x 2 views, cnn_small teacher, {threads} torch thread(s), "
        f"device {device})\n"
    )
    print("| path | sample-views/s (median) |")
    print("|---|---:|")
    print(f"| bare teacher inference on pre-decoded, pre-augmented batches | {sv / statistics.median(t_b):,.0f} |")
    print(f"| teach stage (decode + views + inference + compress + write) | {sv / statistics.median(t_t):,.0f} |")
    print(
        f"\nteach / bare throughput: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.90)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000, help="rows of the size/read benchmark")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--teach-n", type=int, default=20000, help="images of the teach-overhead benchmark")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the teach benchmark")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="teacher device")
    ap.add_argument("--only", choices=["store", "teach", "integrity"], default=None, help="run one part (default: all)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "store"):
            bench_bytes_and_reads(tmp, args.n, args.classes, args.repeats)
        if args.only in (None, "integrity"):
            bench_integrity(tmp, args.n, args.classes, args.repeats)
        if args.only in (None, "teach"):
            bench_teach(tmp, args.teach_n, args.repeats, args.threads, torch.device(args.device))


if __name__ == "__main__":
    main()
