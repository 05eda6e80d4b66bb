"""Typed run configuration: one YAML per run, dotted command-line overrides, strict validation.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an
out-of-range value fails on load with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from pipeline.objectives import MIDPOObjective

STAGES = ("prepare", "generate", "score", "train", "evaluate", "promote")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names file, key, value and rule."""


# A reward function: an importable dotted module and a function name in it.
REWARD_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def reward_function_problem(spec: str) -> str | None:
    """Why ``spec`` cannot name a reward function (None when it can), decided without importing
    anything: the shape ``module:function``, and no standard-library module (``os:system``)."""
    if not REWARD_FUNCTION.match(spec):
        return (
            f"scorer.function must be 'module:function' naming a Python function "
            f"f(prompts, responses) -> rewards, got {clip(repr(spec), 120)}"
        )
    top = spec.split(".", 1)[0].split(":", 1)[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return (
            f"scorer.function={spec!r}: {top} is a standard-library module, not a reward "
            "function; name a function(prompts, responses) -> rewards in your own module"
        )
    return None


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    # "smollm2-135m-instruct" is bundled and real, "tiny" random (for tests); a hub id works
    # only when online.
    base: str = Field(
        "smollm2-135m-instruct", description="base model: a built-in name, HF folder or hub id"
    )
    max_length: int = Field(256, ge=16, le=131072, description="prompt + response tokens")
    max_prompt_length: int = Field(
        128, ge=1, le=131072, description="longest prompt, in tokens (see generate.long_prompts)"
    )
    trust_remote_code: bool = Field(False, description="run a model folder's own Python code")
    # Pickle checkpoints (.bin/.pt) from user paths can run arbitrary code.
    allow_pickle_weights: bool = Field(
        False, description="also load pickle weights (.bin/.pt), not only safetensors"
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> ModelConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                f"({self.max_length}): no room left for the response"
            )
        return self


class DataConfig(Section):
    # vader-sentiment: the built-in controlled-sentiment task (human-rated movie-review
    # snippets); vader-preference: pairs of those snippets themselves, the more positive one
    # preferred (train split -> training pairs, test split -> held-out pairs), no generation;
    # prompts: a user prompt-only dataset; preference: a user preference dataset (TRL formats)
    # taken straight to pairs, skipping generation.
    task: Literal["vader-sentiment", "vader-preference", "prompts", "preference"] = Field(
        "vader-sentiment",
        description="built-in: vader-sentiment, vader-preference; yours: prompts, preference",
    )
    path: str | None = Field(
        None, description="user dataset: JSONL, Parquet or saved dataset (prompts, preference)"
    )
    eval_path: str | None = Field(
        None, description="held-out rows, halved into eval and test (default: from path)"
    )
    drop_bad_rows: bool = Field(
        False, description="drop invalid data rows and count them, not fail"
    )
    instruction: str = Field(
        "Continue this movie review: ", description="text before each snippet's opening words"
    )
    prompt_words: int = Field(6, ge=1, le=64, description="opening words of a snippet")
    num_train_prompts: int = Field(256, ge=1, description="most prompts in the train split")
    num_eval_prompts: int = Field(64, ge=1, description="most prompts in the eval split")
    num_test_prompts: int = Field(64, ge=1, description="most prompts in the test split")
    human_pair_min_gap: float = Field(1.0, gt=0, le=8, description="rating gap on the -4..4 scale")
    num_human_pairs: int = Field(
        256, ge=0, description="held-out human pairs of test snippets (built-in tasks)"
    )
    num_train_pairs: int = Field(
        256, ge=1, description="training pairs of snippets (task vader-preference)"
    )
    split_seed: int = Field(0, description="seed of the 80/10/10 split and the snippet pairs")

    @property
    def pairs_from_data(self) -> bool:
        """The pairs come straight from prepare's preference.parquet: no generation."""
        return self.task in ("preference", "vader-preference")

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataConfig:
        if self.task in ("prompts", "preference") and not self.path:
            raise ValueError(
                f"task '{self.task}' needs data.path (a JSONL, Parquet or saved dataset)"
            )
        return self


class GenerateConfig(Section):
    backend: Literal["vllm", "transformers"] = Field("vllm", description="sampling engine")
    # Folder to sample from: None = prepare's base model; later rounds: a train stage's export.
    model: str | None = Field(None, description="model folder to sample from (default: prepare's)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when a GPU is visible, else cpu"
    )
    n: int = Field(4, ge=1, le=1024, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(48, ge=1, le=65536, description="longest response, in tokens")
    seed: int = Field(0, description="sampling seed; each prompt's derives from it and its id")
    batch_size: int = Field(16, ge=1, description="prompts per batch (transformers backend)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="sampling model's weights dtype"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM model copy")
    data_parallel_size: int = Field(1, ge=1, description="vLLM model copies (data parallel)")
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="share of GPU memory vLLM may take"
    )
    long_prompts: Literal["truncate", "fail"] = Field(
        "truncate", description="prompts over model.max_prompt_length: keep their end, or stop"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM context length (default: max_position_embeddings)"
    )
    # Prompts per resumable unit: each finished chunk is kept in scratch until the stage ends.
    chunk_size: int = Field(256, ge=1, description="prompts per resumable unit")


class ScorerConfig(Section):
    kind: Literal["function", "reward_model", "judge"] = Field(
        "function", description="reward function, reward model, or pairwise LLM judge"
    )
    # Reward functions are only imported from here (README: the config is code).
    function: str = Field(
        "pipeline.rewards:vader_sentiment",
        description="module:function(prompts, responses) -> rewards (kind function)",
    )
    model: str | None = Field(None, description="model folder (kind reward_model or judge)")
    batch_size: int = Field(
        32, ge=1, description="responses per reward call (function, reward_model)"
    )
    drop_invalid: bool = Field(
        False, description="drop responses whose reward raised or is NaN/inf, not fail"
    )
    max_length: int = Field(
        1024, ge=16, description="longest reward-model or judge input, in tokens (else error)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="reward model's or judge's weights dtype"
    )
    judge_template: str | None = Field(
        None, description="judge prompt with {prompt}, {response_a}, {response_b} (default: ours)"
    )

    @model_validator(mode="after")
    def _target(self) -> ScorerConfig:
        if self.kind == "function":
            problem = reward_function_problem(self.function)
            if problem:
                raise ValueError(problem)
        if self.kind in ("reward_model", "judge") and not self.model:
            raise ValueError(f"scorer kind '{self.kind}' needs scorer.model (a model folder)")
        return self


class DiceConfig(Section):
    enabled: bool = Field(False, description="DICE: implicit reward, length-balanced pairs, replay")
    # Length regularisation: select by score - alpha * length; "auto" picks alpha so the mean
    # chosen and rejected lengths balance (DICE's grid search).
    length_alpha: float | Literal["auto"] = Field(
        "auto", description="alpha of score - alpha * length; auto: balance the lengths"
    )
    length_unit: Literal["chars", "tokens"] = Field(
        "chars", description="unit of the length in length_alpha"
    )
    replay_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of final pairs")
    # No default: the built-in task's human pairs are held-out evaluation data.
    replay_path: str | None = Field(
        None, description="preference dataset to replay (TRL formats; replay_fraction > 0)"
    )
    # Implicit reward beta * (log pi_policy(y|x) - log pi_ref(y|x)) of a DPO-trained policy. The
    # base model as policy (round 1's default) gives all-zero rewards, so set it there; the
    # default reference is the one the policy was trained against in round 1.
    beta: float = Field(0.1, gt=0.0, description="beta of the implicit reward")
    policy_model: str | None = Field(
        None, description="implicit reward's policy (default: the generating model)"
    )
    reference_model: str | None = Field(
        None, description="implicit reward's reference (default: prepare's base model)"
    )


class ScoreConfig(Section):
    scorer: ScorerConfig = ScorerConfig()
    pair_strategy: Literal["best_vs_worst", "margin", "random"] = Field(
        "best_vs_worst", description="per prompt: best vs worst, every pair (margin), or random"
    )
    min_margin: float = Field(0.0, ge=0.0, description="least score gap of a kept pair")
    drop_ties: bool = Field(True, description="drop pairs whose scores are equal")
    drop_truncated: bool = Field(True, description="leave out responses cut at max_tokens")
    dice: DiceConfig = DiceConfig()
    reference_logps: Literal["transformers", "vllm", "none"] = Field(
        "transformers",
        description="engine for reference log-probs (none: train computes them live)",
    )
    batch_size: int = Field(8, ge=1, description="pairs per reference forward")
    seed: int = Field(0, description="seed of the random strategy and of the replay draw")
    # Later rounds (make iterate): the previous round's policy.
    reference_model: str | None = Field(
        None, description="reference model folder (default: prepare's base model)"
    )
    reference_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of log-prob models (reference, DICE, TIS-DPO)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device for transformers log-probs and reward models"
    )
    tisdpo_positive_model: str | None = Field(
        None, description="TIS-DPO positive model (default: the generating model)"
    )
    tisdpo_negative_model: str | None = Field(
        None, description="TIS-DPO negative model (default: the reference)"
    )
    # By default: clamp the log-prob difference to [-1.5, 1.5] and map it onto [0.7, 1.3].
    tisdpo_transform: str = Field(
        "threshold_and_scale",
        description="TIS-DPO score -> weight transform (objectives/tisdpo_weights.py)",
    )
    tisdpo_transform_params: dict[str, float] = Field(
        default_factory=dict, description="the transform's parameters over its defaults"
    )

    @model_validator(mode="after")
    def _tisdpo_transform(self) -> ScoreConfig:
        from pipeline.objectives.tisdpo_weights import TRANSFORM_DEFAULTS

        allowed = TRANSFORM_DEFAULTS.get(self.tisdpo_transform)
        if allowed is None:
            raise ValueError(
                f"tisdpo_transform must be one of {sorted(TRANSFORM_DEFAULTS)}, "
                f"got {self.tisdpo_transform!r}"
            )
        unknown = sorted(set(self.tisdpo_transform_params) - set(allowed))
        if unknown:
            raise ValueError(
                f"tisdpo_transform_params: unknown {unknown} for "
                f"{self.tisdpo_transform!r}; expected {sorted(allowed)}"
            )
        return self


class TrainConfig(Section):
    objective: str = Field(
        "dpo", description="MI-DPO objective: dpo, simpo, tdpo, ... (docs/objectives.md)"
    )
    # None: the objective's own default (0.1 for DPO/TDPO, 2.0 for SimPO/RMiPO, ...).
    beta: float | None = Field(
        None, gt=0.0, description="log-ratio multiplier (default: the objective's own)"
    )
    objective_args: dict[str, Any] = Field(
        default_factory=dict,
        description="other hyper-parameters by original name (alpha, variant, ...)",
    )
    learning_rate: float = Field(5e-6, gt=0.0, le=1.0, description="policy's peak learning rate")
    prior_learning_rate: float = Field(
        1e-2,
        gt=0.0,
        le=10.0,
        description="learned prior's rate (objective_args.prior_lr wins; SparsePO: the policy's)",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (weight matrices)")
    warmup_ratio: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of steps warming the learning rate up"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    epochs: int = Field(1, ge=1, description="passes over the pairs (unless max_steps)")
    max_steps: int | None = Field(
        None, ge=1, description="optimizer steps (default: epochs x steps per epoch)"
    )
    per_device_batch_size: int = Field(4, ge=1, description="pairs per rank per micro-batch")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches per optimizer step"
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16 (fp32 master weights and optimizer) or fp32"
    )
    # "auto": chosen at launch from the world size and a per-device memory estimate (weights,
    # gradients, optimizer state against free device memory; RAM per rank on CPU), printed in
    # one line and recorded in the manifest (training/resources.py); a file path always wins.
    ds_config: str = Field("auto", description="DeepSpeed config JSON, or auto: chosen at launch")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="auto: on when activations would not fit beside the states"
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = Field(
        "auto", description="auto: flash_attention_2 on CUDA if installed, else sdpa"
    )
    # How a micro-batch goes through the model. "shared_prompt": each pair's prompt once, both
    # responses after it (a 4D mask keeps them apart; (2P + Rc + Rr) / (P + Rc + Rr) less work);
    # "packed": every sequence in one row, position ids restarting (no padding computed);
    # "padded": one padded row per sequence. "auto": shared_prompt on CPU, packed on a GPU with a
    # variable-length kernel (flash_attention_2), padded otherwise (docs/training.md).
    layout: Literal["auto", "padded", "shared_prompt", "packed"] = Field(
        "auto", description="micro-batch layout: padded, shared_prompt, packed, or auto"
    )
    # Kept for old configs.
    share_prompt: bool = Field(
        True, description="false: padded wherever auto would pick shared_prompt"
    )
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    token_chunk_size: int = Field(1024, ge=1, description="response tokens per LM-head chunk")
    # The LM head's logits of a chunk are recomputed in backward (memory O(chunk x vocab)) or kept
    # from the forward (one head pass less per step). "auto": recomputed, on a GPU too: keeping
    # them gave no measurable speed on an H200 for 0.9 GiB more (docs/training.md, GPU table).
    recompute_logits: bool | Literal["auto"] = Field(
        "auto", description="recompute each chunk's logits in backward (auto: yes)"
    )
    # torch.compile each transformer block (one graph shared by all blocks: the norms, rotary and
    # MLP elementwise ops fused; the first steps pay the compile, a new sequence length once
    # more). Off until measured on a GPU (docs/training.md); not with ZeRO-3, whose hooks gather
    # each block's weights. Needs Triton and a C compiler on a GPU, a C++ compiler on CPU.
    compile: bool = Field(False, description="torch.compile each transformer block")
    # The marginal prior is objective "marginal"'s prompt-free model.
    marginal_prior_every: int = Field(
        1, ge=1, description="policy steps per marginal prior step (objective marginal)"
    )
    nproc: int | Literal["auto"] = Field(
        "auto", description="processes per node; auto: one per accelerator, 1 on CPU (NPROC wins)"
    )
    seed: int = Field(0, description="seed of the pair order and of learned prior weights")
    # The model that generated the pairs is generate.model, else prepare's base model; in later
    # rounds, the previous round's train export.
    init_model: str | None = Field(
        None, description="policy's starting weights (default: the model that generated)"
    )
    reference_model: str | None = Field(
        None, description="frozen reference (default: score.reference_model, else the base)"
    )
    # Reference log-probs: "auto" uses pairs.parquet's precomputed ones when the objective needs
    # only token log-probs and the reference is the score stage's; "live" always runs the
    # reference engine; "precomputed" fails when they cannot be used.
    reference: Literal["auto", "live", "precomputed"] = Field(
        "auto", description="reference log-probs: auto, live or precomputed (pairs.parquet's)"
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate schedule after warmup"
    )
    marginal_prior_learning_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="marginal prior's learning rate (default: learning_rate)"
    )
    # Pairs are sorted by length within shuffled windows (less padding); 1 = no bucketing beyond
    # the global batch.
    bucket_window: int = Field(16, ge=1, description="global batches per length-sorting window")
    keep_checkpoints: int = Field(
        2, ge=1, description="checkpoints kept in scratch (2: a damaged newest one falls back)"
    )
    # Process-group timeout: must cover the longest rank-0-only work (export, MLflow logging).
    dist_timeout_minutes: float = Field(60.0, gt=0.0, description="process-group timeout, minutes")


