"""An ImageNet-1k-sized train logit store, written and read through the real store code, in bounded memory.

    python -m benchmarks.bench_scale [--rows 1281167] [--classes 1000] [--shard-rows 5000] [--formats dense,topk]
                                     [--small 0.1] [--workers 1] [--random-batches 20] [--keep]

What is written: one `train` split of `--rows` rows x `--classes` classes, through `StoreWriter` exactly as the
teach stage drives it (`teach.build_spec`'s spec fields, `run_teach`'s loop: one `write_shard` per store shard of
`--shard-rows` rows, at most one write in flight on a background thread while the next shard's logits are made,
then `finalize`), with the project defaults otherwise (float16, blosc-zstd + CRC32C, 1,000-row chunks, one file
per store shard and array). Formats (`FORMATS`):

    dense  V = 1 view, the `logits` (N, V, C) float16 array;
    topk   V = 8 views, k = 10: the store's top-k layout (`topk_values`, `topk_indices`, `tail_mass`), which
           `write_shard` makes from the dense (n, V, C) float32 block by `topk_compress`;
    sampled, features  (issue 29's new formats) are NOT built yet: their entries are hooks that say so.

The teacher outputs are **synthetic** (no network runs): per shard, from a generator seeded by (seed, shard),
logits = s * Gumbel(0, 1) noise per class (s = exp(N(0, 0.25)) per sample-view) plus a margin N(9, 3) (+ N(0, 1)
per view) on a "true" class drawn per row. The softmax then has a peaked head and a long tail: mean top-1
probability ~0.62, mean mass outside the top 10 ~0.20 at C = 1,000 (the top-k store's `tail_mass`, printed).
Making them is timed apart from writing (`gen`).

What is read, each in a child process of its own:
  (a) loader: what `training.dataset._ShardJoin` does with the store, minus the tar shards (no images exist
      here): open `LogitStore` (its file checks) and read `queried`, then per store shard in a seeded shuffled
      order (split over `--workers` forked processes as `split_by_worker` does) one `read_block(dtype=None)`,
      the view of each row by `pick_allowed_view`, the row's (C,) logits `block[r, v]` picked one by one in
      Python and stacked into float32 batches of `--batch` rows (`_collate`); no shuffle buffer;
  (b) random: batches of `--batch` uniformly random rows through `LogitStore.read_rows` (whole-shard decodes, an
      LRU of 4 shards), then each row's view; `--random-batches` batches or `--random-seconds`, whichever first.

Also timed, as subprocesses over the whole store: `kdcache verify STORE --no-shards` and `kdcache inspect STORE
--no-labels`. Every child's peak RSS is its `ru_maxrss` from `os.wait4` (the child and anything it waited for;
a loader worker also reports its own); a child that only imports the store code gives the floor under them. With
`--small F` every step also runs on a store of F x N rows first, so the peaks at two sizes can be compared (the
target: independent of N, under 2 GB). Rows/s are over wall seconds; the files and bytes on disk are counted after
`finalize`. Stores live in a temp dir under `--tmp` (default /tmp) and are deleted at the end unless `--keep`.
A failing `verify` or `inspect` is reported (its error line, "failed" in the table), not fatal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_TRAIN_ROWS = 1_281_167
IMAGENET_CLASSES = 1000


# ---------------------------------------------------------------------------------------------
# formats


@dataclass(frozen=True)
class Format:
    """A store format under test: its views and the `StoreSpec` fields that select it (None: not built yet)."""

    name: str
    views: int
    topk: int = 0
    built: bool = True
    note: str = ""


FORMATS: dict[str, Format] = {
    "dense": Format("dense", views=1),
    "topk": Format("topk", views=8, topk=10),
    # Issue 29, deliverable 2: hooks only. When `teach.format: sampled | features` exists, give these a spec (the
    # store's own fields) and, if the writer takes other inputs than (n, V, C) logits, a generator of their own.
    "sampled": Format("sampled", views=8, built=False, note="distinct class ids + counts (issue 29): not built yet"),
    "features": Format("features", views=1, built=False, note="penultimate features + head (issue 29): not built yet"),
}


def store_spec(fmt: Format, n: int, num_classes: int, shard_rows: int, seed: int) -> Any:
    """The spec `teach.build_spec` would make for this shape (float16, blosc-zstd, 1,000-row chunks, no budget)."""
    from pipeline.cache.budget import BudgetSpec
    from pipeline.cache.store import SplitSpec, StoreSpec
    from pipeline.data.views import ResizedCropFlip

    if not fmt.built:
        raise SystemExit(f"format {fmt.name}: {fmt.note}")
    recipe = ResizedCropFlip(views=fmt.views, seed=seed)  # the ImageNet training recipe; only its record is used
    split = SplitSpec(
        n=n, num_classes=num_classes, views=fmt.views, shard_rows=shard_rows, view_recipe=recipe.to_dict()
    )
    return StoreSpec(
        teacher={"name": "synthetic", "arch": "heavy-tailed-gumbel", "weights_sha256": "0" * 64},
        dataset={"name": f"synthetic-imagenet-{n}x{num_classes}", "manifest_sha256": "0" * 64},
        splits={"train": split},
        dtype="float16",
        topk=fmt.topk,
        compressor="blosc-zstd",
        chunk_rows=min(1000, shard_rows),
        extra={"budget": BudgetSpec().to_attrs()},
    )


def synthetic_logits(seed: int, j: int, n: int, views: int, num_classes: int) -> np.ndarray:
    """(n, V, C) float32 heavy-tailed teacher logits of store shard j, seeded by (seed, j) (see the docstring)."""
    rng = np.random.default_rng([seed, j])
    y = rng.integers(num_classes, size=n)
    margin = rng.normal(9.0, 3.0, size=(n, 1)).astype(np.float32)
    scale = np.exp(rng.normal(0.0, 0.25, size=(n, views, 1))).astype(np.float32)
    z = rng.standard_exponential(size=(n, views, num_classes), dtype=np.float32)
    np.maximum(z, np.float32(1e-30), out=z)
    np.log(z, out=z)
    np.negative(z, out=z)  # Gumbel(0, 1) = -log(Exp(1))
    z *= scale
    z[np.arange(n), :, y] += margin + rng.normal(0.0, 1.0, size=(n, views)).astype(np.float32)
    return z


# ---------------------------------------------------------------------------------------------
# children (each step runs in a process of its own, so its peak RSS is its own)


def child_write(path: str, fmt_name: str, n: int, num_classes: int, shard_rows: int, seed: int) -> dict[str, Any]:
    """`run_teach`'s write loop with synthetic logits in place of the teacher."""
    from pipeline.cache.store import StoreWriter

    fmt = FORMATS[fmt_name]
    spec = store_spec(fmt, n, num_classes, shard_rows, seed)
    t0 = time.perf_counter()
    writer = StoreWriter(path, spec, force=True)
    split = spec.splits["train"]
    gen_s = 0.0
    write_s = [0.0]

    def write(j: int, logits: np.ndarray) -> None:
        t = time.perf_counter()
        writer.write_shard("train", j, logits)
        write_s[0] += time.perf_counter() - t

    with ThreadPoolExecutor(1) as wpool:
        pending: Future | None = None
        for j in writer.pending("train"):
            start, stop = split.shard_range(j)
            t = time.perf_counter()
            logits = synthetic_logits(seed, j, stop - start, fmt.views, num_classes)
            gen_s += time.perf_counter() - t
            if pending is not None:
                pending.result()  # at most one write in flight, as run_teach
            pending = wpool.submit(write, j, logits)
            del logits
        if pending is not None:
            pending.result()
    t = time.perf_counter()
    writer.finalize()
    finalize_s = time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t0, "gen_s": gen_s, "write_s": write_s[0], "finalize_s": finalize_s}


