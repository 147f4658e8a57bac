"""DVC stage `corrupt`: CIFAR-C-style corrupted copies of the test split, once per data set -> data/corrupt/<dataset>.

    python -m stages.corrupt [--params params.yaml] [--shards data/shards/<ds>] [--out data/corrupt/<ds>]

Params section `corrupt`: corruptions, severities, seed, limit (see `pipeline.corruptions`). Every
student's `evaluate` stage reads the result, so the corrupted images are made once, not per student.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import from_dict, load_params, section
from pipeline.corruptions import CorruptConfig, write_corrupted
from pipeline.runtime import setup_logging
from pipeline.shards import load_manifest

log = logging.getLogger("stages.corrupt")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.corrupt", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default=None, help="prepared data set folder (default: data/shards/<prepare.name>)")
    ap.add_argument("--out", default=None, help="default: data/corrupt/<prepare.name>")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = from_dict(CorruptConfig, section(params, "corrupt"), "corrupt")
    dataset = params["prepare"]["name"]
    manifest = load_manifest(args.shards or f"data/shards/{dataset}")
    path = write_corrupted(args.out or f"data/corrupt/{dataset}", manifest, cfg)
    log.info("corrupted test set written to %s", path)


if __name__ == "__main__":
    main()
