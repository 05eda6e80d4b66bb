"""The tiny chain reproduces recorded outputs: the same pairs (token ids, rewards, reference
log-probs) and the same training losses to 1e-6 (fp32, one process).

``tests/data/golden/tiny_fp32.json`` was recorded from commit 8b5b7f6 (before the restructure into
``pipeline/training/`` and library-backed stages) on this project's 2-core AMD EPYC machine, with
the command this test runs. A change that moves code must leave these numbers alone; a change
that means to alter them (a new sampler, another pairing rule) records them again, and says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import read_rows
from tests.conftest import REPO, TINY

GOLDEN = REPO / "tests" / "data" / "golden" / "tiny_fp32.json"
PAIR_KEYS = ("prompt_id", "prompt_token_ids", "chosen_token_ids", "rejected_token_ids", "source")
FLOAT_KEYS = ("chosen_reward", "rejected_reward")
TOKEN_FLOAT_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
STEP_KEYS = ("loss", "rewards/margins", "grad_norm")


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.slow
def test_tiny_chain_reproduces_recorded_pairs_and_losses(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    args = ["--config", str(TINY), f"root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    args.append("train.nproc=1")
    for stage in ("prepare", "generate", "score", "train"):
        done = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", *args],
            cwd=REPO,
            env={**os.environ},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{stage} failed:\n{done.stderr[-3000:]}"
    run = tmp_path / "runs" / "tiny"
    pairs = read_rows(run / "score" / "pairs.parquet")
    assert len(pairs) == len(golden["pairs"])
    for i, (got, want) in enumerate(zip(pairs, golden["pairs"], strict=True)):
        for key in PAIR_KEYS:
            value = list(got[key]) if isinstance(got[key], list | tuple) else got[key]
            assert value == want[key], f"pair {i} {key}"
        for key in FLOAT_KEYS:
            assert close(float(got[key]), float(want[key])), f"pair {i} {key}"
        for key in TOKEN_FLOAT_KEYS:
            assert len(got[key]) == len(want[key]), f"pair {i} {key}"
            assert all(close(a, b) for a, b in zip(got[key], want[key], strict=True)), (
                f"pair {i} {key}"
            )
    steps = [
        json.loads(line)
        for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
        if line
    ]
    assert [s["step"] for s in steps] == [s["step"] for s in golden["steps"]]
    for got, want in zip(steps, golden["steps"], strict=True):
        for key in STEP_KEYS:
            assert close(got[key], want[key]), (
                f"step {want['step']} {key}: {got[key]} vs {want[key]}"
            )