class EvaluateConfig(Section):
    num_prompts: int | None = Field(
        None, ge=1, description="prompts to evaluate (default: all of evaluate.split's)"
    )
    n: int = Field(2, ge=1, description="samples per prompt")
    baseline: Literal["reference", "champion"] = Field(
        "reference", description="compare with the reference or the registry's champion"
    )
    bootstrap_samples: int = Field(1000, ge=10, description="resamples per bootstrap interval")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of intervals")
    # "test" is never used for model selection.
    split: Literal["test", "eval"] = Field(
        "test", description="prepare's held-out prompt split to sample on"
    )
    num_human_pairs: int | None = Field(None, ge=1, description="default: all human pairs")
    num_train_pairs: int = Field(
        64, ge=0, description="training pairs for likelihood displacement (0: skip)"
    )
    batch_size: int = Field(8, ge=1, description="sequences per log-prob forward")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device of the log-prob models"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the log-prob models"
    )


class GateConfig(Section):
    min_reward_gain: float = Field(0.0, description="reward over the champion's to pass")
    max_kl: float | None = Field(None, ge=0.0, description="largest KL(pi || ref) to pass")
    min_human_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="least implicit-reward accuracy on human pairs"
    )


# Experiment and registered-model names become folder names in MLflow's artifact store: names,
# never paths (no "/", no leading "." that would make "..").
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class PromoteConfig(Section):
    registered_model: str = Field(
        "midpo-policy", max_length=200, pattern=NAME, description="MLflow registered model name"
    )
    gate: GateConfig = GateConfig()
    allow_foreign_versions: bool = Field(
        False, description="add versions beside ones midpo did not make"
    )
    # Seconds to wait for another promotion of the same registered model to finish.
    lock_timeout_s: float = Field(
        600.0, gt=0.0, description="seconds to wait for the registry lock"
    )
    log_transformers_flavour: bool = Field(
        False, description="also log the model for mlflow.transformers.load_model (a copy)"
    )


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else a sqlite store under the run root.
    uri: str | None = Field(
        None, description="default: MLFLOW_TRACKING_URI, else sqlite under root"
    )
    experiment: str = Field("midpo", max_length=200, pattern=NAME, description="MLflow experiment")
    system_metrics: bool = Field(
        False, description="log CPU/GPU/memory use of each stage run (MLflow system metrics)"
    )


