"""DVC stage `prepare`: read the source data set and write WebDataset shards + manifest.

    python -m stages.prepare [--params params.yaml] [--out data/shards/<prepare.name>]

Params section `prepare`: source, root, options, shard size, splits, limit, shuffle seed.
"""

from __future__ import annotations

from pipeline.config import PrepareConfig
from pipeline.data.prepare import prepare
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("prepare", __doc__, shards=False)
    ap.add_argument("--out", default=None, help="output folder (default: data/shards/<prepare.name>)")
    run = start(ap, argv)
    cfg = run.section(PrepareConfig, "prepare")
    prepare(cfg, run.args.out or run.layout.shards)


if __name__ == "__main__":
    run_main(main)
