"""DVC stage `teachers`: fingerprint the files your teachers are built from, so DVC reruns what depends on them.

    python -m stages.teachers [--params params.yaml] [--out data/teachers/inputs]

For every entry of the `teachers` zoo, writes data/teachers/inputs/<name>.json: the path, size and sha256 of each
file under weights/ the entry names (its `checkpoint:`; nothing for a demo teacher). The stage depends on the weights/
folder and `train_teacher@<name>` on its own fingerprint, so overwriting a checkpoint reruns that teacher and what it
feeds, and nothing else (`pipeline.inputs` says why a folder and not one dependency per teacher).
"""

from __future__ import annotations

from pipeline.config import teachers_section
from pipeline.inputs import write_teacher_inputs
from pipeline.stage import run_main, stage_parser, start


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("teachers", __doc__, shards=False)
    ap.add_argument("--out", default=None, help="fingerprint folder (default: data/teachers/inputs)")
    run = start(ap, argv)
    out = run.args.out or run.layout.teacher_inputs_dir
    write_teacher_inputs(teachers_section(run.params), out, run.layout.weights)


if __name__ == "__main__":
    run_main(main)
