"""What every DVC stage entry point shares: its argument parser, its typed params section, its paths.

A stage module is parse, load, call, write::

    def main(argv=None):
        ap = stage_parser("teach", __doc__)
        ap.add_argument("--name", required=True)
        run = start(ap, argv)                      # logging, params.yaml, Layout of prepare.name
        cfg = run.section(TeachConfig, "teach")    # typed, unknown keys rejected
        teach_store(run.manifest(), ..., cfg, ...) # one library call

`--params` and `--shards` are common to every stage; `Stage.layout` knows every artifact path. `start` checks the
whole params file (`check_all_params`: every section, every loss's parameters) before the stage does any work, so
a typo anywhere fails every stage in seconds, not the stage that reads it after hours of the others.

    if __name__ == "__main__":
        run_main(main)                             # a user error: one line `<command>: error: ...`, exit 2

`run_command` is the one place a user error (`pipeline.errors.is_user_error`) becomes that line; the
`kdcache` command runs its subcommands through it too. `KDCACHE_DEBUG=1` prints the traceback as well;
any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pipeline.config import (
    ConfigError,
    DistillConfig,
    PrepareConfig,
    check_references,
    check_sections,
    from_dict,
    load_params,
    section,
)
from pipeline.errors import is_user_error, user_message
from pipeline.layout import Layout
from pipeline.runtime import setup_logging

USER_ERROR_EXIT = 2  # as argparse exits on a usage error

_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdcache_prog", default=None)

T = TypeVar("T")


def stage_parser(name: str, doc: str | None, *, shards: bool = True) -> argparse.ArgumentParser:
    """The stage's parser with the common options (`--params`, and `--shards` where the stage reads shards)."""
    first, _, rest = (doc or "").strip().partition("\n")
    ap = argparse.ArgumentParser(
        prog=_PROG.get() or f"python -m stages.{name}",
        description=first,
        epilog=rest.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    if shards:
        ap.add_argument("--shards", default=None, help="prepared data set folder (default: data/shards/<prepare.name>)")
    return ap


def add_resume_options(ap: argparse.ArgumentParser) -> None:
    """`--resume` / `--restart` of a training stage; `args.resume` is True, False or "auto" (neither flag: continue a
    killed run's resume state when it is this run's, as `dvc repro` needs; `pipeline.training.resume`)."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default="auto",
        help="continue the interrupted run; an error if there is none or it was another run (default: continue "
        "an interrupted run of exactly this run automatically, else start over)",
    )
    group.add_argument(
        "--restart", dest="resume", action="store_const", const=False, help="start over, ignoring any resume state"
    )


@dataclass
class Stage:
    """A started stage: its arguments, the params file, and the layout of the data set it works on."""

    args: argparse.Namespace
    params: dict[str, Any]
    layout: Layout

    def section(self, cls: type[T], name: str) -> T:
        """params.yaml section `name` as the dataclass `cls` (unknown keys are errors listing the valid ones)."""
        return from_dict(cls, section(self.params, name), name)

    @property
    def shards(self) -> Path:
        return Path(getattr(self.args, "shards", None) or self.layout.shards)

    def manifest(self) -> Any:
        from pipeline.data.shards import load_manifest  # the report stage never needs shards

        return load_manifest(self.shards)


def check_all_params(params: dict[str, Any]) -> None:
    """Every section of the params file, as the stages that read them will: the core's sections
    (`config.check_sections`), `corrupt` (typed beside its stage's code) and each `distill.loss_params.<loss>` (a
    loss checks its own keys: `pipeline.losses.build_loss`, which the core may not import; building a loss module
    is cheap and reads no file), then the names sections share (`config.check_references`). Each section's own
    values first: a misspelt value is named before what it leaves unresolved elsewhere. Raises ConfigError."""
    check_sections(params)
    if "corrupt" in params:
        from pipeline.data.corruptions import CorruptConfig

        from_dict(CorruptConfig, section(params, "corrupt"), "corrupt")
    if "distill" in params:
        from pipeline.losses import LossConfigError, build_loss

        for name, kw in from_dict(DistillConfig, section(params, "distill"), "distill").loss_params.items():
            try:
                build_loss(name, **(kw or {}))
            except LossConfigError as e:  # name the key: the loss only knows its own parameter names
                raise ConfigError(f"distill.loss_params.{name}: {e}", where=f"distill.loss_params.{name}") from e
    check_references(params)


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> Stage:
    """Parse `argv`, set up logging, read and check the whole params file (`check_all_params`), and the data set's
    layout."""
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    check_all_params(params)
    # The data set's name places every artifact; a stage that reads no data (report) may run without it.
    name = from_dict(PrepareConfig, section(params, "prepare"), "prepare").name if "prepare" in params else ""
    return Stage(args=args, params=params, layout=Layout(name))


@contextlib.contextmanager
def invoked_as(prog: str) -> Iterator[None]:
    """Inside the block, stage parsers call themselves `prog` (`kdcache teach` rather than `python -m stages.teach`)."""
    token = _PROG.set(prog)
    try:
        yield
    finally:
        _PROG.reset(token)


def run_command(prog: str, fn: Callable[[], Any]) -> int:
    """Run `fn()`; a user error prints `<prog>: error: <message>` on stderr and returns 2, else `fn`'s exit code.

    The message is one line; `KDCACHE_DEBUG=1` prints the traceback before it. Bugs propagate unchanged.
    """
    try:
        return int(fn() or 0)
    except Exception as e:
        if not is_user_error(e):
            raise
        if os.environ.get("KDCACHE_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {user_message(e)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> NoReturn:
    """A stage's `if __name__ == "__main__":` body: `main(argv)`, user errors as one line and exit code 2."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    module = spec.name if spec is not None else main.__module__  # `python -m stages.teach` runs as __main__
    prog = _PROG.get() or f"python -m {module}"
    sys.exit(run_command(prog, lambda: main(argv)))
