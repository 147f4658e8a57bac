"""DVC stage `teachers`: fingerprint the files your models are built from, so DVC reruns what depends on them.

    python -m stages.teachers [--params params.yaml] [--out data/teachers/inputs]

For every entry of the `teachers` zoo, writes data/teachers/inputs/<name>.json: the path, size and sha256 of each
file under weights/ the entry names (its `checkpoint:` and, for `arch: py:...`, the model's .py file; nothing for a
demo teacher of the zoo), and data/students/inputs.json for `distill.student` (its .py file when it is `py:` code).
The stage depends on the weights/ folder, `train_teacher@<name>` on its own fingerprint and the students on theirs, so
overwriting a file reruns what it feeds, and nothing else (`pipeline.inputs` says why a folder and not one dependency
per teacher).
"""

from __future__ import annotations

from pipeline.config import DistillConfig, teachers_section
from pipeline.inputs import student_inputs, write_json, write_teacher_inputs
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("teachers", __doc__, shards=False)
    ap.add_argument("--out", default=None, help="fingerprint folder (default: data/teachers/inputs)")
    run = start(ap, argv)
    out = run.args.out or run.layout.teacher_inputs_dir
    # every file checked before any is written
    student = student_inputs(run.section(DistillConfig, "distill").student, run.layout.weights)
    write_teacher_inputs(teachers_section(run.params), out, run.layout.weights)
    write_json(run.layout.student_inputs, student)


if __name__ == "__main__":
    run_main(main)
