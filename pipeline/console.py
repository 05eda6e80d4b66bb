"""The terminal shows our lines; everything else a stage prints goes to its log.

While a stage started from a command line works (``python -m stages.<x>``, ``midpo <x>``, each
stage of a chain), file descriptors 1 and 2 point at ``runs/<run>/<stage>.log``: Python
warnings and logging, C/C++ output (gloo, DeepSpeed ops) and child processes (torchrun ranks,
vLLM workers, which inherit those descriptors) all land there. Our own lines and progress bars
go to ``console``, which writes to the terminal saved before the redirection. A stage that
succeeds moves its log into its output folder (``runs/<run>/<stage>/stage.log``); one that
fails leaves it where it was and prints its path and last lines on the terminal. (A vLLM engine
that a chain keeps for its next stage keeps writing its worker processes' lines to the log of
the stage that started it.)

``-v``/``--verbose`` on a stage's command line or ``MIDPO_VERBOSE=1``: no redirection and no
log file, everything on the terminal. Calls from Python (tests, notebooks) are never redirected.
This module imports nothing of the project, so every module may print through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "MIDPO_VERBOSE"
LOG_NAME = "stage.log"  # in the stage's output folder, once the stage has succeeded
TAIL_LINES = 30  # of a failed stage's log, printed on the terminal
TAIL_LINE_CHARS = 500

# How child processes (train's ranks, which draw the progress bar) reach the terminal: this
# variable names /proc/<pid>/fd/<n>, the top process's saved terminal descriptor. torchrun
# closes inherited descriptors above 2, but the environment reaches every rank; opening the
# path gives the child its own descriptor on the same terminal, pipe or file. (A FIFO read by a
# thread of the top process would also work, but the thread must run and be drained before
# each line of ours; this needs nothing running.) Where the path cannot be opened (a socket),
# the child's console falls back to its stderr: the stage log.
CONSOLE_ENV = "MIDPO_CONSOLE"

_command_line = False  # a command-line entry point runs: its stages may be quiet
_terminal: Any = None  # this process's terminal while fds 1 and 2 point at a stage log
_opened: dict[str, Any] = {}  # CONSOLE_ENV paths a child process has opened


class LineProgress:
    """A text stream that turns carriage-return redraws into lines (for a stream that is no
    terminal: a file, a pipe, a SLURM .out)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text.startswith("\r") and self.at_line_start:
            text = text[1:]
        text = text.replace("\r", "\n")
        if text:
            self.at_line_start = text.endswith("\n")
        return int(self.stream.write(text))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding ...
        return getattr(self.stream, name)


class Console:
    """Our lines and progress bars: ``print(..., file=console)``, ``tqdm(..., file=console)``.
    The terminal while a stage's output goes to its log, ``sys.stderr`` otherwise (what a test
    captures); looked up at every write, so a bar made before a stage still finds it."""

    def target(self) -> TextIO:
        if _terminal is not None:
            return _terminal
        path = os.environ.get(CONSOLE_ENV)
        if path:
            if path not in _opened:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                except OSError:
                    _opened[path] = None
                else:
                    _opened[path] = _text_stream(fd, closefd=True)
            if _opened[path] is not None:
                return _opened[path]
        return sys.stderr

    def write(self, text: str) -> int:
        return self.target().write(text)

    def flush(self) -> None:
        self.target().flush()

    def isatty(self) -> bool:
        return self.target().isatty()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding ... (tqdm asks)
        return getattr(self.target(), name)


console = Console()

# When the console is no terminal (a file, a pipe, a SLURM .out), a bar redraws at most this
# often, each redraw a line (LineProgress): not thousands of carriage returns in one line.
PROGRESS_LINE_EVERY_S = 30


def progress(**kwargs: Any) -> Any:
    """One of our progress bars (tqdm's arguments) on the console. tqdm reads TQDM_MININTERVAL
    when it is imported, so a process that learns it has no terminal later passes it here;
    child processes (ranks) get it from the environment (pipeline.cli.progress_as_lines)."""
    from tqdm import tqdm

    if not console.isatty():
        kwargs.setdefault("mininterval", PROGRESS_LINE_EVERY_S)
    return tqdm(file=console, **kwargs)


