"""DVC stage `train_teacher@<name>`: train a demo teacher, or import your own checkpoint.

    python -m stages.train_teacher --name cnn [--params params.yaml] [--shards data/shards/<ds>] [--resume|--restart]

The teacher's recipe is `teachers.<name>` in params.yaml (shared recipe: section `train_teacher`).
With `teachers.<name>.checkpoint: PATH` nothing is trained: the file (a kdcache checkpoint or a bare
state_dict of `arch`) is validated against the data set and copied to data/teachers/<name>.safetensors.
Its accuracy goes to metrics/teachers/<name>.json (what `dvc metrics show` lists) and the whole record
(training history, warnings) to metrics/teachers/details/<name>.json, both in git.
"""

from __future__ import annotations

from pipeline.config import TrainTeacherConfig, teacher_spec
from pipeline.stage import add_resume_options, run_main, stage_parser, start
from pipeline.training.teacher import train_teacher


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("train_teacher", __doc__)
    ap.add_argument("--name", required=True, help="teacher name (a key of `teachers` in params.yaml)")
    ap.add_argument("--out-dir", default=None, help="folder of the teacher's outputs (default: data/teachers)")
    ap.add_argument("--metrics-dir", default=None, help="folder of its metrics (default: metrics/teachers)")
    add_resume_options(ap)
    run = start(ap, argv)
    spec = teacher_spec(run.params, run.args.name)
    cfg = run.section(TrainTeacherConfig, "train_teacher")
    out_dir = run.args.out_dir or run.layout.teachers
    metrics_dir = run.args.metrics_dir or run.layout.teacher_metrics_dir
    log = run.layout.run_log("train_teacher", run.args.name)
    train_teacher(
        run.manifest(),
        run.args.name,
        spec,
        cfg,
        out_dir,
        metrics_dir=metrics_dir,
        resume=run.args.resume,
        state_dir=run.layout.resume_state("train_teacher", run.args.name),
        run_log=log,
    )


if __name__ == "__main__":
    run_main(main)
