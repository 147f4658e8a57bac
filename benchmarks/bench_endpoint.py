"""What a teacher behind HTTP costs against the same teacher in-process: `kdcache serve` + the endpoint client.

    python -m benchmarks.bench_endpoint [--checkpoint data/teachers/cnn.safetensors] [--images 2000] [--rounds 5]

The teacher is a kdcache checkpoint (default: the pipeline's `cnn` Fashion-MNIST teacher, `dvc repro` makes it);
the images are the first `--images` test images of its data set (`--shards`, default data/shards/fashion_mnist).
One `kdcache serve` process (uvicorn, `--max-batch` = the request size) on 127.0.0.1 and this process as the client
share the machine's cores, so the numbers are what a teacher server on the same host costs, not a network.

Each round times, in a rotated order: (a) in-process, `predict_arrays(model, images, batch)` (what the teach stage
runs for a local teacher); (b) the endpoint, `EndpointTeacher.answer` with `concurrency` 1; (c) with concurrency 4
(requests merged by the server up to its max batch). A path's rows/s is images over wall seconds. Ratios (b)/(a),
(c)/(a): median over rounds of each round's ratio, with the range. The logits of (b) are checked equal to (a)'s bit
for bit (same batches), (c)'s to 1e-5.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.endpoint import EndpointTeacher
from pipeline.data.shards import load_manifest, read_rows
from pipeline.models import load_model, predict_arrays


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    code = f"import torch; torch.set_num_threads({threads}); from pipeline.cli import main; main()"
    cmd = [sys.executable, "-c", code, "serve", checkpoint, "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("kdcache serve exited") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("kdcache serve did not start in 120 s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="data/teachers/cnn.safetensors")
    ap.add_argument("--shards", default="data/shards/fashion_mnist")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128, help="rows per request = the server's max batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the in-process pass")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.shards)
    n = min(args.images, manifest.split("test").n)
    images, _ = read_rows(manifest, "test", np.arange(n))
    model, _ = load_model(args.checkpoint, data=manifest)
    port = free_port()
    server = start_server(str(Path(args.checkpoint).resolve()), port, args.batch, args.threads)
    url = f"http://127.0.0.1:{port}"
    c = manifest.num_classes
    clients = {k: EndpointTeacher(url, num_classes=c, batch_size=args.batch, concurrency=k) for k in (1, 4)}
    index, view = np.arange(n), np.zeros(n, dtype=np.int64)
    paths = {
        "a": lambda: predict_arrays(model, images, args.batch),
        "b": lambda: clients[1].answer(images, "test", index, view),
        "c": lambda: clients[4].answer(images, "test", index, view),
    }
    try:
        ref = paths["a"]()
        assert np.array_equal(paths["b"](), ref), "concurrency 1: not the local logits bit for bit"
        np.testing.assert_allclose(paths["c"](), ref, atol=1e-5)
        rate: dict[str, list[float]] = {k: [] for k in paths}
        order = list(paths)
        for r in range(args.rounds):
            for k in order[r % 3 :] + order[: r % 3]:
                t0 = time.perf_counter()
                paths[k]()
                rate[k].append(n / (time.perf_counter() - t0))
            print(f"round {r}: " + ", ".join(f"{k} {rate[k][-1]:,.0f} rows/s" for k in paths), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\n{n} images, batch {args.batch}, {args.threads} torch thread(s) per process, {args.rounds} rounds")
    for k, name in (("a", "in-process"), ("b", "endpoint, concurrency 1"), ("c", "endpoint, concurrency 4")):
        ratios = [x / y for x, y in zip(rate[k], rate["a"], strict=True)]
        print(
            f"{name:<26} {statistics.median(rate[k]):>8,.0f} rows/s   vs in-process {statistics.median(ratios):.3f}x "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