def _loader_worker(path: str, shards: list[int], batch: int, seed: int, q: Any) -> None:
    from pipeline.cache.store import LogitStore
    from pipeline.data.views import pick_allowed_view

    t0 = time.perf_counter()
    store = LogitStore(path, split="train")  # each worker opens its own handle, as DistillDataset.store()
    allowed = store.queried()
    rows = batches = 0
    checksum = 0.0
    for j in shards:
        start, stop = store.shard_range(j)
        block = store.read_block(start, stop, dtype=None)  # one contiguous read, stored dtype
        view = pick_allowed_view(seed, 0, np.arange(start, stop), allowed[start:stop])
        items = [block[r, v] for r, v in enumerate(view.tolist())]  # (C,) per row, as _ShardJoin.items
        for i in range(0, len(items), batch):
            out = np.stack(items[i : i + batch]).astype(np.float32, copy=False)  # (B, C), as _collate
            checksum += float(out[:, 0].sum())
            batches += 1
        rows += len(items)
        del block, items
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    q.put({"rows": rows, "batches": batches, "s": time.perf_counter() - t0, "peak_rss": peak, "checksum": checksum})


def child_read_loader(path: str, workers: int, batch: int, seed: int) -> dict[str, Any]:
    """Every store shard once in a shuffled order, split over `workers` forked processes."""
    from pipeline.cache.store import LogitStore

    t0 = time.perf_counter()
    store = LogitStore(path, split="train")  # the main process opens (and checks) the store once, as DistillDataset
    order = list(range(len(store.done)))
    random.Random(seed).shuffle(order)
    del store
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_loader_worker, args=(path, order[w::workers], batch, seed, q)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"loader worker failed with exit code {p.exitcode}")
    return {
        "wall_s": time.perf_counter() - t0,
        "rows": sum(r["rows"] for r in results),
        "batches": sum(r["batches"] for r in results),
        "worker_peak_rss": max(r["peak_rss"] for r in results),
    }


