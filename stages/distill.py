"""DVC stage `distill@<teacher>-<loss>-<budget>-<seed>`: train a student on shards + cached logits.

    python -m stages.distill --teacher cnn --loss kd [--budget full] [--seed 0] [--resume | --restart]
    torchrun --nproc_per_node N -m stages.distill --teacher cnn --loss kd      # DDP (gloo on CPU, nccl on CUDA)

Never builds the teacher (cache mode): its knowledge arrives as logits joined to the shards.
Section `distill` of params.yaml holds the student, the training recipe and each loss's parameters
(`distill.loss_params.<loss>`); `distill.teacher_source: online` runs the live teacher instead, for
comparison.

Under `torchrun` (WORLD_SIZE > 1) the stage joins the process group torchrun describes, every rank
trains on its share of the shards (`pipeline.training.loop` keeps the ranks in lockstep), and only
rank 0 evaluates and writes the checkpoint, model and curves.
"""

from __future__ import annotations

from pipeline.config import DistillConfig
from pipeline.runtime import close_distributed, init_distributed
from pipeline.stage import add_resume_options, run_main, stage_parser, start
from pipeline.training.student import StudentRun, run_student


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("distill", __doc__)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--loss", required=True, help="a loss name or a '+' combination, e.g. dkd+cmkd")
    ap.add_argument("--budget", default="full", help="teacher calls this student may use ('full' = all cached)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="logit store (default: data/logits/<teacher>.zarr)")
    ap.add_argument("--out-dir", default=None, help="default: data/students/<id>")
    ap.add_argument("--curves", default=None, help="DVC plots file (default: plots/curves/<id>.json)")
    add_resume_options(ap)
    run = start(ap, argv)
    cfg = run.section(DistillConfig, "distill")
    student = StudentRun(run.args.teacher, run.args.loss, run.args.budget, run.args.seed)
    device = init_distributed()
    try:
        run_student(
            run.manifest(),
            cfg,
            student,
            run.layout,
            store=run.args.store,
            out_dir=run.args.out_dir,
            curves=run.args.curves,
            resume=run.args.resume,
            device=device,
        )
    finally:
        close_distributed()


if __name__ == "__main__":
    run_main(main)