def _text_stream(fd: int, closefd: bool) -> Any:
    stream = open(  # noqa: SIM115  (lives as long as the redirection or the process)
        fd,
        "w",
        buffering=1,
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
        closefd=closefd,
    )
    return stream if stream.isatty() else LineProgress(stream)


def from_command_line() -> None:
    """Called by the command-line entry points: their stages' output goes to stage logs,
    unless MIDPO_VERBOSE is set (-v sets it)."""
    global _command_line
    _command_line = True


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _std_fds_are_files() -> bool:
    """fds 1 and 2 are open and Python's streams write to them (not a capture such as
    pytest's, which would miss the redirection)."""
    try:
        os.fstat(1), os.fstat(2)
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is a ValueError
        return False


def _quiet() -> bool:
    return (
        _command_line
        and not verbose()
        and _terminal is None  # not already inside a stage of this process
        and CONSOLE_ENV not in os.environ  # nor a child of a quiet stage (a rank)
        and _std_fds_are_files()
    )


def _folder_id(folder: Path) -> tuple[int, int] | None:
    try:
        st = folder.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@contextlib.contextmanager
def stage_output(run_dir: Path, stage: str) -> Iterator[None]:
    """The one place a stage's output is redirected (a single stage's command line and every
    stage of a chain): fds 1 and 2 to ``run_dir/<stage>.log`` while the stage runs, when quiet
    applies (see the module docstring); otherwise nothing changes."""
    global _terminal
    log, folder = run_dir / f"{stage}.log", run_dir / stage
    fd = _open_log(log) if _quiet() else None
    if fd is None:
        yield
        return
    before = _folder_id(folder)  # the store swaps in a new folder when the stage writes
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    if stat.S_ISREG(os.fstat(saved_err).st_mode):
        # A terminal that is a file (`> out.txt`, a SLURM .out): children write through their
        # own descriptor (CONSOLE_ENV), so every writer appends, or one overwrites the other.
        flags = fcntl.fcntl(saved_err, fcntl.F_GETFL)
        fcntl.fcntl(saved_err, fcntl.F_SETFL, flags | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _terminal = _text_stream(saved_err, closefd=False)
    os.environ[CONSOLE_ENV] = f"/proc/{os.getpid()}/fd/{saved_err}"
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        for stream in (sys.stdout, sys.stderr, _terminal):
            with contextlib.suppress(OSError, ValueError):  # (a full disk under the log)
                stream.flush()
        _terminal = None
        os.environ.pop(CONSOLE_ENV, None)
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _file_log(stage, log, folder, before, succeeded)


def _open_log(log: Path) -> int | None:
    """The log's descriptor; None where it cannot be written (a full or read-only disk: the
    stage then runs with its output on the terminal, and meets that disk itself)."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    except OSError:
        return None


def _file_log(
    stage: str, log: Path, folder: Path, before: tuple[int, int] | None, succeeded: bool
) -> None:
    """After the stage: into its new output folder, or kept and shown (failed), or dropped."""
    try:
        if not succeeded and log.stat().st_size == 0:
            log.unlink()  # nothing in it: the error alone says what went wrong
        elif not succeeded:
            print(failure_text(stage, log), file=console, flush=True)
        elif _folder_id(folder) not in (None, before):
            os.replace(log, folder / LOG_NAME)
        else:  # skipped (up to date): the output folder keeps the log of the run that made it
            log.unlink()
    except OSError as e:
        print(f"[{stage}] its log {log}: {e}", file=console, flush=True)


def failure_text(stage: str, log: Path) -> str:
    """A failed stage's log: its path and last lines, as a terminal would show them (a
    progress bar's last redraw only)."""
    try:
        text = log.read_bytes()[-200_000:].decode("utf-8", "replace")
    except OSError as e:
        return f"[{stage}] its log {log} cannot be read: {e}"
    lines = [ln.rsplit("\r", 1)[-1][:TAIL_LINE_CHARS] for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip()][-TAIL_LINES:]
    tail = "\n".join("  | " + ln for ln in lines)
    return f"[{stage}] the stage's log is {log}; its last {len(lines)} lines:\n{tail}"