def child_read_random(path: str, batch: int, max_batches: int, max_seconds: float, seed: int) -> dict[str, Any]:
    """Batches of uniformly random rows through `LogitStore.read_rows`, each row's view picked."""
    from pipeline.cache.store import LogitStore
    from pipeline.data.views import pick_allowed_view

    t0 = time.perf_counter()
    store = LogitStore(path, split="train")
    allowed = store.queried()
    rng = np.random.default_rng(seed)
    rows = batches = 0
    shards_touched = 0
    t1 = time.perf_counter()
    while batches < max_batches and (batches == 0 or time.perf_counter() - t1 < max_seconds):
        idx = rng.choice(store.n, size=min(batch, store.n), replace=False)
        block = store.read_rows(idx)  # (B, V, C) float32
        view = pick_allowed_view(seed, 0, idx, allowed[idx])
        out = block[np.arange(len(idx)), view]  # (B, C)
        assert np.isfinite(out).all()
        rows += len(idx)
        batches += 1
        shards_touched += len(np.unique(idx // store.shard_rows))
    return {
        "wall_s": time.perf_counter() - t0,
        "read_s": time.perf_counter() - t1,
        "rows": rows,
        "batches": batches,
        "shards_per_batch": shards_touched / max(batches, 1),
    }


def child_baseline() -> dict[str, Any]:
    """Nothing but the imports every reader and writer child makes: the floor under their peak RSS."""
    import pipeline.cache.store  # noqa: F401
    import pipeline.data.views  # noqa: F401

    return {}


def child_main(args: argparse.Namespace) -> None:
    kind, payload = args.child
    kw = json.loads(payload)
    fn = {"baseline": child_baseline, "write": child_write, "loader": child_read_loader, "random": child_read_random}[
        kind
    ]
    print("RESULT " + json.dumps(fn(**kw)), flush=True)


# ---------------------------------------------------------------------------------------------
# the driver


def run_measured(cmd: list[str], check: bool = True) -> tuple[dict[str, Any], float, int, str]:
    """Run `cmd`; (its RESULT json or {}, wall seconds, peak RSS bytes of it and its waited-for children, output).

    The child is reaped by `os.wait4`, whose rusage is the child's own (ru_maxrss: the largest of the child and
    of the descendants it waited for), not the maximum over every child this driver ran."""
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        log.seek(0)
        out = log.read()
    if p.returncode and check:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{out[-3000:]}")
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    if p.returncode:
        result = {"rc": p.returncode, "error": out.strip().splitlines()[-1] if out.strip() else ""}
    return result, wall, usage.ru_maxrss * 1024, out


def run_child(kind: str, **kw: Any) -> tuple[dict[str, Any], float, int]:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child", kind, json.dumps(kw)]
    result, wall, peak, _ = run_measured(cmd)
    return result, wall, peak


def disk_usage(path: Path) -> tuple[int, int]:
    """(files, bytes) of everything under `path` (file sizes, as `du --apparent-size`)."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size


def mean_tail_mass(path: Path) -> float | None:
    from pipeline.cache.store import LogitStore

    store = LogitStore(path, split="train")
    if not store.topk:
        return None
    return float(np.mean(store.read_array("tail_mass", 0, min(store.n, 50_000))))


def bench_one(fmt: Format, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Write, read (both patterns), verify and inspect one store of n rows; one result row."""
    path = tmp / f"{fmt.name}-{n}.zarr"
    row: dict[str, Any] = {"format": fmt.name, "rows": n, "views": fmt.views, "classes": args.classes, "topk": fmt.topk}
    w, wall, peak = run_child(
        "write",
        path=str(path),
        fmt_name=fmt.name,
        n=n,
        num_classes=args.classes,
        shard_rows=args.shard_rows,
        seed=args.seed,
    )
    files, size = disk_usage(path)
    row.update(
        write_wall_s=wall,
        write_rows_s=n / w["wall_s"],
        gen_s=w["gen_s"],
        write_shard_s=w["write_s"],
        finalize_s=w["finalize_s"],
        write_peak_rss=peak,
        files=files,
        bytes=size,
        bytes_per_row=size / n,
        bytes_per_view=size / (n * fmt.views),
        tail_mass=mean_tail_mass(path),
    )
    _report(row, "write")
    r, wall, peak = run_child("loader", path=str(path), workers=args.workers, batch=args.batch, seed=args.seed)
    assert r["rows"] == n, r
    row.update(loader_wall_s=r["wall_s"], loader_rows_s=n / r["wall_s"], loader_peak_rss=peak)
    row["loader_worker_peak_rss"] = r["worker_peak_rss"]
    _report(row, "loader")
    r, wall, peak = run_child(
        "random",
        path=str(path),
        batch=args.batch,
        max_batches=args.random_batches,
        max_seconds=args.random_seconds,
        seed=args.seed,
    )
    row.update(
        random_rows=r["rows"],
        random_rows_s=r["rows"] / r["read_s"],
        random_shards_per_batch=r["shards_per_batch"],
        random_peak_rss=peak,
    )
    _report(row, "random")
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    cli = {"verify": ["--no-shards"], "inspect": ["--no-labels"]}
    for name, flags in cli.items():
        res, wall, peak, out = run_measured([kdcache, name, str(path), *flags], check=False)
        row.update({f"{name}_wall_s": wall, f"{name}_rows_s": n / wall, f"{name}_peak_rss": peak})
        row[f"{name}_error"] = res.get("error") if res.get("rc") else None  # reported, not fatal: a finding
        if args.verbose or res.get("rc"):
            print(out[-2000:], flush=True)
        _report(row, name)
    if not args.keep:
        shutil.rmtree(path)
    return row


def _report(row: dict[str, Any], step: str) -> None:
    keys = [
        k
        for k in row
        if k.startswith(step) or (step == "write" and k in ("files", "bytes_per_row", "tail_mass", "gen_s"))
    ]
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in keys}
    print(f"  {row['format']} N={row['rows']:,} {step}: {json.dumps(shown)}", flush=True)


def _mb(b: int) -> str:
    return f"{b / 2**20:,.0f} MB"


def _cli(r: dict[str, Any], name: str) -> str:
    failed = " (**failed**)" if r[f"{name}_error"] else ""
    return f"{r[f'{name}_wall_s']:,.1f} s / {_mb(r[f'{name}_peak_rss'])}{failed}"


def _k(topk: int) -> str:
    return f", k={topk}" if topk else ""


def table(rows: list[dict[str, Any]], workers: int = 1) -> str:
    """The results as a Markdown table, one column per (format, N)."""
    cols = [f"{r['format']} (V={r['views']}{_k(r['topk'])}) N={r['rows']:,}" for r in rows]
    lines = [
        ("rows/s written (wall, incl. synthetic logits)", lambda r: f"{r['write_rows_s']:,.0f}"),
        (
            "  of which: making logits / `write_shard` (s, summed; they overlap)",
            lambda r: f"{r['gen_s']:,.0f} / {r['write_shard_s']:,.0f}",
        ),
        ("writer peak RSS", lambda r: _mb(r["write_peak_rss"])),
        ("files created", lambda r: f"{r['files']:,}"),
        ("bytes on disk", lambda r: f"{r['bytes'] / 1e9:,.3f} GB"),
        ("bytes per row / per sample-view", lambda r: f"{r['bytes_per_row']:,.1f} / {r['bytes_per_view']:,.1f}"),
        ("mean tail mass outside top-k", lambda r: "" if r["tail_mass"] is None else f"{r['tail_mass']:.3f}"),
        (f"rows/s read, loader (shuffled shards, {workers} worker(s))", lambda r: f"{r['loader_rows_s']:,.0f}"),
        (
            "loader peak RSS (process / worker)",
            lambda r: f"{_mb(r['loader_peak_rss'])} / {_mb(r['loader_worker_peak_rss'])}",
        ),
        ("rows/s read, random batches (`read_rows`)", lambda r: f"{r['random_rows_s']:,.0f}"),
        (
            "  rows read / store shards per batch",
            lambda r: f"{r['random_rows']:,} / {r['random_shards_per_batch']:.0f}",
        ),
        ("random reader peak RSS", lambda r: _mb(r["random_peak_rss"])),
        (
            "`kdcache verify --no-shards`: wall / peak RSS",
            lambda r: _cli(r, "verify"),
        ),
        (
            "`kdcache inspect --no-labels`: wall / peak RSS",
            lambda r: _cli(r, "inspect"),
        ),
    ]
    out = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    out += [f"| {label} | " + " | ".join(fn(r) for r in rows) + " |" for label, fn in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=IMAGENET_TRAIN_ROWS, help="train rows N (ImageNet-1k: 1,281,167)")
    ap.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    ap.add_argument("--shard-rows", type=int, default=5000, help="rows per store shard (params.yaml data.shard_size)")
    ap.add_argument("--formats", default="dense,topk", help=f"comma-separated, of {list(FORMATS)}")
    ap.add_argument("--small", type=float, default=0.1, help="also run N x this first, to compare peaks (0: skip)")
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes")
    ap.add_argument("--batch", type=int, default=256, help="rows per batch (both read patterns)")
    ap.add_argument("--random-batches", type=int, default=20)
    ap.add_argument("--random-seconds", type=float, default=60.0, help="stop random batches after this (>= 1 batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default="/tmp", help="where the temp dir of the stores goes")
    ap.add_argument("--keep", action="store_true", help="keep the stores (their path is printed)")
    ap.add_argument("--json", help="also write the result rows to this file")
    ap.add_argument("--verbose", action="store_true", help="print verify's and inspect's output")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return
    formats = [FORMATS[f] for f in args.formats.split(",")]
    for fmt in formats:
        if not fmt.built:
            raise SystemExit(f"format {fmt.name}: {fmt.note}")
    sizes = sorted({max(args.shard_rows, round(args.rows * args.small)), args.rows}) if args.small else [args.rows]
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp))
    print(f"stores in {tmp}; sizes {sizes}; formats {[f.name for f in formats]}", flush=True)
    _, _, base = run_child("baseline")
    print(f"peak RSS of a child that only imports the store code: {_mb(base)}", flush=True)
    rows = []
    try:
        for fmt in formats:
            for n in sizes:
                rows.append(bench_one(fmt, n, args, tmp))
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows, args.workers))
    print(f"\npeak RSS of a child that only imports the store code: {_mb(base)}")
    for r in rows:
        for name in ("verify", "inspect"):
            if r[f"{name}_error"]:
                print(f"{r['format']} N={r['rows']:,}: kdcache {name} failed: {r[f'{name}_error']}")


if __name__ == "__main__":
    main()