SLURM_TIME = r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$"  # [days-]hours:minutes:seconds
SLURM_MEM = r"^\d+[KMGT]?$"  # sbatch --mem: megabytes, or with a K/M/G/T suffix


class StageResources(Section):
    """One stage's SLURM request; fields left unset take the cluster section's defaults."""

    partition: str | None = Field(None, description="--partition (default: cluster.partition)")
    nodes: int | None = Field(
        None, ge=1, description="nodes (default: cluster.nodes for train, 1 for the others)"
    )
    gpus_per_node: int | None = Field(
        None, ge=0, description="--gpus-per-node (default: cluster.gpus_per_node)"
    )
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs per node (default: cluster.cpus_per_task)"
    )
    mem: str | None = Field(
        None, pattern=SLURM_MEM, description="memory per node (default: cluster.mem)"
    )
    time: str | None = Field(None, pattern=SLURM_TIME, description="--time (default: cluster.time)")


class ClusterConfig(Section):
    # Defaults for every stage's job; `stages.<stage>` overrides them per stage.
    partition: str | None = Field(None, description="--partition (default: the cluster's)")
    nodes: int = Field(1, ge=1, description="nodes for train, the one multi-node stage")
    gpus_per_node: int = Field(0, ge=0, description="--gpus-per-node (0: none requested)")
    cpus_per_task: int = Field(2, ge=1, description="CPUs per node (one task per node)")
    time: str = Field("01:00:00", pattern=SLURM_TIME, description="--time, [days-]hh:mm:ss")
    mem: str | None = Field(None, pattern=SLURM_MEM, description="memory per node, e.g. 200G")
    account: str | None = Field(None, description="--account")
    qos: str | None = Field(None, description="--qos")
    stages: dict[
        Literal["prepare", "generate", "score", "train", "evaluate", "promote"], StageResources
    ] = Field(default_factory=dict, description="per-stage values over these defaults")
    sbatch_args: list[str] = Field(
        default_factory=list, description="extra sbatch flags for every job, e.g. --exclusive"
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines each job runs first (module load ..., source .../activate)",
    )
    # The submitter's interpreter must be on storage the nodes share.
    python: str | None = Field(
        None, description="interpreter on the nodes (default: submitter's, or setup's python3)"
    )

    @model_validator(mode="after")
    def _single_node_stages(self) -> ClusterConfig:
        for stage, res in self.stages.items():
            if stage != "train" and res.nodes is not None and res.nodes > 1:
                raise ValueError(
                    f"stages.{stage}.nodes={res.nodes}: only train runs across nodes; {stage} "
                    "runs on one node (scale generation with generate.tensor_parallel_size and "
                    "data_parallel_size, i.e. GPUs per node)"
                )
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise ValueError(
                    f"sbatch_args: {arg!r} is not an sbatch flag (e.g. --constraint=a100)"
                )
        return self


