"""The quiet terminal: from a command line, a stage's third-party output (Python warnings and
prints, C-level writes, child processes) goes to its log in the run store, the terminal shows
our lines; -v / MIDPO_VERBOSE=1 shows everything; a failure shows the error and the log's tail.

The third-party output comes from user code, a reward function, run by the real score stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from tests.conftest import REPO, ConfigFactory, command_line
from tests.test_score import generated, scored_run  # noqa: F401  (the generated fixture)

# Every kind of output a library can make: Python's stdout, a warning, a C-level write to fd 2,
# a child process's stderr. NOISY_EXIT ends the stage from inside (a failure, exit(0)).
NOISY_REWARD = """\
import os, subprocess, sys, warnings

def reward(prompts, responses):
    print("NOISE python stdout")
    warnings.warn("NOISE python warning")
    os.write(2, b"NOISE C-level stderr\\n")
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'NOISE child process\\\\n')"])
    if os.environ.get("NOISY_EXIT"):
        sys.exit(0)
    return [float(len(r)) for r in responses]
"""
NOISE = ("NOISE python stdout", "NOISE python warning", "NOISE C-level stderr", "NOISE child")


@pytest.fixture
def noisy_run(
    tiny_config: ConfigFactory,
    generated: Path,  # noqa: F811
    tmp_path: Path,
) -> tuple[RunConfig, list[str]]:
    """A tiny run with prepare and generate done, and the command-line overrides that score
    it with the noisy reward."""
    (tmp_path / "noisy.py").write_text(NOISY_REWARD)
    function = "score.scorer.function=noisy:reward"
    cfg = scored_run(tiny_config, generated, function)
    return cfg, command_line(cfg, f"allowed_roots=[{tmp_path}]", function)


def command(
    args: list[str], tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``args`` as a command line (stderr a pipe, as under `make ... | tee`); (the process, its
    stdout + stderr)."""
    inherited = {k: v for k, v in os.environ.items() if k != "MIDPO_VERBOSE"}
    full_env = {**inherited, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", **env}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
    )
    return done, done.stdout + done.stderr


def test_third_party_output_goes_to_the_stage_log(
    noisy_run: tuple[RunConfig, list[str]], tmp_path: Path
) -> None:
    cfg, overrides = noisy_run
    done, terminal = command(["-m", "stages.score", *overrides], tmp_path)
    assert done.returncode == 0, terminal[-3000:]
    assert "[score] " in done.stderr and "pairs" in done.stderr  # our lines
    assert "score: 100%" in done.stderr  # our progress bar
    assert "NOISE" not in terminal, terminal[-3000:]
    log = (cfg.run_dir / "score" / "stage.log").read_text()
    for line in NOISE:
        assert line in log, (line, log[-3000:])
    assert "[score] " not in log
    assert not (cfg.run_dir / "score.log").exists()  # moved into the output folder


def test_a_failure_shows_the_error_and_the_log_tail(
    noisy_run: tuple[RunConfig, list[str]], tmp_path: Path
) -> None:
    """Through `midpo pipeline` (the chain runner): skipped stages leave no log; the failing
    stage's log stays at the printed path, its last lines on the terminal, the error last."""
    cfg, overrides = noisy_run
    done, terminal = command(["-m", "stages.cli", "pipeline", *overrides], tmp_path, NOISY_EXIT="1")
    assert done.returncode == 2, terminal[-3000:]
    assert "[prepare] up to date" in done.stderr and "=== tiny: score ===" in done.stderr
    log = cfg.run_dir / "score.log"
    assert f"[score] the stage's log is {log}; its last " in done.stderr, done.stderr
    tail = done.stderr.split(str(log), 1)[1]
    for line in NOISE:
        assert line in tail, (line, done.stderr)
    assert "NOISE" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("midpo pipeline: error: stage 'score' did not finish: exit(0)"), last
    assert log.is_file() and "NOISE child process" in log.read_text()
    for stage in ("prepare", "generate"):  # skipped: no log made, none added to their output
        assert not (cfg.run_dir / f"{stage}.log").exists()
        assert not (cfg.run_dir / stage / "stage.log").exists()


@pytest.mark.parametrize("how", ["MIDPO_VERBOSE=1", "-v"])
def test_verbose_shows_everything(
    how: str, noisy_run: tuple[RunConfig, list[str]], tmp_path: Path
) -> None:
    cfg, overrides = noisy_run
    env = {"NOISY_EXIT": "1"}
    if how == "-v":
        args = ["-m", "stages.cli", "-v", "score", *overrides]
    else:
        args, env["MIDPO_VERBOSE"] = ["-m", "stages.score", *overrides], "1"
    done, terminal = command(args, tmp_path, **env)
    assert done.returncode == 2, terminal[-3000:]
    for line in NOISE:
        assert line in terminal, (line, terminal[-3000:])
    assert "midpo score: error: stage 'score' did not finish" in done.stderr
    assert not (cfg.run_dir / "score.log").exists()  # no log: it is all on the terminal
