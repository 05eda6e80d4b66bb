"""Running a stage from a command line: ``python -m stages.<name> [--config FILE] [--force]
[key=value ...]``. Every stage module exposes ``run(cfg, store, force) -> None``; ``stage_main``
parses the command line, loads and validates the config, and turns known errors into one clear
line. The ``midpo`` dispatcher over the stages lives in ``stages/cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from pipeline import console as console_mod
from pipeline import tracking
from pipeline.config import STAGES, ConfigError, RunConfig, clip, load_config
from pipeline.console import PROGRESS_LINE_EVERY_S, LineProgress, console
from pipeline.runstore import RunStore, StageError

DEFAULT_CONFIG = "configs/demo.yaml"

StageFn = Callable[[RunConfig, RunStore, bool], None]


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data import DataError
    from pipeline.models import ModelError
    from pipeline.tracking import TrackingError

    return (ConfigError, StageError, ModelError, DataError, TrackingError)


# Errors of the disk a stage writes to, as one line: what happened, where, what to do.
_ELSEWHERE = "or set root=/cache_dir= to another folder, then rerun the same command"
_DISK_ERRORS = {
    errno.ENOSPC: f"no space left on device writing {{path}}: free space there {_ELSEWHERE}",
    errno.EDQUOT: f"disk quota exceeded writing {{path}}: free space there {_ELSEWHERE}",
    errno.EROFS: f"read-only file system: cannot write {{path}}: remount it {_ELSEWHERE}",
    errno.EACCES: f"permission denied: {{path}}: check its owner and mode {_ELSEWHERE}",
    errno.EPERM: f"operation not permitted: {{path}}: check its owner and mode {_ELSEWHERE}",
}
_NEEDS_A_PATH = (errno.EACCES, errno.EPERM)  # without a file name these are not disk errors
# safetensors (SafetensorError) and tokenizers (a plain Exception) report Rust's io::Error as
# "... No space left on device (os error 28)": no errno attribute, no file name.
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def _disk_errno(e: BaseException) -> int | None:
    """The errno of an output disk refusing a write (full, over quota, read-only, no
    permission), or None for any other error (which keeps its traceback)."""
    if isinstance(e, OSError):
        if e.errno not in _DISK_ERRORS:
            return None
        return None if e.errno in _NEEDS_A_PATH and not e.filename else e.errno
    match = _RUST_IO_ERROR.search(str(e))
    if match and int(match.group(1)) in _DISK_ERRORS:
        code = int(match.group(1))
        return None if code in _NEEDS_A_PATH else code
    return None


def _path_in_traceback(tb: TracebackType | None, roots: list[Path]) -> str | None:
    """The file being written when ``tb`` was raised: a path-like local variable under one of
    the stage's output roots, from the innermost frame that has one (the longest there: a
    file inside a folder). Libraries that lose the file name (safetensors, tokenizers, pyarrow)
    still hold it in their arguments."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found = []
        for value in frame.f_locals.values():
            if not isinstance(value, str | Path) or not 0 < len(str(value)) < 4096:
                continue
            path = Path(value).absolute()
            if any(path == root or root in path.parents for root in roots):
                found.append(str(path))
        if found:
            return max(found, key=len)
    return None


def _disk_error_line(stage: str, e: BaseException, code: int, cfg: RunConfig | None) -> str:
    roots = [Path(cfg.root).absolute(), Path(cfg.cache_dir).absolute()] if cfg else []
    path = getattr(e, "filename", None) or _path_in_traceback(e.__traceback__, roots)
    if path is None:
        path = "under " + " or ".join(str(r) for r in roots) if roots else "(unknown file)"
    return f"midpo {stage}: error: " + _DISK_ERRORS[code].format(path=path)


# The config sections a stage's --help lists (a stage's own section by default).
HELP_SECTIONS = {"prepare": ("model", "data"), "evaluate": ("evaluate", "generate")}


def config_help(sections: tuple[str, ...]) -> str:
    """``sections`` of the run config, one line per key: its default and description."""
    from pydantic import BaseModel

    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key, kind = prefix + name, field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, key + ".")
                continue
            default = (
                "required"
                if field.is_required()
                else f"default {field.get_default(call_default_factory=True)!r}"
            )
            text = f"  {key} ({default})"
            lines.append(f"{text}: {field.description}" if field.description else text)

    for section in sections:
        field = RunConfig.model_fields.get(section)
        if field is not None and isinstance(field.annotation, type):
            lines.append(f"{section}:")
            walk(field.annotation, section + ".")
    return "\n".join(lines)


def stage_parser(prog: str, stage: str | None = None) -> argparse.ArgumentParser:
    """The command line of a stage or chain; with ``stage``, --help lists its config keys."""
    keys = config_help(HELP_SECTIONS.get(stage, (stage,))) if stage else ""
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (set as key=value):\n{keys}" if keys else None,
    )
    p.add_argument(
        "--config",
        default=os.environ.get("MIDPO_CONFIG", DEFAULT_CONFIG),
        help="run YAML (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rerun even if outputs are up to date")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"all output on the terminal, no stage log (or {console_mod.VERBOSE_ENV}=1)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted config overrides, e.g. train.objective=simpo train.beta=2.0",
    )
    return p


