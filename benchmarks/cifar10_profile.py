"""Natural-image benchmark: the `profiles/cifar10.yaml` pipeline on the full CIFAR-10 (JPEG ImageFolder), CPU.

    python -m benchmarks.cifar10_profile [--workdir /tmp/kdcache-cifar10] [--archive PATH]

Clones this repository's committed code into `--workdir` (so the run never touches this checkout's
`params.yaml` or `data/`), applies the profile with `prepare.root` pointing at the archive, runs
`dvc repro` there (resumable: rerunning continues where it stopped) and prints the student table of
`reports/report.md`. About an hour on 2 CPU cores: two ResNet teachers (resnet8, resnet20; 4 epochs),
10 `cnn_tiny` students (5 losses x 2 teachers, 6 epochs), corruptions and evaluation.

The archive is `../shared/datasets/cifar10-jpeg.tar.gz` from the project root; where it is absent the
benchmark says so and exits 0 (nothing downloads a data set).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def archive_args(
    doc: str, workdir: str, argv: list[str] | None, seeds: bool = False
) -> tuple[argparse.Namespace, Path | None]:
    """`--archive` (the CIFAR-10 JPEG ImageFolder) and `--workdir` (and `--seeds`); the archive is None (skip: said
    so) if absent."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workdir", default=workdir, help="where the benchmark works")
    ap.add_argument("--archive", default=str(ARCHIVE), help="CIFAR-10 JPEG ImageFolder (.tar.gz or folder)")
    if seeds:
        ap.add_argument("--seeds", type=int, nargs="+", default=None, help="distill.seeds (default: the profile's)")
    args = ap.parse_args(argv)
    archive = Path(args.archive).resolve()
    if not archive.exists():
        print(f"skip: {archive} is absent (this benchmark needs the CIFAR-10 JPEG ImageFolder; nothing is downloaded)")
        return args, None
    return args, archive


def main(argv: list[str] | None = None) -> int:
    args, archive = archive_args(__doc__, "/tmp/kdcache-cifar10", argv, seeds=True)  # workdir: a git clone
    if archive is None:
        return 0
    work = Path(args.workdir)
    if not (work / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    params = yaml.safe_load((ROOT / "profiles" / "cifar10.yaml").read_text())
    params["prepare"]["root"] = str(archive)
    if args.seeds:
        params["distill"]["seeds"] = args.seeds
    new = yaml.safe_dump(params, sort_keys=False)
    target = work / "params.yaml"
    if not target.exists() or target.read_text() != new:
        target.write_text(new)
    # dvc.yaml's commands run `python`: this interpreter's (the venv's), whether or not the venv is activated
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, check=True)
    print(f"dvc repro: {time.perf_counter() - start:.0f} s wall in {work}")
    report = (work / "reports" / "report.md").read_text()
    section = report.split("## Student top-1", 1)[-1].split("\n## ", 1)[0]  # the table, up to the next section
    print("## Student top-1" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
