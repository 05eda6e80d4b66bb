"""The command line as users meet it: `midpo` help and suggestions, each stage's --help listing
its config keys, hints naming the command that works, and user code that tries to end a stage
as a success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import stage_main
from pipeline.config import STAGES, RunConfig
from stages import cli
from stages import pipeline as pipeline_chain
from stages import score as score_stage
from tests.conftest import REPO, TINY, ConfigFactory, command_line
from tests.test_score import generated, scored_run  # noqa: F401  (the generated fixture)


def midpo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_lists_every_command_with_a_line(args: list[str]) -> None:
    done = midpo(*args)
    assert done.returncode == (0 if args else 2)
    text = done.stdout + done.stderr
    for command in (*STAGES, "pipeline", "iterate", "frontier", "study", "show-config"):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(command + " ")), "")
        assert len(line.split()) > 2, (command, text)  # the name and a description


def test_a_typo_suggests_the_nearest_command() -> None:
    done = midpo("trian")
    assert done.returncode == 2
    assert "unknown command 'trian'; did you mean train?" in done.stderr
    assert "prepare" in done.stderr  # the list follows


def test_each_stage_help_lists_its_config_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "generate: sample generate.n responses" in out  # the stage's own description
    assert "generate.n (default 4): samples per prompt" in out
    assert "generate.max_tokens (default " in out
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "model.max_length (default 256): prompt + response tokens" in out
    assert "data.task (default " in out
    for stage in ("train", "score", "evaluate", "promote"):
        with pytest.raises(SystemExit):
            cli.main([stage, "--help"])
        out = capsys.readouterr().out
        keys = [line for line in out.splitlines() if "(default " in line]
        assert keys, stage
        for line in keys:  # every key says what it is, and its real default
            assert "): " in line and "PydanticUndefined" not in line, line
        if stage == "train":  # a default factory's value
            assert "train.objective_args (default {}): " in out


def test_missing_upstream_names_the_command_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(TINY), f"root={tmp_path / 'runs'}", "train.beta=0.2"]
    with pytest.raises(SystemExit) as exit_:
        stage_main("score", score_stage.run, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("midpo score: error: stage 'prepare' has no complete output"), err
    assert f"run `midpo prepare --config {TINY} root={tmp_path / 'runs'} train.beta=0.2` first" in (
        err
    )
    assert "make prepare" not in err


EXITING_REWARD = "import sys\ndef reward(prompts, responses):\n    sys.exit(0)\n"


@pytest.mark.parametrize("where", ["stage", "chain"])
def test_user_code_cannot_end_a_stage_as_a_success(
    where: str,
    tiny_config: ConfigFactory,
    generated: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A reward function calling sys.exit(0) fails the stage (and the chain) with one line
    naming the stage and the user code, exit 2."""
    (tmp_path / f"exiting_{where}.py").write_text(EXITING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    function = f"score.scorer.function=exiting_{where}:reward"
    cfg: RunConfig = scored_run(tiny_config, generated, function)
    argv = command_line(cfg, f"allowed_roots=[{tmp_path}]", function)
    name, run = ("score", score_stage.run) if where == "stage" else ("pipeline", pipeline_chain.run)
    with pytest.raises(SystemExit) as exit_:
        stage_main(name, run, argv)
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"midpo {name}: error: stage 'score' did not finish: exit(0)")
    assert f"{tmp_path / f'exiting_{where}.py'}:3 (reward)" in lines[0]
    assert not (cfg.run_dir / "score" / "pairs.parquet").exists()


def test_progress_on_a_non_terminal_is_lines(tmp_path: Path, cache_dir: Path) -> None:
    """stderr to a file or pipe (a log, a SLURM .out): progress as separate lines, no carriage
    returns, also while the stage's own output goes to its log (tests/test_quiet.py)."""
    overrides = [f"root={tmp_path / 'runs'}", f"cache_dir={cache_dir}"]
    for stage in ("prepare", "generate"):
        done = subprocess.run(
            [sys.executable, "-m", "stages." + stage, "--config", str(TINY), *overrides],
            cwd=REPO,
            capture_output=True,  # bytes: text mode would turn "\r" into "\n"
            timeout=300,
        )
        err = done.stderr.decode()
        assert done.returncode == 0, err[-3000:]
    assert "\r" not in err
    bars = [ln for ln in err.split("\n") if ln.startswith("generate (transformers):")]
    assert bars and "100%" in bars[-1], err[-3000:]
    assert max(map(len, err.split("\n"))) < 500
    log = (tmp_path / "runs" / "tiny" / "generate" / "stage.log").read_text()
    assert "generate (transformers):" not in log  # our bar is on the terminal only


def test_make_help_lists_every_target() -> None:
    import re

    makefile = (REPO / "Makefile").read_text()
    targets = {
        t
        for line in re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M)
        for t in line.replace("\\\n", " ").split()
    }
    done = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True)
    listed = set(re.findall(r"\b[a-z][a-z-]+\b", done.stdout))
    stages_line = next(ln for ln in done.stdout.splitlines() if "<stage>" in ln)
    assert targets - {"slurm-down"} - set(STAGES) <= listed, targets - listed
    assert "slurm-down" in done.stdout
    assert all(stage in stages_line for stage in STAGES)


def test_every_stage_error_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    """A known error quoting a huge input is cut to MAX_ERROR_CHARS (#15 item 9)."""
    from pipeline.cli import MAX_ERROR_CHARS
    from pipeline.runstore import RunStore, StageError

    def run(cfg: RunConfig, store: RunStore, force: bool) -> None:
        raise StageError("bad row: " + "x" * 1_000_000)

    with pytest.raises(SystemExit) as e:
        stage_main("score", run, ["--config", str(TINY)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err) < MAX_ERROR_CHARS + 200 and "more characters" in err
