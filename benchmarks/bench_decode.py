"""JPEG shards at 224 px: shard bytes -> decoded image -> training view, kdcache vs torchvision's ImageNet transform.

    python -m benchmarks.bench_decode [--images 200] [--rounds 15] [--batch 64]

The images are **synthetic** ImageNet-like JPEGs made in a temp dir (not ImageNet photos): sizes drawn like
ImageNet's (mostly 500x375, 375x500, 500x333, 500x500 and the like, a fifth log-uniform between ~150 and ~800
px), content a smooth random field plus hard-edged shapes plus grain, saved by PIL at quality 90 (mean bytes
printed). They are written to tar shards twice with `write_dataset`: `keep` (the JPEG bytes as they are,
`Encoded(..., "jpg", ...)` members) and `png` (the decoded pixels as lossless PNG, what `prepare` stores
otherwise); bytes per image of each are printed.

One process, `torch.set_num_threads(1)` ("per core"), the same images on every path, each round timing every
path once in a rotated order; a path's time covers everything from shard (or in-memory JPEG) bytes to a batch
of (224, 224, 3) training views:

    (a) kdcache: `iter_shard` over the keep shards (tar walk + `decode_jpeg`) + `ResizedCropFlip(views=2).apply`,
        view 1 (the random crop), in batches of --batch;
    (b) torchvision's standard ImageNet training transform on the same JPEG bytes held in memory as uint8
        tensors: `torchvision.io.decode_jpeg` + v2 `RandomResizedCrop(224, antialias=True)` +
        `RandomHorizontalFlip()`, `torch.stack` per batch (what the default collate does);
    (c) the classic path of torchvision's ImageFolder: `PIL.Image.open(BytesIO).convert("RGB")` + v1
        `RandomResizedCrop(224)` + `RandomHorizontalFlip()` + `PILToTensor()`, stacked per batch (reference);
    (d) kdcache from the png shards (`decode_png_fast`) + the same recipe and view;
    (e) the evaluation transform: kdcache view 0 (resize 256 + centre crop 224) from the keep shards vs
        torchvision v2 `decode_jpeg` + `Resize(256, antialias=True)` + `CenterCrop(224)`.

Images/s are per CPU second of this process (`time.process_time`: on a shared machine other processes cannot
inflate it) and per wall second. The ratios (a)/(b), (a)/(c), (d)/(b), (e) ours/theirs are the median over rounds
of each round's ratio (both paths timed in that round) with their interquartile range; every round is printed.
Target (issue 26): (a)/(b) >= 1.0x. Last, a per-image breakdown of where (a)'s and (b)'s time goes.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms as v1
from torchvision.io import decode_jpeg as tv_decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from pipeline.data.shards import Encoded, iter_shard, write_dataset
from pipeline.data.tario import decode_jpeg
from pipeline.data.views import _TAG_UNIT, ResizedCropFlip, _units, hash_u64

#: ImageNet's most frequent (width, height): about 4 in 5 of its training images are one of these.
COMMON_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (500, 400), (400, 500), (640, 480)]
UNIT_COLS = np.arange(51)[None, :]  # `ResizedCropFlip.box` draws 5 * 10 + 1 uniforms per image


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like ImageNet's: a common size 80% of the time, else log-uniform ~150-800 px."""
    if rng.random() < 0.8:
        return COMMON_SIZES[int(rng.integers(len(COMMON_SIZES)))]
    w = int(np.exp(rng.uniform(np.log(150), np.log(800))))
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.67)))
    return w, int(np.clip(w / aspect, 120, 800))


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth random colour field + hard-edged shapes (slightly blurred) + grain."""
    low = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2 + 10)), y0 + int(rng.integers(10, height // 2 + 10))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    px = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    grain = rng.normal(0, 1, (height // 2 + 1, width // 2 + 1, 1)) * rng.uniform(8, 18)  # 2-px luminance grain
    px += np.repeat(np.repeat(grain, 2, 0), 2, 1)[:height, :width] + rng.normal(0, 3, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shard_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.tar"))


def batched(items: Iterator, size: int) -> Iterator[list]:
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def ours(urls: list[str], recipe: ResizedCropFlip, view: int, batch: int) -> Callable[[], int]:
    """kdcache's path: shard reader (tar walk + decode) + the recipe's `apply` per batch."""

    def run() -> int:
        rows = (row for url in urls for row in iter_shard(url))
        n = 0
        for b in batched(rows, batch):
            index = np.fromiter((i for i, _, _ in b), dtype=np.int64, count=len(b))
            out = recipe.apply([img for _, img, _ in b], index, np.full(len(b), view))
            n += len(out)
        return n

    return run


def torchvision_v2(tensors: list[torch.Tensor], transform: Callable, batch: int) -> Callable[[], int]:
    """torchvision's path: `decode_jpeg` + a v2 transform per image, `torch.stack` per batch."""

    def run() -> int:
        n = 0
        for b in batched(iter(tensors), batch):
            n += len(torch.stack([transform(tv_decode_jpeg(t)) for t in b]))
        return n

    return run


