"""`kdcache`: the command line.

kdcache inspect data/logits/cnn.zarr            what a logit store holds (out of core, dask)
kdcache verify data/logits/cnn.zarr             a full integrity scan of a store (exit 0 sound, 2 damaged)
kdcache compare metrics/a.json metrics/b.json   metrics side by side
kdcache models ['resnet*']                      the registered architectures
kdcache import-logits ...                       a store from logits computed elsewhere
kdcache serve data/teachers/cnn.safetensors     a teacher behind HTTP (kdcache's wire format, uvicorn)
kdcache prepare | teachers | train-teacher | teach | ensemble | query | distill | corrupt | evaluate | report [ARGS]
                                                run one pipeline stage by hand (what `dvc repro` runs)

A user error (bad params, a missing or bad input file, a store in use) prints one line
`kdcache <command>: error: <message>` and exits 2; `KDCACHE_DEBUG=1` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, UserError

STAGES = {
    "prepare": "stages.prepare",
    "teachers": "stages.teachers",
    "train-teacher": "stages.train_teacher",
    "teach": "stages.teach",
    "ensemble": "stages.ensemble",
    "query": "stages.query",
    "distill": "stages.distill",
    "corrupt": "stages.corrupt",
    "evaluate": "stages.evaluate",
    "report": "stages.report",
}


def _manifest_for(store: Path, shards: str | None):
    """The manifest of the store's data set, from --shards or the default data/shards/<name> (None: not there)."""
    from pipeline.cache.store import store_attrs
    from pipeline.data.shards import load_manifest
    from pipeline.layout import Layout, partial_path

    target = store if store.exists() else partial_path(store)
    if not target.exists():
        return None  # the command says what is missing
    if shards:
        return load_manifest(shards)  # named by the user: missing is an error
    name = (store_attrs(target).get("dataset") or {}).get("name")
    folder = Layout(str(name)).shards
    return load_manifest(folder) if (folder / "manifest.json").exists() else None


