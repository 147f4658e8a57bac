"""DVC stage `query@<name>`: ask a teacher about the sample-views a student is unsure of, in rounds.

    python -m stages.query --name resnet_margin [--params params.yaml] [--force | --reuse]

Entry <name> of the `query` section names the teacher (its checkpoint data/teachers/<teacher>.safetensors), the
budget and how rounds choose (initial, per_round, score, ...); the round students are distill's (`distill.student`,
`distill.train`, the loss `query.<name>.loss`). Writes data/logits/<name>.zarr, a store students use like any
teacher's (`distill.teachers: [<name>]`), in the layout `teach` sets (views, dtype, ...). A killed run resumes in
the round it was in; `--reuse` (what `dvc repro` runs) goes on from the last round when the budget was raised.
"""

from __future__ import annotations

from pipeline.active.rounds import query_store
from pipeline.config import DistillConfig, TeachConfig, query_spec, teachers_section
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("query", __doc__)
    ap.add_argument("--name", required=True, help="entry of the `query` section (the store data/logits/<name>.zarr)")
    ap.add_argument("--out", default=None, help="store path (default: data/logits/<name>.zarr)")
    ap.add_argument("--force", action="store_true", help="start over: discard an existing or partial store")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="replace an existing store, going on from its last round when only the budget grew (what `dvc repro` "
        "runs: raising query.<name>.budget asks the teacher only about the new rounds' sample-views)",
    )
    run = start(ap, argv)
    name = run.args.name
    spec = query_spec(run.params, name)
    teach = run.section(TeachConfig, "teach")
    distill = run.section(DistillConfig, "distill")
    entry = teachers_section(run.params).get(spec.teacher)  # an endpoint teacher's URL and client settings
    query_store(
        run.manifest(),
        run.layout.teacher_checkpoint(spec.teacher),
        run.args.out or run.layout.store(name),
        spec,
        teach,
        distill,
        name,
        force=run.args.force,
        reuse=run.args.reuse,
        run_log=run.layout.run_log("query", name),
        endpoint=entry if entry is not None and entry.endpoint else None,
    )


if __name__ == "__main__":
    run_main(main)
