"""The stage list and the chain runner: stages run one after another in this process, each
skipped when up to date (the pipeline, every iterate round, every frontier or study point)."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from pipeline.config import STAGES, RunConfig
from pipeline.runstore import RunStore

# One line each for `midpo --help`.
DESCRIPTIONS = {
    "prepare": "model folder, prompts and human pairs into the run store",
    "generate": "sample responses per training prompt (vLLM or transformers)",
    "score": "reward responses, build preference pairs, reference log-probs",
    "train": "MI-DPO with any prior on DeepSpeed, one process per device",
    "evaluate": "policy against a baseline on held-out prompts and human pairs",
    "promote": "register the policy and move the champion alias behind a gate",
}


def stage_module(name: str) -> ModuleType:
    """A stage's module; each has ``run(cfg, store, force)`` and ``main(argv)``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"stages.{name}")


def run_stages(cfg: RunConfig, names: Sequence[str], force: bool = False) -> None:
    """Run ``names`` in order for ``cfg``'s run, with a header and the time of each."""
    for name in names:
        started = time.time()
        print(f"\n=== {cfg.name}: {name} ===", file=sys.stderr)
        stage_module(name).run(cfg, RunStore(cfg), force)
        print(f"=== {cfg.name}: {name}: {time.time() - started:.0f} s ===", file=sys.stderr)