# The study's default points (docs/study.md): every prior of the MI-DPO family at its preset
# defaults, and the learnable prior started at DPO. DICE is not a point of its own: in one round
# its loss is DPO's; what differs is the data loop of `make iterate`.
STUDY_OBJECTIVES = (
    "dpo",
    "centropy",
    "simpo",
    "rdpo",
    "tdpo",
    "tisdpo",
    "sparsepo",
    "rmipo",
    "learnable",
)


StudyTrack = Literal["offline", "online"]
STUDY_TRACKS: tuple[StudyTrack, ...] = ("offline", "online")


class StudyConfig(Section):
    """`make study`: every objective on the same model, data and budget (docs/study.md)."""

    objectives: list[str] = Field(
        default_factory=lambda: list(STUDY_OBJECTIVES),
        description="objectives, each at its preset defaults (learnable starts at DPO)",
    )
    objective_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per objective, hyper-parameters over its preset defaults",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="train.seed of each point"
    )
    online_seeds: list[int] | None = Field(
        None, min_length=1, description="the online track's seeds (default: seeds)"
    )
    tracks: list[StudyTrack] = Field(
        default_factory=lambda: list(STUDY_TRACKS),
        min_length=1,
        description="offline: human pairs, no generation; online: the controlled-sentiment task",
    )
    online: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted overrides giving the online track's base config (data.task ...)",
    )
    publish_dir: str = Field(
        "docs/study", description="point JSONs and figures; the report is ../study.md"
    )

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        from pipeline.objectives import available_objectives

        if not v:
            raise ValueError("no objectives")
        for name in v:
            if name == "dice":
                raise ValueError(
                    "dice: in one round DICE's loss is DPO's (its difference is the data loop "
                    "of `make iterate`); use dpo"
                )
            if name not in available_objectives():
                raise ValueError(
                    f"unknown objective {name!r}; expected some of "
                    f"{', '.join(available_objectives())}"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"an objective is listed twice: {v}")
        return v

    @field_validator("seeds", "online_seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        return v

    @field_validator("tracks")
    @classmethod
    def _distinct_tracks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a track is listed twice: {v}")
        return v


class RunConfig(Section):
    name: str = Field(
        "demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run name: its folder in root"
    )
    root: str = Field("runs", description="run store folder")
    cache_dir: str = Field(
        "runs/_cache", description="converted models, shared samples and log-probs"
    )
    # The project, root and cache_dir are always allowed; input paths (models, data, DeepSpeed
    # configs) anywhere else are refused (check_paths).
    allowed_roots: list[str] = Field(
        default_factory=list, description="other folders input paths may point into"
    )
    seed: int = Field(0, description="seed of the tiny model's weights and evaluate's bootstrap")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generate: GenerateConfig = GenerateConfig()
    score: ScoreConfig = ScoreConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig | None = Field(
        None, description="SLURM resources for make submit (docs/cluster.md)"
    )
    study: StudyConfig = StudyConfig()

    # Set by load_config, not by the YAML.
    source: str | None = Field(
        None, exclude=True, description="where this config came from (for messages)"
    )

    @field_validator("root", "cache_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


def stage_config(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the config a stage's outputs depend on (its config hash covers exactly this)."""
    c = cfg.model_dump(mode="json")
    sections: dict[str, list[str]] = {
        "prepare": ["model", "data"],
        "generate": ["generate"],
        "score": ["score"],
        "train": ["train"],
        "evaluate": ["evaluate", "generate"],
        "promote": ["promote"],
    }
    if stage not in sections:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    out = {k: c[k] for k in sections[stage]}
    out["seed"] = c["seed"]
    if stage == "prepare":  # user texts are bounded before tokenisation by this policy
        out["long_prompts"] = c["generate"]["long_prompts"]
    if stage in ("generate", "score", "train", "evaluate"):
        out["max_length"] = c["model"]["max_length"]
        out["max_prompt_length"] = c["model"]["max_prompt_length"]
    if stage == "score":
        # Scoring depends on the objective only through token weights (TIS-DPO), computed at
        # scoring time: switching dpo -> simpo reuses the pairs and reference log-probs.
        out["token_weights"] = build_objective(cfg.train).needs_token_weights
    if stage == "evaluate":
        out["scorer"] = c["score"]["scorer"]
    return out


def config_hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def derive_config(cfg: RunConfig, name: str, changes: dict[str, Any] | None = None) -> RunConfig:
    """A child run's config (an iterate round, a frontier or study point): ``cfg`` renamed, with
    dotted ``changes`` applied and validated like a YAML file. MLflow stays in the parent's
    store, so the child's runs can nest under the parent's."""
    from pipeline.tracking import tracking_uri

    tree: dict[str, Any] = cfg.model_dump(mode="json")
    tree["name"] = name
    tree["tracking"]["uri"] = tracking_uri(cfg)
    for dotted, value in (changes or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        out = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(f"run {name}", e)) from None
    _check_objective(out, f"run {name}")
    out.source = cfg.source
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.beta=0.2' -> ('train.beta', 0.2). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of 5000 digits
        raise ConfigError(f"override {clip(text, 200)!r}: value is not valid YAML ({e})") from None
    return key, value


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: nested ``*alias`` references expand exponentially (a few
    hundred bytes can become gigabytes), and a run config has no need for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a run config",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few kilobytes


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The section model inside a field's annotation (X, X | None, dict[str, X]), and whether a
    dict key comes before its fields."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, False
        if typing.get_origin(arg) is dict:
            return _section_model(typing.get_args(arg)[1])[0], True
    return None, False


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """'; did you mean train.learning_rate?' for an unknown key close to a valid one."""
    model: type[BaseModel] | None = RunConfig
    keyed = False
    for part in loc[:-1]:
        if keyed:
            keyed = False
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return ""
        model, keyed = _section_model(field.annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


MAX_ERROR_LINES = 20


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"])
        if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        given = e.get("input")
        given_s = "" if isinstance(given, dict) else f" (got {clip(repr(given), 120)})"
        lines.append(clip(f"{source}: {clip(loc, 200) or '<root>'}: {msg}{given_s}", 1000))
    if len(lines) > MAX_ERROR_LINES:
        lines[MAX_ERROR_LINES:] = [f"... and {len(lines) - MAX_ERROR_LINES} more"]
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML, apply dotted overrides, validate. Raises ConfigError with clear lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: {p.stat().st_size} bytes; a run config is at most {MAX_CONFIG_BYTES}"
        )
    try:
        tree = _load_yaml(p.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # not a YAMLError: an integer too long to convert
        raise ConfigError(f"{p}: invalid YAML ({clip(str(e), 300)})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(
            f"{where}: invalid YAML ({clip(str(getattr(e, 'problem', e)), 300)})"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    source = str(p) + (" + overrides" if overrides else "")
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    cfg.source = str(p)
    _check_objective(cfg, source)
    check_paths(cfg, source)
    return cfg


# Config keys that name files or folders the pipeline reads.
INPUT_PATH_KEYS = (
    "model.base",
    "data.path",
    "data.eval_path",
    "generate.model",
    "score.scorer.model",
    "score.reference_model",
    "score.tisdpo_positive_model",
    "score.tisdpo_negative_model",
    "score.dice.replay_path",
    "score.dice.policy_model",
    "score.dice.reference_model",
    "train.ds_config",
    "train.init_model",
    "train.reference_model",
)
PROJECT_DIR = Path(__file__).resolve().parent.parent


def allowed_roots(cfg: RunConfig) -> list[Path]:
    """Where input paths may resolve: the project, the working directory, the run root, the
    cache, and the config's ``allowed_roots``."""
    roots = [PROJECT_DIR, Path.cwd(), Path(cfg.root), Path(cfg.cache_dir)]
    roots += [Path(r) for r in cfg.allowed_roots]
    return [r.expanduser().resolve() for r in roots]


def _looks_like_path(value: str) -> bool:
    """A local path (absolute, ./ ../ ~, or existing), not a hub id like 'org/model'."""
    return value.startswith(("/", ".", "~")) or Path(value).exists()


def check_paths(cfg: RunConfig, source: str = "config") -> None:
    """Refuse input paths that resolve (symlinks and .. followed) outside the allowed roots."""
    tree = cfg.model_dump(mode="json")
    roots = allowed_roots(cfg)
    for key in INPUT_PATH_KEYS:
        value: Any = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str) or not _looks_like_path(value):
            continue
        resolved = Path(value).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ConfigError(
                f"{source}: {key}: {value!r} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(str(r) for r in roots)}); add its folder to allowed_roots to "
                "read it"
            )


def objective_kwargs(train: TrainConfig) -> dict[str, Any]:
    kwargs = dict(train.objective_args)
    if train.beta is not None:
        if "beta" in kwargs:
            raise ConfigError("set beta once: train.beta or train.objective_args.beta, not both")
        kwargs["beta"] = train.beta
    return kwargs


def model_sizes(model_dir: Path) -> dict[str, int]:
    """``hidden_size`` and ``num_layers`` of a decoder folder's config.json (its text_config for
    a multimodal one): what parts reading its hidden states are sized by."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config") or config
    sizes = {"hidden_size": text.get("hidden_size"), "num_layers": text.get("num_hidden_layers")}
    missing = [k for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
    if missing:
        raise ConfigError(f"{path}: no {' or '.join(missing)} (hidden_size, num_hidden_layers)")
    return sizes


def build_objective(train: TrainConfig, reference_dir: Path | None = None) -> MIDPOObjective:
    """The MI-DPO objective ``train`` names, with its hyper-parameters: the one place config
    becomes an objective (train, score's cache key, evaluate's implicit reward, the frontier).

    An objective with parts that read the reference's hidden states (SparsePO's learned mask
    head) takes ``hidden_size`` and ``num_layers`` from ``reference_dir`` unless
    train.objective_args sets them: all its layers, as the reference code does. Without a
    folder (config checks, score, evaluate: nothing they ask depends on it) it is built at a
    stand-in size of 1.

    Learned prior parts start from ``train.seed``: the same weights on every rank and in every
    run with that seed. torch's global generator is left as it was, so building an objective to
    ask it something changes no later random draw."""
    import torch

    from pipeline.objectives import available_objectives, make_objective
    from pipeline.objectives import objective_hyperparameters as accepted

    kwargs = objective_kwargs(train)
    name = train.objective
    if name in available_objectives() and "hidden_size" in accepted(name):
        sizes = {"hidden_size": 1, "num_layers": 1}  # stand-ins: no model to read
        if reference_dir is not None:
            sizes = model_sizes(reference_dir)
            hidden, layers = kwargs.get("hidden_size"), kwargs.get("num_layers")
            if (isinstance(hidden, int) and hidden != sizes["hidden_size"]) or (
                isinstance(layers, int) and layers > sizes["num_layers"]
            ):
                raise ConfigError(
                    f"train.objective_args: hidden_size={hidden}, num_layers={layers}: the "
                    f"reference model ({reference_dir}) has hidden_size {sizes['hidden_size']} "
                    f"and {sizes['num_layers']} layers"
                )
        for key, size in sizes.items():
            kwargs.setdefault(key, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        try:
            return make_objective(name, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"train.objective={train.objective!r}: {e}") from None


def _check_objective(cfg: RunConfig, source: str) -> None:
    """Validate train.objective and its hyper-parameters against the objectives library."""
    try:
        build_objective(cfg.train)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if cfg.train.objective == "dice" and not cfg.score.dice.enabled:
        # The preset alone is DPO; DICE is the data loop around it (docs/objectives.md).
        raise ConfigError(
            f"{source}: train.objective=dice is DPO against the previous round's policy; the "
            "DICE method is its data loop: set score.dice.enabled=true (and run `make iterate`), "
            "or use train.objective=dpo"
        )
