"""Fault injection: kill -9 a stage at a random point, rerun the same command, and check that the
result equals an uninterrupted run bit for bit and that no partial output was ever complete.

Each case runs the stage once uninterrupted (to learn how long it takes and what it produces),
then in a second run root kills it at a seeded random moment inside that duration, checks that
nothing looks complete, reruns it to completion and compares every output file's sha256.
Training (losses within 1e-5 after a kill) and promotion (no lost or duplicated registry version)
have their own kill tests next to their stages.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runstore import RunStore
from tests.conftest import REPO, TINY

# Upstream stages each case needs, in order.
CHAINS = {
    "prepare": [],
    "generate": ["prepare"],
    "score": ["prepare", "generate"],
}


def _cmd(stage: str, root: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"stages.{stage}",
        "--config",
        str(TINY),
        f"root={root}",
        f"cache_dir={cache}",
    ]


def _run(stage: str, root: Path, cache: Path) -> float:
    t = time.time()
    subprocess.run(_cmd(stage, root, cache), cwd=REPO, check=True, capture_output=True)
    return time.time() - t


def _outputs(root: Path, stage: str) -> dict[str, str]:
    manifest = json.loads((root / "tiny" / stage / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return {k: v["sha256"] for k, v in manifest["outputs"].items()}


@pytest.mark.parametrize("stage", list(CHAINS))
def test_kill_minus_9_then_rerun_equals_uninterrupted(
    stage: str, tmp_path: Path, cache_dir: Path
) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for upstream in CHAINS[stage]:
        _run(upstream, clean, cache_dir)
        _run(upstream, killed, cache_dir)
    duration = _run(stage, clean, cache_dir)

    rng = random.Random(f"{stage}-kill")
    delay = rng.uniform(0.3, 0.9) * duration
    proc = subprocess.Popen(
        _cmd(stage, killed, cache_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(delay)
    finished_first = proc.poll() is not None  # (rare: the killed run was faster)
    if not finished_first:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and any worker processes it spawned
    proc.wait()

    cfg = load_config(TINY, [f"root={killed}", f"cache_dir={cache_dir}"])
    if not finished_first and RunStore(cfg).complete_manifest(stage) is not None:
        # The kill landed after the stage finished (during process teardown): then what is
        # there must already be the whole, correct output.
        assert _outputs(killed, stage) == _outputs(clean, stage)
    # Otherwise whatever the kill left behind is not complete (complete_manifest is None), and
    # the rerun below must produce the uninterrupted run's output.
    _run(stage, killed, cache_dir)
    assert _outputs(killed, stage) == _outputs(clean, stage)
    leftovers = [p.name for p in (killed / "tiny").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []
