"""Running a stage from a command line: ``python -m stages.<name> [--config FILE] [--force]
[key=value ...]``. Every stage module exposes ``run(cfg, store, force) -> None``; ``stage_main``
parses the command line, loads and validates the config, and turns known errors into one clear
line. The ``midpo`` dispatcher over the stages lives in ``stages/cli.py``.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from pipeline.config import ConfigError, RunConfig, load_config
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


def stage_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument(
        "--config",
        default=os.environ.get("MIDPO_CONFIG", DEFAULT_CONFIG),
        help="run YAML (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rerun even if outputs are up to date")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted config overrides, e.g. train.objective=simpo train.beta=2.0",
    )
    return p


def stage_main(stage: str, run: StageFn, argv: list[str] | None = None) -> None:
    args = stage_parser(f"python -m stages.{stage}").parse_args(argv)
    errors = _known_errors()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, RunStore(cfg), args.force)
    except errors as e:
        print(f"midpo {stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        code = _disk_errno(e)
        if code is None:
            raise
        # What the stage had written is gone already: RunStore removes its .<stage>.partial
        # folder and models build in a temp folder removed on failure.
        print(_disk_error_line(stage, e, code, cfg), file=sys.stderr)
        sys.exit(2)
    if argv is None:  # a command-line run (not a call from Python): the process ends here
        exit_cleanly(0)


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