def pil_folder(jpegs: list[bytes], transform: Callable, batch: int) -> Callable[[], int]:
    """ImageFolder's path: PIL open + convert("RGB") + a v1 PIL transform per image, stacked per batch."""

    def run() -> int:
        n = 0
        for b in batched(iter(jpegs), batch):
            n += len(torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in b]))
        return n

    return run


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def per_image_us(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Median CPU microseconds per image of `fn` (which handles n images) over `repeats` calls."""
    return 1e6 * statistics.median(timed(fn)[0] for _ in range(repeats)) / n


def iqr(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) as the other benchmarks report them (`statistics.quantiles`, n=4)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4)
    return q1, med, q3


def breakdown(jpegs: list[bytes], tensors: list[torch.Tensor], keep_urls: list[str], recipe: ResizedCropFlip) -> None:
    """Where (a)'s and (b)'s CPU time goes, per image (each part timed alone, median of 3 passes).

    Also times the two ways of making a view this benchmark found (commit 60c1258) and `ResizedCropFlip.render`
    adopted (47b1d35): the 51 uniforms of `box` hashed for a whole batch at once instead of per image, and the crop
    made a contiguous channels-last (HWC) copy before the antialiased resize (checked to give the same pixels as
    `resized_crop` on the strided view).
    """
    n, s = len(jpegs), recipe.size
    decoded = [decode_jpeg(d) for d in jpegs]  # (H, W, C) views of the decoder's channels-last memory
    chw = [torch.from_numpy(np.asarray(img)).permute(2, 0, 1) for img in decoded]  # what `render` resizes
    keys = [int(k) for k in recipe.row_params(np.arange(n), np.ones(n, dtype=np.int64))]
    boxes = [recipe.box(k, x.shape[1], x.shape[2]) for k, x in zip(keys, chw, strict=True)]
    key_col = np.array(keys, dtype=np.uint64).astype(np.int64)[:, None]
    rrc = v1.RandomResizedCrop(224)
    scale_ratio = (rrc.scale, rrc.ratio)
    train_v2 = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    out = np.empty((n, s, s, 3), np.uint8)

    def walk() -> None:
        for url in keep_urls:
            for _ in iter_shard(url, decode=False):
                pass

    def all_boxes() -> None:
        for k, x in zip(keys, chw, strict=True):
            recipe.box(k, x.shape[1], x.shape[2])

    def views(hwc_crop: bool) -> list[torch.Tensor]:
        res = []
        for x, (top, left, h, w, flip) in zip(chw, boxes, strict=True):
            crop = x[:, top : top + h, left : left + w]
            if hwc_crop:  # a contiguous HWC copy of the crop: the uint8 antialiased kernel's own layout
                y = tvf.resize(crop.permute(1, 2, 0).contiguous().permute(2, 0, 1), [s, s], antialias=True)
            else:  # what `render` did before 47b1d35
                y = tvf.resized_crop(x, top, left, h, w, [s, s], antialias=True)
            res.append(y.flip(-1) if flip else y)
        return res

    def to_rows(ys: list[torch.Tensor]) -> None:
        for k, y in enumerate(ys):
            out[k] = y.permute(1, 2, 0).numpy()  # the batch row copy

    now, fixed = views(False), views(True)
    same = all(torch.equal(a, b) for a, b in zip(now, fixed, strict=True))
    parts = [
        ("tar walk (`iter_shard(decode=False)`)", walk),
        ("`tario.decode_jpeg` (bytes -> HWC view)", lambda: [decode_jpeg(d) for d in jpegs]),
        ("`torchvision.io.decode_jpeg` (uint8 tensor)", lambda: [tv_decode_jpeg(t) for t in tensors]),
        ("`recipe.row_params` (one hash per batch)", lambda: recipe.row_params(np.arange(n), np.ones(n, np.int64))),
        ("`recipe.box` hashing its own uniforms (`_units` below; `render` passes a batch's)", all_boxes),
        ("`views._units(key, 51)` alone (one numpy hash per image)", lambda: [_units(k, 51) for k in keys]),
        ("the same uniforms, one `hash_u64` for all images", lambda: hash_u64(key_col, _TAG_UNIT, UNIT_COLS)),
        ("v1 `RandomResizedCrop.get_params` (torch RNG)", lambda: [rrc.get_params(x, *scale_ratio) for x in chw]),
        ("`resized_crop` 224 antialias + flip on the strided view (`render` before 47b1d35)", lambda: views(False)),
        ("HWC row copy of those (CHW-strided) views", lambda: to_rows(now)),
        ("the same on a contiguous HWC copy of the crop (`render` now)", lambda: views(True)),
        ("HWC row copy of those (channels-last) views", lambda: to_rows(fixed)),
        ("`recipe.render` view 1 in all (box + crop + flip + copy)", lambda: recipe.render(decoded, keys, [1] * n)),
        ("v2 RandomResizedCrop + flip + `torch.stack`, in all", lambda: torch.stack([train_v2(x) for x in chw])),
    ]
    print("\n### Where the time goes (CPU us per image, each part alone, median of 3 passes)\n")
    print("| part | us / image |")
    print("|---|---:|")
    for name, fn in parts:
        print(f"| {name} | {per_image_us(fn, n):.1f} |", flush=True)
    print(f"\nresized_crop on the contiguous HWC crop gives the same pixels as on the strided view: {same}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="synthetic JPEGs (default 200)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds, every path once per round (default 15)")
    ap.add_argument("--batch", type=int, default=64, help="views per batch (default 64)")
    ap.add_argument("--shard-size", type=int, default=100, help="samples per tar shard (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread, {args.images} images, "
          f"batch {args.batch}, {args.rounds} rounds")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as d:
        tmp = Path(d)
        jpegs = [synthetic_jpeg(rng, *image_size(rng)) for _ in range(args.images)]
        for k, data in enumerate(jpegs):
            (tmp / f"{k:05d}.jpg").write_bytes(data)
        images = [np.ascontiguousarray(decode_jpeg(data)) for data in jpegs]
        labels = rng.integers(0, 10, args.images).tolist()
        classes = [f"c{k}" for k in range(10)]
        keep = write_dataset(
            tmp / "keep",
            "bench",
            {"train": [(Encoded(data, "jpg", img), y) for data, img, y in zip(jpegs, images, labels, strict=True)]},
            classes,
            args.shard_size,
        )
        pairs_in = list(zip(images, labels, strict=True))
        png = write_dataset(tmp / "png", "bench", {"train": pairs_in}, classes, args.shard_size)
        del pairs_in
        n = args.images
        lengths = [len(x) for x in jpegs]
        pct = ", ".join(f"{p / 1e3:.0f}" for p in np.percentile(lengths, [10, 50, 90]))
        sizes = np.array([img.shape[:2] for img in images])
        print(f"synthetic JPEGs (quality 90): mean {np.mean(lengths) / 1e3:.1f} KB (10/50/90th percentiles {pct} KB), "
              f"mean size {sizes[:, 1].mean():.0f}x{sizes[:, 0].mean():.0f} px (WxH)")  # fmt: skip
        kb, pb = shard_bytes(keep.root), shard_bytes(png.root)
        print(
            f"shard bytes per image: keep {kb / n / 1e3:.1f} KB, png {pb / n / 1e3:.1f} KB (png / keep {pb / kb:.2f}x)"
        )
        del images

        recipe = ResizedCropFlip(views=2, seed=0)
        tensors = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in jpegs]
        train_v2 = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
        eval_v2 = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
        train_pil = v1.Compose([v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(), v1.PILToTensor()])
        paths = {
            "a": ours(keep.shard_urls("train"), recipe, 1, args.batch),
            "b": torchvision_v2(tensors, train_v2, args.batch),
            "c": pil_folder(jpegs, train_pil, args.batch),
            "d": ours(png.shard_urls("train"), recipe, 1, args.batch),
            "e_ours": ours(keep.shard_urls("train"), recipe, 0, args.batch),
            "e_tv": torchvision_v2(tensors, eval_v2, args.batch),
        }
        names = {
            "a": "(a) kdcache keep shards: decode_jpeg + rrc_flip view 1",
            "b": "(b) torchvision: decode_jpeg + v2 RandomResizedCrop + flip",
            "c": "(c) ImageFolder: PIL open/convert + v1 RandomResizedCrop + flip + PILToTensor",
            "d": "(d) kdcache png shards: decode_png_fast + rrc_flip view 1",
            "e_ours": "(e) eval, kdcache keep shards: view 0 (resize 256 + centre crop 224)",
            "e_tv": "(e) eval, torchvision: decode_jpeg + v2 Resize(256) + CenterCrop(224)",
        }
        for name, fn in paths.items():  # warm-up: page cache, torch's lazy inits, the decoders
            assert fn() == n, name
        order = list(paths)
        cpu: dict[str, list[float]] = {k: [] for k in paths}
        wall: dict[str, list[float]] = {k: [] for k in paths}
        pairs = [("a", "b"), ("a", "c"), ("d", "b"), ("e_ours", "e_tv")]
        print("\nimages/s per CPU second (per wall second), every round; ratios on CPU time\n")
        print("| round | " + " | ".join(order) + " | " + " | ".join(f"{x}/{y}" for x, y in pairs) + " |")
        print("|---:|" + "---:|" * (len(order) + len(pairs)))
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:  # rotated: no path always goes first
                c, w = timed(paths[name])
                cpu[name].append(n / c)
                wall[name].append(n / w)
            cells = [f"{cpu[k][-1]:.0f} ({wall[k][-1]:.0f})" for k in order]
            cells += [f"{cpu[x][-1] / cpu[y][-1]:.3f}" for x, y in pairs]
            print(f"| {r + 1} | " + " | ".join(cells) + " |", flush=True)

        print(f"\n### Summary ({args.rounds} rounds, medians; ratio = median of the rounds' ratios [IQR])\n")
        print("| path | images/s per CPU s | images/s per wall s |")
        print("|---|---:|---:|")
        for k in order:
            print(f"| {names[k]} | {statistics.median(cpu[k]):.0f} | {statistics.median(wall[k]):.0f} |")
        print("\n| ratio | CPU time [IQR] | wall time [IQR] |")
        print("|---|---:|---:|")
        for x, y in pairs:
            cells = []
            for t in (cpu, wall):
                q1, med, q3 = iqr([a / b for a, b in zip(t[x], t[y], strict=True)])
                cells.append(f"{med:.3f}x [{q1:.3f}, {q3:.3f}]")
            print(f"| {x}/{y} | {cells[0]} | {cells[1]} |")
        q1, med, q3 = iqr([a / b for a, b in zip(cpu["a"], cpu["b"], strict=True)])
        print(f"\ntarget (a)/(b) >= 1.0x: {'met' if med >= 1.0 else 'NOT met'} ({med:.3f}x [{q1:.3f}, {q3:.3f}])")
        breakdown(jpegs, tensors, keep.shard_urls("train"), recipe)


if __name__ == "__main__":
    main()