def _labels_for(store: Path, split: str, shards: str | None):
    """Labels of the store's data set, from --shards or the default data/shards/<name>."""
    manifest = _manifest_for(store, shards)
    if manifest is None or split not in manifest.splits:
        return None
    return manifest.iter_labels(split)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.cache.inspect_store import format_info, inspect_store

    store = Path(args.store)
    labels = None if args.no_labels else _labels_for(store, args.split, args.shards)
    info = inspect_store(store, args.split, labels=labels, chunk_rows=args.chunk_rows)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import format_report, verify_store

    store = Path(args.store)
    manifest = None if args.no_shards else _manifest_for(store, args.shards)
    report = verify_store(store, manifest, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 2


def flat_numbers(d: dict, prefix: str = "") -> dict[str, int | float]:
    """Numeric leaves of a (nested) metrics dict, nested keys joined by '.' as `dvc metrics show` does.

    Lists (reliability bins, per-severity accuracies), strings and booleans are skipped.
    """
    out: dict[str, int | float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _load_metrics(path: Path) -> dict:
    """A metrics file for `compare`: a summary is read with its details (the whole record), else the file as is."""
    from pipeline.layout import Layout
    from pipeline.records import read_record

    details = Layout.details(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path} is not a JSON metrics file ({e})") from e
    if details.is_file():
        return read_record(details)
    if isinstance(data, dict) and "schema" in data:
        return read_record(path)
    return data


def compare_keys(rows: list[dict[str, int | float]]) -> list[str]:
    """The compared numbers first (`pipeline.records.SUMMARY_KEYS`, top-1 leading), then the rest by name."""
    from pipeline.records import SUMMARY_KEYS

    keys = {k for m in rows for k in m} - {"schema"}
    return [k for k in SUMMARY_KEYS if k in keys] + sorted(keys - set(SUMMARY_KEYS))


def cmd_compare(args: argparse.Namespace) -> int:
    rows = [(Path(p).stem, flat_numbers(_load_metrics(Path(p)))) for p in args.metrics]
    keys = compare_keys([m for _, m in rows])
    width = max(12, *(len(n) for n, _ in rows))
    kw = max([16, *(len(k) + 2 for k in keys)])  # nested names like robustness.per_corruption.jpeg are long
    print(
        f"{'metric':<{kw}}"
        + "".join(f"{n:>{width + 2}}" for n, _ in rows)
        + (f"{'diff (2-1)':>14}" if len(rows) == 2 else "")
    )
    for k in keys:
        vals = [m.get(k) for _, m in rows]
        cells = "".join(f"{v:>{width + 2}.4f}" if isinstance(v, float) else f"{v!s:>{width + 2}}" for v in vals)
        diff = ""
        if len(rows) == 2 and all(isinstance(v, (int, float)) for v in vals):
            diff = f"{vals[1] - vals[0]:>+14.4f}"
        print(f"{k:<{kw}}{cells}{diff}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import build_model, count_parameters, list_models

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no architecture matches {args.pattern!r}; all: {', '.join(list_models())}")
    for name in names:
        n = count_parameters(build_model(name, args.classes, args.channels))
        print(f"{name:<16}{n:>12,} parameters at {args.classes} classes, {args.channels} channels")
    print("also: tv:<name> for any torchvision classification model (random init, never downloaded)")
    print("      timm:<name>[.<tag>] for any timm model, e.g. timm:resnet18.a1_in1k (weights only from `checkpoint:`)")
    print("      py:<file.py or module>:<callable> for your own model code, e.g. py:weights/mynet.py:MyNet")
    print("      a .pt2 (torch.export) or .onnx file as a teacher's checkpoint; a URL as teachers.<t>.endpoint")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve.app import serve

    serve(
        args.checkpoint,
        arch=args.arch,
        shards=args.shards,
        preprocess=args.preprocess,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        device=args.device,
        answer_log=args.answer_log,
    )
    return 0


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a teacher over HTTP in kdcache's wire format (GET /v1/info, POST /v1/logits; uvicorn)",
        description="Serve any teacher kdcache can load as an endpoint teacher (`teachers.<t>.endpoint`): a kdcache "
        "checkpoint (data/teachers/<t>.safetensors, or a student's model.safetensors), or your own file for a data "
        "set: a state_dict with --arch, a .pt2 torch.export program or an .onnx model (both with --shards for the "
        "data set's classes, channels and normalisation). Concurrent requests are batched into one forward pass of "
        "up to --max-batch rows. The wire format is documented in pipeline/wire.py.",
    )
    p.add_argument("checkpoint", help="the teacher: a kdcache checkpoint, a state_dict, a .pt2 or an .onnx file")
    p.add_argument("--arch", default=None, help="architecture of a bare state_dict (zoo, tv:, timm:, py:)")
    p.add_argument("--shards", default=None, help="data set folder, for a file that is not a kdcache checkpoint")
    p.add_argument("--preprocess", default="data", choices=["data", "model"], help="as teachers.<t>.preprocess")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=256, help="rows per forward pass (requests are merged up to it)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--answer-log", default=None, help="append one JSON line per answered request (ids, seconds)")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    """`kdcache ARGS`; a reader that closes the pipe early (`kdcache models | head`) ends the command quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python's advice for a closed stdout: point it at devnull so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pipeline.kernels import pin_cpu_kernels, wanted

    pin_cpu_kernels(wanted(argv))  # before torch loads (pipeline.stage imports it): byte-identical on any x86-64
    from pipeline.stage import invoked_as, run_command

    if argv and argv[0] in STAGES:
        module = importlib.import_module(STAGES[argv[0]])
        prog = f"kdcache {argv[0]}"
        with invoked_as(prog):
            return run_command(prog, lambda: module.main(argv[1:]))
    ap = argparse.ArgumentParser(
        prog="kdcache",
        description="Teacher-logit caching and offline knowledge distillation.",
        epilog="Pipeline stages (see `kdcache <stage> --help`): "
        + ", ".join(STAGES)
        + ". The whole pipeline: `dvc repro`.",
    )
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("inspect", help="summarise a logit store (schema, fingerprints, calls, entropy, ECE)")
    p.add_argument("store", help="path to <teacher>.zarr (or its .partial)")
    p.add_argument("--split", default="train")
    p.add_argument("--shards", default=None, help="data set folder for labels (default: data/shards/<dataset>)")
    p.add_argument("--no-labels", action="store_true", help="skip accuracy/ECE (no shards needed)")
    p.add_argument("--chunk-rows", type=int, default=None, help="dask block rows (default: store shard rows)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser(
        "verify",
        help="scan a logit store whole: checksums, files, values, fingerprints, teacher top-1 (exit 0 sound, 2 not)",
        description="Read every chunk of every array of a logit store (each checks its CRC32C), check that every "
        "written shard has its files, that queried rows are finite and unqueried ones empty, that the store matches "
        "the data set's shards (manifest hash, N, C) and that the teacher is better than chance on labelled splits. "
        "Lists every problem; exit 0 when there is none, 2 otherwise.",
    )
    p.add_argument("store", help="path to <teacher>.zarr (or its .partial)")
    p.add_argument("--shards", default=None, help="data set folder (default: data/shards/<dataset> when present)")
    p.add_argument("--no-shards", action="store_true", help="skip the fingerprint and teacher top-1 checks")
    p.add_argument("--json", action="store_true", help="machine-readable output (every problem)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("models", help="list the registered architectures (with parameter counts)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--channels", type=int, default=3)
    p.set_defaults(func=cmd_models)
    p = sub.add_parser(
        "compare", help="metrics files side by side, summary numbers first, with their details (`dvc metrics diff`)"
    )
    p.add_argument("metrics", nargs="+")
    p.set_defaults(func=cmd_compare)
    for name in STAGES:
        sub.add_parser(
            name, help=f"run the `{STAGES[name].split('.')[1]}` stage (args: see its --help)", add_help=False
        )
    from pipeline.cache.import_logits import add_parser as add_import

    add_import(sub)
    _add_serve(sub)
    args = ap.parse_args(argv)
    if not args.cmd:
        ap.print_help()
        return 0
    return run_command(f"kdcache {args.cmd}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
