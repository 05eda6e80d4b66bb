"""The DeepSpeed config: a JSON file whose "auto" values are filled from the run config.

Filled as the Hugging Face integration does (batch sizes, accumulation, clipping, precision, the
ZeRO bucket sizes from the model's hidden size); an explicit value that contradicts the run config
is an error. The optimizer and LR schedule come from the run config, never from the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[2]  # relative config paths also resolve from here


def find_ds_config(path: str) -> Path:
    """The DeepSpeed config file: as given, else relative to the repository (``make`` anywhere)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    repo = REPO / path
    if not p.is_absolute() and repo.is_file():
        return repo
    raise ConfigError(f"train.ds_config: DeepSpeed config {path} not found")


# Floor for the "auto" ZeRO bucket sizes (elements). The Hugging Face fill (hidden², 0.9·hidden²)
# gives a small model (SmolLM2: 576² = 0.33M) hundreds of tiny collectives a step, each one a sync
# point between ranks; 1e7 (20 MB in bf16) leaves models with hidden size >= 3163 unchanged.
MIN_BUCKET_ELEMENTS = 10_000_000


def deepspeed_config(
    path: str, train: TrainConfig, world_size: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """Load a DeepSpeed JSON, fill "auto" from the run config, reject contradictions.

    Filled like the Hugging Face integration: batch sizes, accumulation, clipping, precision and
    the ZeRO bucket sizes from the model's hidden size. The optimizer and LR schedule come from
    the run config (the prior has its own parameter group), so the JSON must not define them.
    """
    file = find_ds_config(path)
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(
                f"{file}: remove '{key}': the optimizer and learning-rate schedule come from the "
                "run config (train.learning_rate, prior_learning_rate, weight_decay, "
                "warmup_ratio, lr_scheduler)"
            )
    micro, accum = train.per_device_batch_size, train.gradient_accumulation_steps
    errors: list[str] = []

    def fill(tree: dict[str, Any], key: str, value: Any, source: str, dotted: str) -> None:
        given = tree.get(key, "auto")
        if given == "auto":
            tree[key] = value
        elif given != value:
            errors.append(
                f"{file}: {dotted} is {given!r} but {source} gives {value!r}; set it to "
                '"auto" or make them agree'
            )

    fill(
        cfg,
        "train_micro_batch_size_per_gpu",
        micro,
        "train.per_device_batch_size",
        "train_micro_batch_size_per_gpu",
    )
    fill(
        cfg,
        "gradient_accumulation_steps",
        accum,
        "train.gradient_accumulation_steps",
        "gradient_accumulation_steps",
    )
    fill(
        cfg,
        "train_batch_size",
        micro * accum * world_size,
        f"per_device_batch_size x gradient_accumulation_steps x {world_size} ranks",
        "train_batch_size",
    )
    fill(cfg, "gradient_clipping", train.max_grad_norm, "train.max_grad_norm", "gradient_clipping")
    for name, enabled in (("bf16", train.precision == "bf16"), ("fp16", False)):
        section = cfg.setdefault(name, {})
        if not isinstance(section, dict):
            errors.append(f"{file}: '{name}' must be an object")
            continue
        source = f"train.precision={train.precision!r}"
        if name == "fp16" and section.get("enabled") is True:
            errors.append(
                f"{file}: fp16.enabled is true: fp16 is not supported (use "
                "train.precision=bf16 or fp32)"
            )
        else:
            fill(section, "enabled", enabled, source, f"{name}.enabled")
    zero = cfg.setdefault("zero_optimization", {"stage": 3})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"{file}: zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")
    hidden = hidden_size or 1024
    for key, value in (
        ("reduce_bucket_size", max(hidden**2, MIN_BUCKET_ELEMENTS)),
        ("stage3_prefetch_bucket_size", max(int(0.9 * hidden**2), MIN_BUCKET_ELEMENTS)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        errors.append(f'{file}: cannot fill "auto" for {", ".join(leftover)}')
    if errors:
        raise ConfigError("\n".join(errors))
    # Torch AdamW (no FusedAdam build); also accepted beside ZeRO-Offload.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if zero.get("offload_optimizer"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _walk(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def frozen_engine_config(ds: dict[str, Any]) -> dict[str, Any]:
    """The config of an engine without optimizer (the reference): same sharding and precision."""
    out = json.loads(json.dumps(ds))
    out.get("zero_optimization", {}).pop("offload_optimizer", None)
    return out
