"""DVC stage `corrupt`: CIFAR-C-style corrupted copies of the test split, once per data set -> data/corrupt/<dataset>.

    python -m stages.corrupt [--params params.yaml] [--shards data/shards/<ds>] [--out data/corrupt/<ds>]

Params section `corrupt`: corruptions, severities, seed, limit (see `pipeline.data.corruptions`). Every
student's `evaluate` stage reads the result, so the corrupted images are made once, not per student.
"""

from __future__ import annotations

from pipeline.data.corruptions import CorruptConfig, write_corrupted
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("corrupt", __doc__)
    ap.add_argument("--out", default=None, help="default: data/corrupt/<prepare.name>")
    run = start(ap, argv)
    cfg = run.section(CorruptConfig, "corrupt")
    write_corrupted(run.args.out or run.layout.corrupt, run.manifest(), cfg)


if __name__ == "__main__":
    run_main(main)