def early_exit(stage: str, e: SystemExit | KeyboardInterrupt) -> StageError:
    """The error for code that ended ``stage`` from inside (``sys.exit(0)``, SystemExit,
    KeyboardInterrupt): never a success. Names the line that raised it (e.g. a reward
    function's)."""
    tb, where = e.__traceback__, "unknown code"
    while tb is not None:
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    what = (
        "interrupted (KeyboardInterrupt)"
        if isinstance(e, KeyboardInterrupt)
        else f"exit({e.code!r}) was called"
    )
    return StageError(f"stage {stage!r} did not finish: {what} in {where}")


def ended_early(e: SystemExit | KeyboardInterrupt) -> bool:
    """An exit that would otherwise look like success (or a bare interrupt); a nonzero
    SystemExit already failed the process with its code (train's launcher uses it)."""
    return isinstance(e, KeyboardInterrupt) or not e.code


def progress_as_lines() -> None:
    """Progress bars as a line every PROGRESS_LINE_EVERY_S seconds when the console is no
    terminal; stderr that is no terminal gets lines instead of carriage returns."""
    if not console.isatty():  # (not stderr: in a rank of a quiet stage, stderr is the log)
        os.environ.setdefault("TQDM_MININTERVAL", str(PROGRESS_LINE_EVERY_S))
    if not sys.stderr.isatty() and not isinstance(sys.stderr, LineProgress):
        sys.stderr = LineProgress(sys.stderr)


def command_line() -> None:
    """A command-line entry point runs (``python -m stages.<x>``, ``midpo``): progress as
    lines where there is no terminal, and each stage's third-party output in its log."""
    progress_as_lines()
    console_mod.from_command_line()


def _started_as_stage_module() -> bool:
    """``python -m stages.<x>`` (frontier's main passes on the arguments it did not use, so
    ``argv`` alone does not tell)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and str(spec.name).startswith("stages.")


# However large the bad input (a 50 MB row quoted back, a huge config value), an error stays
# readable: every message a stage prints is cut to this many characters.
MAX_ERROR_CHARS = 4000


def stage_main(stage: str, run: StageFn, argv: list[str] | None = None) -> None:
    parser = stage_parser(f"python -m stages.{stage}", stage)
    parser.description = (sys.modules[run.__module__].__doc__ or "").strip().split("\n\n")[0]
    args = parser.parse_args(argv)
    errors = _known_errors()
    cfg = None
    tracking.mark_started(stage)
    if args.verbose:
        os.environ[console_mod.VERBOSE_ENV] = "1"
    # A command line, not a call from Python (e.g. a test's): chains such as frontier and study
    # pass on the arguments they did not use, so ``argv`` alone does not tell.
    from_command_line = argv is None or _started_as_stage_module()
    if from_command_line:
        command_line()
    try:
        cfg = load_config(args.config, args.overrides)
        # A chain (pipeline, iterate, frontier) logs each of its stages in run_stages.
        output = (
            console_mod.stage_output(cfg.run_dir, stage)
            if stage in STAGES
            else contextlib.nullcontext()
        )
        try:
            with output:
                run(cfg, RunStore(cfg), args.force)
        except (SystemExit, KeyboardInterrupt) as e:
            if not ended_early(e):
                raise
            raise early_exit(stage, e) from None
    except errors as e:
        message = clip(_with_command(str(e), args), MAX_ERROR_CHARS)
        print(f"midpo {stage}: error: {message}", file=console)
        sys.exit(2)
    except Exception as e:
        code = _disk_errno(e)
        if code is None:
            raise
        # What the stage had written is gone already: RunStore removes its .<stage>.partial
        # folder and models build in a temp folder removed on failure.
        print(_disk_error_line(stage, e, code, cfg), file=console)
        sys.exit(2)
    if from_command_line:  # the process ends here
        exit_cleanly(0)


def _with_command(message: str, args: argparse.Namespace) -> str:
    """Hints to "run `make <stage>`" name the command that works for this run instead: the
    same config file and overrides."""
    rest = " ".join(shlex.quote(o) for o in args.overrides)
    command = f"midpo {{}}{{}} --config {shlex.quote(args.config)}" + (f" {rest}" if rest else "")
    return re.sub(
        r"`make (\w+)`( again)?( with FORCE=1)?",
        lambda m: f"`{command.format(m[1], ' --force' if m[3] else '')}`{m[2] or ''}",
        message,
    )


def exit_cleanly(code: int = 0) -> NoReturn:
    """End a finished stage or rank process without interpreter teardown (all is written).

    Native threads that vLLM engines (two one after another in one process) and gloo leave
    behind abort in their destructors at teardown ("terminate called without an active
    exception", exit 134/250), which would turn a finished job into a failed one.
    """
    generation = sys.modules.get("pipeline.generation")
    if generation is not None:
        generation.release_vllm_engine()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
