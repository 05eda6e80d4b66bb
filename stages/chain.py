"""The stage list and the chain runner: stages run one after another in this process, each
skipped when up to date (the pipeline, every iterate round, every frontier or study point)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from types import ModuleType

from pipeline import tracking
from pipeline.cli import early_exit, ended_early
from pipeline.config import STAGES, RunConfig
from pipeline.console import console, stage_output
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


# Stages that may start the process's vLLM engine (sampling, vLLM log-probs, the judge); before
# any other the cached engine is shut down, so training never shares a device with it.
VLLM_STAGES = frozenset({"generate", "score", "evaluate"})


def run_stages(cfg: RunConfig, names: Sequence[str], force: bool = False) -> None:
    """Run ``names`` in order for ``cfg``'s run, with a header and the time of each; from a
    command line, each stage's third-party output goes to its own log (pipeline.console)."""
    from pipeline.generation import release_vllm_engine

    for name in names:
        started = time.time()
        print(f"\n=== {cfg.name}: {name} ===", file=console)
        if name not in VLLM_STAGES:
            release_vllm_engine()
        tracking.mark_started(name)
        try:
            with stage_output(cfg.run_dir, name):
                stage_module(name).run(cfg, RunStore(cfg), force)
        except BaseException as e:
            tracking.fail_parent(cfg)  # the parent run spans the chain: it failed
            if isinstance(e, SystemExit | KeyboardInterrupt) and ended_early(e):
                raise early_exit(name, e) from None  # user code must not end a chain as success
            raise
        print(f"=== {cfg.name}: {name}: {time.time() - started:.0f} s ===", file=console)
