"""From the run store to a plan: everything a rank needs, resolved before any engine exists.

``make_plan`` reads the pairs, picks the model folders and the reference mode and fills the
DeepSpeed config: every check that can fail before training fails here (the stage calls it
before launching any process, and each rank again to get its plan).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import ConfigError, RunConfig, TrainConfig, build_objective
from pipeline.data import DataError
from pipeline.objectives import MIDPOObjective
from pipeline.runstore import RunStore
from pipeline.training.batching import epoch_batches
from pipeline.training.checkpoints import checkpoint_dir
from pipeline.training.ds_config import deepspeed_config
from pipeline.training.pairs import PairData, check_vocabulary, load_pairs
from pipeline.training.resources import LaunchChoice, choose, settings_choice

REFERENCE_MODES = ("none", "precomputed", "live")


@dataclass
class TrainPlan:
    """Everything a rank needs to train, resolved by the stage before the engines exist."""

    train: TrainConfig
    data: PairData
    policy_dir: Path
    reference_dir: Path
    reference_mode: str  # one of REFERENCE_MODES (``choose_reference``)
    ds_config: dict[str, Any]
    checkpoint_dir: Path
    output_dir: Path | None  # rank 0: where the HF folder goes; None elsewhere
    world_size: int
    max_length: int
    objective: MIDPOObjective  # the MI-DPO objective (with its learnable prior, if any)
    log: Callable[[int, dict[str, float]], None] | None = None  # rank 0: per-step metrics sink
    export: bool = True  # write the Hugging Face folder (and check it) at the end
    checkpoints: bool = True  # save DeepSpeed checkpoints (every N steps and at the end)
    # What train.*: auto resolved to at launch (None: the settings as given, "auto" as on CPU).
    choice: LaunchChoice | None = None

    def __post_init__(self) -> None:
        if self.choice is None:
            self.choice = settings_choice(self.train)

    @property
    def launch(self) -> LaunchChoice:
        assert self.choice is not None
        return self.choice

    @property
    def global_batch(self) -> int:
        t = self.train
        return t.per_device_batch_size * t.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.train.max_steps or self.train.epochs * self.steps_per_epoch

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.train.precision == "bf16" else torch.float32

    def epoch_order(self, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
        """The global batches of ``epoch``, in order (deterministic from the seed)."""
        t = self.train
        lengths = self.data.lengths if lengths is None else lengths
        return epoch_batches(lengths, self.global_batch, t.seed, epoch, t.bucket_window)

    def data_position(self, step: int) -> dict[str, int]:
        """Where optimizer step ``step`` leaves the data: epoch, batch in it, pairs consumed."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        pairs = epoch * len(self.data) + sum(len(b) for b in order[:index])
        return {"epoch": epoch, "batch_in_epoch": index, "pairs_seen": pairs}


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    resumed_from: int
    export_check: dict[str, Any]
    metrics_path: Path
    tokens_per_s: float
    seconds: float
    history: list[dict[str, float]]  # this run's per-step metrics (every rank has them)


def model_dirs(cfg: RunConfig, store: RunStore) -> tuple[Path, Path, Path]:
    """(policy start, reference, the score stage's reference) model folders.

    The policy starts from the model that generated the pairs (generate.model, else the base);
    the reference is the score stage's unless train.reference_model names another.
    """
    from pipeline.models import check_model_folder

    base = Path(store.require("prepare", check_stale=False)["model_dir"])
    generated = store.complete_manifest("generate")
    sampler = Path(generated["model_dir"]) if generated and generated.get("model_dir") else base
    score_ref = Path(cfg.score.reference_model).expanduser() if cfg.score.reference_model else base
    policy = Path(cfg.train.init_model).expanduser() if cfg.train.init_model else sampler
    reference = (
        Path(cfg.train.reference_model).expanduser() if cfg.train.reference_model else score_ref
    )
    allow = cfg.model.allow_pickle_weights
    for key, folder in (("train.init_model", policy), ("train.reference_model", reference)):
        try:
            check_model_folder(folder, allow_pickle=allow)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    return policy.resolve(), reference.resolve(), score_ref.resolve()


