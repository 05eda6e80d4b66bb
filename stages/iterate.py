"""iterate: rounds of generate -> score -> train, each round on the previous round's policy.

    make iterate ROUNDS=3 [CONFIG=...] [ARGS=...]     (python -m stages.iterate; ROUNDS from env)

Round k is the run ``<name>-round<k>`` beside the main run (same root, cache and MLflow store).
Round 1 samples from the base model; round k > 1 samples from, scores against and starts from
round k-1's trained policy: its reference (and the prior of any objective that uses the
reference) is the previous policy, as in DICE. Every stage of a round is skipped when up to
date, so a killed ``make iterate`` resumes where it stopped (a killed train resumes from its
checkpoint). In MLflow the main run's pipeline run gets one child run per round; the stage runs
of a round nest under it. The last round's policy is ``runs/<name>-round<n>/train/model``
(evaluate it with ``make evaluate ARGS="name=<name>-round<n>"``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.config import ConfigError, RunConfig, derive_config
from pipeline.console import console
from pipeline.runstore import RunStore
from stages.chain import run_stages

ROUND_STAGES = ("prepare", "generate", "score", "train")


def rounds_from_env() -> int:
    raw = os.environ.get("ROUNDS", "2").strip() or "2"
    try:
        rounds = int(raw)
    except ValueError:
        raise ConfigError(f"ROUNDS={raw!r} is not an integer") from None
    if rounds < 1:
        raise ConfigError(f"ROUNDS={rounds} must be >= 1")
    return rounds


def round_config(cfg: RunConfig, k: int, previous_policy: Path | None) -> RunConfig:
    """Round k's run: its own name; from round 2 on, the previous policy generates, is the
    reference, and is where training starts. MLflow stays in the main run's store."""
    changes = {}
    if previous_policy is not None:
        policy = str(previous_policy.resolve())
        changes = {
            "generate.model": policy,
            "score.reference_model": policy,
            "train.init_model": None,  # the model that generated: the previous policy
            "train.reference_model": None,  # the score stage's reference: the same
        }
    return derive_config(cfg, f"{cfg.name}-round{k}", changes)


def link_round_run(cfg: RunConfig, round_cfg: RunConfig, k: int) -> str:
    """Round k's MLflow run under the main pipeline run; the round's stages nest under it."""
    return tracking.child_run_id(
        cfg, round_cfg, f"round-{k}", {"midpo.role": "round", "midpo.round": str(k)}
    )


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    rounds = rounds_from_env()
    previous: Path | None = None
    for k in range(1, rounds + 1):
        round_cfg = round_config(cfg, k, previous)
        round_store = RunStore(round_cfg)
        run_id = link_round_run(cfg, round_cfg, k)
        print(f"\n=== round {k}/{rounds}: {round_cfg.run_dir} ===", file=console)
        run_stages(round_cfg, ROUND_STAGES, force)
        client = tracking.setup(cfg).MlflowClient()
        client.log_param(run_id, "sampled_from", str(previous or "base model"))
        previous = round_store.stage_dir("train") / "model"
        client.log_param(run_id, "policy_dir", str(previous))
        train = round_store.complete_manifest("train") or {}
        for key in ("final_loss", "steps"):
            if key in train:
                client.log_metric(run_id, f"train/{key}", float(train[key]), step=k)
        client.set_terminated(run_id, "FINISHED")
    print(f"[iterate] {rounds} round(s) done; last policy: {previous}", file=console)


def main(argv: list[str] | None = None) -> None:
    stage_main("iterate", run, argv)


if __name__ == "__main__":
    main()
