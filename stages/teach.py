"""DVC stage `teach@<name>`: run teacher <name> once over the shards and cache its raw logits.

    python -m stages.teach --name cnn [--params params.yaml] [--force | --reuse]

Writes data/logits/<name>.zarr (via <name>.zarr.partial/, resumed shard by shard after an
interruption). Section `teach` of params.yaml sets views, dtype, layout and the query budget;
`teach.cluster: local | tcp://host:8786` runs it on dask workers instead of this process.
"""

from __future__ import annotations

from pipeline.cache.teach import teach_store
from pipeline.config import TeachConfig, teachers_section
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("teach", __doc__)
    ap.add_argument("--name", required=True, help="teacher name (data/teachers/<name>.safetensors)")
    ap.add_argument("--checkpoint", default=None, help="teacher checkpoint (default: data/teachers/<name>.safetensors)")
    ap.add_argument("--out", default=None, help="store path (default: data/logits/<name>.zarr)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing store / discard a partial one")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="replace an existing store, reusing the teacher calls it already made when only the budget grew "
        "(what `dvc repro` runs: raising teach.budget calls the teacher only on the new sample-views)",
    )
    run = start(ap, argv)
    cfg = run.section(TeachConfig, "teach")
    name = run.args.name
    checkpoint = run.args.checkpoint or run.layout.teacher_checkpoint(name)
    out = run.args.out or run.layout.store(name)
    log = run.layout.run_log("teach", name)
    entry = teachers_section(run.params).get(name)  # an endpoint teacher's URL and client settings
    endpoint = entry if entry is not None and entry.endpoint else None
    teach_store(
        run.manifest(),
        checkpoint,
        out,
        cfg,
        name,
        force=run.args.force,
        reuse=run.args.reuse,
        run_log=log,
        endpoint=endpoint,
    )


if __name__ == "__main__":
    run_main(main)