def choose_reference(
    objective: MIDPOObjective, train: TrainConfig, data: PairData, same_as_score: bool
) -> str:
    """ "none", "precomputed" (pairs.parquet's log-probs) or "live" (a reference engine).

    The one place the decision is made: the engines build a reference engine for "live" only.
    """
    if not objective.needs_reference:
        return "none"
    if objective.needs_live_reference:
        if train.reference == "precomputed":
            raise ConfigError(
                f"train.reference=precomputed: objective {train.objective!r} needs the reference's "
                "full distribution or activations at every step, which no precompute serves; "
                "use train.reference=auto"
            )
        return "live"
    if train.reference == "live":
        return "live"
    if data.has_ref_logps and same_as_score:
        return "precomputed"
    if train.reference == "precomputed":
        why = (
            "pairs.parquet has no reference log-probs (score.reference_logps=none?)"
            if not data.has_ref_logps
            else "train.reference_model differs from the score stage's reference"
        )
        raise ConfigError(f"train.reference=precomputed: {why}")
    return "live"


def make_plan(
    cfg: RunConfig,
    store: RunStore,
    world_size: int,
    *,
    output_dir: Path | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    choice: LaunchChoice | None = None,
    local_world_size: int | None = None,
) -> TrainPlan:
    """Resolve data, models, reference mode and the DeepSpeed config; every check that can fail
    before training fails here (the stage calls it before launching any process).

    ``choice``: the launch's hardware choices (every rank must train with rank 0's); resolved
    here from this machine when not given."""
    from pipeline.config import stage_config

    score = store.require("score")
    policy_dir, reference_dir, score_ref = model_dirs(cfg, store)
    data = load_pairs(
        store.stage_dir("score") / "pairs.parquet",
        max_length=cfg.model.max_length,
        max_prompt_length=cfg.model.max_prompt_length,
    )
    objective = build_objective(cfg.train, reference_dir)
    mode = choose_reference(objective, cfg.train, data, reference_dir == score_ref)
    if objective.needs_token_weights and not data.has_weights:
        raise DataError(
            f"{data.source}: objective {cfg.train.objective!r} needs token weights "
            "(chosen_weights / rejected_weights); run `make score` with this objective"
        )
    # config.json read directly: importing transformers here would slow every launch.
    model_config = json.loads((policy_dir / "config.json").read_text())
    text_config = model_config.get("text_config") or {}
    vocab_size = model_config.get("vocab_size") or text_config.get("vocab_size")
    if vocab_size:
        check_vocabulary(data, int(vocab_size))
    if choice is None:
        choice = choose(
            cfg.train,
            policy_dir,
            world_size,
            accelerator=distributed.accelerator_name(),
            live_reference=mode == "live",
            max_length=cfg.model.max_length,
            local_world_size=local_world_size,
        )
    ds = deepspeed_config(
        choice.ds_config,
        cfg.train,
        world_size,
        model_config.get("hidden_size") or text_config.get("hidden_size"),
    )
    if cfg.train.compile and ds.get("zero_optimization", {}).get("stage") == 3:
        raise ConfigError(
            f"train.compile: not with ZeRO-3 (train.ds_config resolved to {choice.ds_config}): "
            "its hooks gather each block's weights inside the compiled region. Name a ZeRO "
            "0-2 config in train.ds_config or set train.compile=false"
        )
    key = {
        "train": stage_config(cfg, "train"),
        "score": score["output_hash"],
        "world_size": world_size,
        "choice": {k: v for k, v in choice.as_dict().items() if k != "reason"},
        "policy": str(policy_dir),
        "reference": str(reference_dir),
    }
    return TrainPlan(
        train=cfg.train,
        data=data,
        policy_dir=policy_dir,
        reference_dir=reference_dir,
        reference_mode=mode,
        ds_config=ds,
        choice=choice,
        checkpoint_dir=checkpoint_dir(store.scratch_dir("train"), key),
        output_dir=output_dir,
        world_size=world_size,
        max_length=cfg.model.max_length,
        objective=objective,
        log=log,
    )


def summary(
    plan: TrainPlan,
    result: TrainResult,
    partition: list[dict[str, Any]],
    ranks: distributed.Ranks,
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """What the train stage's manifest records."""
    t = plan.train
    return {
        "objective": t.objective,
        "objective_hparams": dict(plan.objective.hparams),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from,
        "mlflow_run_id": mlflow_run_id,
        "world_size": ranks.world_size,
        "nodes": ranks.world_size // ranks.local_world_size,
        "precision": t.precision,
        "reference": plan.reference_mode,
        "policy_init_dir": str(plan.policy_dir),
        "reference_model_dir": str(plan.reference_dir),
        "pairs": len(plan.data),
        "truncation": plan.data.report.as_dict(),
        "zero_partition": partition,
        "ds_config": plan.ds_config,
        "launch_choice": plan.launch.as_dict(),
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.seconds,
        "export_max_abs_diff": result.export_check.get("max_abs_diff"),
        "checkpoint_dir": str(plan.checkpoint_dir),
    }
