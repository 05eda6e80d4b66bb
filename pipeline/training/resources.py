"""The hardware choices of a training run, resolved once at launch: ZeRO stage, gradient
checkpointing, attention kernel and batch layout (``train.ds_config / gradient_checkpointing /
attention / layout: auto``), each with the reason, and the check that no other process holds
the devices the ranks are about to use.

The memory estimate per device (bytes): model states are 16 per parameter under AdamW (bf16
weights 2 + gradients 2 + fp32 master weights 4 + two moments 8; fp32 training: 4 + 4 + 8), a
live frozen reference adds its weights. ZeRO-1 as chosen for bf16 (DeepSpeed's bf16 optimizer)
accumulates gradients in fp32 (4) and divides master weights and moments by the world size;
ZeRO-2 divides gradients and optimizer state, ZeRO-3 also the weights. Activations: the usual
transformer estimate (Korthikanti et al. 2022, 34·h + 5·a·s bytes per token and layer at 16
bits; 34·h with a fused attention kernel on a GPU), two layer inputs per token and layer with
checkpointing. Explicit settings always win.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.training.errors import TrainingError

WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 2, 2, 12  # bf16; fp32 master + AdamW moments
HEADROOM = 0.8  # fraction of free memory a plan may fill (allocator fragmentation, buffers)
DS_CONFIGS = {  # ZeRO stage -> the repository's config for it
    0: "ds_configs/zero0.json",
    1: "ds_configs/zero1.json",
    2: "ds_configs/zero2.json",
    3: "ds_configs/zero3.json",
    "offload": "ds_configs/zero3_offload.json",
}


@dataclass(frozen=True)
class LaunchChoice:
    """What ``train.*: auto`` resolved to for this launch, and why (one line)."""

    ds_config: str
    gradient_checkpointing: bool
    attention: str
    layout: str
    reason: str
    recompute_logits: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def line(self) -> str:
        return (
            f"[train] ds_config={self.ds_config} gradient_checkpointing="
            f"{str(self.gradient_checkpointing).lower()} attention={self.attention} "
            f"layout={self.layout} recompute_logits={str(self.recompute_logits).lower()}: "
            f"{self.reason}"
        )


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs from a model folder's config.json and weights."""

    params: int
    hidden: int
    layers: int
    heads: int

    @classmethod
    def of(cls, folder: Path) -> ModelSize:
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config") or config
        hidden = int(text.get("hidden_size") or 1024)
        layers = int(text.get("num_hidden_layers") or 1)
        heads = int(text.get("num_attention_heads") or 1)
        return cls(count_parameters(folder, text, hidden, layers), hidden, layers, heads)


def count_parameters(folder: Path, text: dict[str, Any], hidden: int, layers: int) -> int:
    """Parameters from the safetensors headers (exact), else from the config's shapes."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    if total:
        return total
    vocab = int(text.get("vocab_size") or 32000)
    inner = int(text.get("intermediate_size") or 4 * hidden)
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (4 * hidden * hidden + 3 * hidden * inner)


def state_bytes(params: int, stage: int, world: int, reference: bool) -> float:
    """Model states per device under ZeRO ``stage`` (``reference``: a live frozen copy)."""
    weights, gradients = float(WEIGHT_BYTES * params), float(GRADIENT_BYTES * params)
    optimizer = float(OPTIMIZER_BYTES * params)
    if stage == 1:
        gradients *= 2  # the bf16 optimizer accumulates them in fp32
    if stage >= 1:
        optimizer /= world
    if stage >= 2:
        gradients /= world
    if stage >= 3:
        weights /= world
    return weights + gradients + optimizer + (weights if reference else 0.0)


def activation_bytes(
    size: ModelSize, tokens: int, seq: int, checkpointing: bool, fused_attention: bool = False
) -> float:
    """Activations one micro-batch keeps for backward (``tokens`` in it, rows of ``seq``).

    ``fused_attention``: a kernel that keeps no [seq, seq] scores (flash, memory-efficient SDPA
    on a GPU) drops the 5·a·s term.
    """
    if checkpointing:
        return 2.0 * 2 * tokens * size.hidden * size.layers
    per_token = 34 * size.hidden + (0 if fused_attention else 5 * size.heads * seq)
    return float(tokens * per_token * size.layers)


def free_device_bytes(accelerator: str, world_here: int) -> float:
    """Free memory one rank can count on: the first device's free memory on a GPU node, the
    available RAM shared by this node's ranks on CPU."""
    if accelerator == "cpu":
        return available_ram_bytes() / max(1, world_here)
    readings = device_memory_readings()
    if readings:
        return float(min(total - used for _, used, total in readings))
    import torch

    free, _ = torch.cuda.mem_get_info()
    return float(free)


def available_ram_bytes() -> float:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def choose_attention(setting: str, accelerator: str) -> str:
    """The decoder's attention kernel: flash-attention-2 on CUDA when installed, else SDPA."""
    if setting != "auto":
        return setting
    if accelerator == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def choose_layout(train: TrainConfig, accelerator: str, attention: str) -> tuple[str, str]:
    """The batch layout and why.

    A packed row needs a kernel that skips the other sequences (flash-attention varlen, flex
    block masks); with SDPA or eager it becomes one dense mask over the whole row. The shared
    prompt needs a custom 4D mask, which rules out the fused GPU kernels but costs nothing
    extra on CPU, where it saves the prompt's second pass (docs/training.md, the CPU table).
    """
    if train.layout != "auto":
        return train.layout, "layout set"
    shared = "shared_prompt" if train.share_prompt else "padded"
    if accelerator == "cpu":
        return shared, "CPU: the prompt once per pair" if train.share_prompt else "share_prompt off"
    if attention in ("flash_attention_2", "flex_attention"):
        return "packed", f"{attention} runs packed rows without padding"
    return "padded", f"{attention}: separate sequences keep the fused causal kernel"


def choose(
    train: TrainConfig,
    policy_dir: Path,
    world_size: int,
    *,
    accelerator: str,
    live_reference: bool,
    max_length: int,
    local_world_size: int | None = None,
    free_bytes: float | None = None,
) -> LaunchChoice:
    """Resolve ``train.ds_config / gradient_checkpointing / attention / layout`` for this launch.

    ``free_bytes``: per-rank free memory (default: measured, ``free_device_bytes``).
    """
    size = ModelSize.of(policy_dir)
    here = local_world_size or world_size
    free = free_bytes if free_bytes is not None else free_device_bytes(accelerator, here)
    gib = 2.0**30
    reasons: list[str] = []
    if train.ds_config != "auto":
        ds_config = train.ds_config
        stage = zero_stage_of(ds_config)
        reasons.append("ds_config set")
    else:
        bf16 = train.precision == "bf16"
        stage, why = choose_stage(size.params, world_size, accelerator, live_reference, free, bf16)
        ds_config = DS_CONFIGS[stage]
        reasons.append(why)
    numeric_stage = 3 if stage == "offload" else int(stage)
    states = (
        0.0
        if stage == "offload"
        else state_bytes(size.params, numeric_stage, world_size, live_reference)
    )
    tokens = 2 * train.per_device_batch_size * max_length
    attention = choose_attention(train.attention, accelerator)
    fused = accelerator == "cuda" and attention != "eager"
    if train.gradient_checkpointing != "auto":
        checkpointing = bool(train.gradient_checkpointing)
        reasons.append("gradient_checkpointing set")
    else:
        needed = activation_bytes(size, tokens, max_length, False, fused_attention=fused)
        checkpointing = states + needed > HEADROOM * free
        reasons.append(
            f"activations ~{needed / gib:.2f} GiB + states ~{states / gib:.2f} GiB "
            f"{'exceed' if checkpointing else 'fit in'} {HEADROOM:.0%} of {free / gib:.1f} GiB "
            f"free per rank: checkpointing {'on' if checkpointing else 'off'}"
        )
    layout, why_layout = choose_layout(train, accelerator, attention)
    reasons.append(why_layout)
    recompute = train.recompute_logits is not False
    reasons.append(
        "logits recomputed in backward"
        if train.recompute_logits == "auto"
        else f"recompute_logits set ({str(recompute).lower()})"
    )
    return LaunchChoice(ds_config, checkpointing, attention, layout, "; ".join(reasons), recompute)


def settings_choice(train: TrainConfig) -> LaunchChoice:
    """The settings as given, without measuring anything ("auto" as on one CPU rank): what a
    plan built by hand (tests, benches) trains with."""
    attention = choose_attention(train.attention, "cpu")
    layout, _ = choose_layout(train, "cpu", attention)
    ds_config = DS_CONFIGS[0] if train.ds_config == "auto" else train.ds_config
    checkpointing = train.gradient_checkpointing is True
    recompute = train.recompute_logits is not False
    return LaunchChoice(ds_config, checkpointing, attention, layout, "settings as given", recompute)


def choose_stage(
    params: int, world: int, accelerator: str, reference: bool, free: float, bf16: bool
) -> tuple[int | str, str]:
    """The ZeRO stage: the lightest that fits, then ZeRO-2 (optimizer state and gradients
    partitioned), ZeRO-3 (weights too), ZeRO-3 with CPU offload.

    On a GPU the lightest is ZeRO-1 in bf16: it is how DeepSpeed gives bf16 weights its bf16
    optimizer (fp32 master weights and gradient accumulation in flat buffers, one fused update).
    ZeRO-0 in bf16 takes DeepSpeed's fp16 path instead, which checks every parameter's gradient
    for overflow with a host sync each (272 a step for SmolLM2-135M), updates parameter by
    parameter and accumulates gradients in bf16. On one rank ZeRO-1 partitions nothing.
    """
    gib = 2.0**30
    if accelerator == "cpu":
        # Every CPU op waits for its result anyway, and on 2 cores ZeRO-0 measured faster and
        # leaner (docs/training.md, the CPU table). CPU ranks share one RAM: partitioning saves
        # memory every rank shares; ZeRO-3 is the previous default, kept (the CPU table).
        if world == 1:
            return 0, "one CPU rank: nothing to partition"
        return 3, f"{world} CPU ranks share the host's RAM: ZeRO-3"
    lightest = 1 if bf16 else 0
    if world == 1:
        # One rank partitions nothing: ZeRO-2 and ZeRO-3 would hold as much as the lightest
        # stage, so states too large for it can only move to host memory.
        need = state_bytes(params, lightest, 1, reference)
        if need <= HEADROOM * free:
            return lightest, "one rank: nothing to partition" + (
                "; bf16: ZeRO-1 for DeepSpeed's bf16 optimizer" if bf16 else ""
            )
        return "offload", (
            f"one rank: {params / 1e6:.0f}M parameters' states ~{need / gib:.1f} GiB exceed "
            f"{HEADROOM:.0%} of {free / gib:.1f} GiB free and one device partitions nothing: "
            "ZeRO-3 with CPU offload"
        )
    for stage in (lightest, 2, 3):
        need = state_bytes(params, stage, world, reference)
        if need <= HEADROOM * free:
            return stage, (
                f"{params / 1e6:.0f}M parameters: states ~{need / gib:.1f} GiB per device "
                f"under ZeRO-{stage} fit in {HEADROOM:.0%} of {free / gib:.1f} GiB free"
            )
    return "offload", f"{params / 1e6:.0f}M parameters exceed the devices even under ZeRO-3"


def zero_stage_of(path: str) -> int | str:
    """The ZeRO stage an explicit config file asks for ("offload" when it offloads)."""
    from pipeline.training.ds_config import find_ds_config

    try:
        zero = json.loads(find_ds_config(path).read_text()).get("zero_optimization", {})
    except (json.JSONDecodeError, AttributeError):
        return 3  # deepspeed_config reports the file's error
    if zero.get("offload_param") or zero.get("offload_optimizer"):
        return "offload"
    stage = zero.get("stage", 0)
    return stage if isinstance(stage, int) else 3


# -- the devices must be free before ranks start -------------------------------------------------

# Memory another process may hold on a device the ranks will use (a desktop, a monitor).
BUSY_DEVICE_BYTES = 2 * 2**30


def device_memory_readings() -> list[tuple[int, int, int]]:
    """(device, used bytes, total bytes) of each visible GPU from nvidia-smi, without creating a
    CUDA context in this process; [] on a machine without one (CPU ranks need no check)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = {v.strip() for v in visible.split(",")} if visible else None
    readings = []
    for line in out.strip().splitlines():
        index, used, total = (part.strip() for part in line.split(","))
        if wanted is None or index in wanted:
            readings.append((int(index), int(used) * 2**20, int(total) * 2**20))
    return readings


def check_devices_free(
    readings: list[tuple[int, int, int]], limit: int = BUSY_DEVICE_BYTES
) -> None:
    """Stop before launching ranks on a device another process holds (e.g. a vLLM engine left
    from generate in the same process: ``generation.release_vllm_engine``)."""
    busy = [(d, used) for d, used, _ in readings if used > limit]
    if busy:
        held = ", ".join(f"GPU {d}: {used / 2**30:.1f} GiB in use" for d, used in busy)
        raise TrainingError(
            f"train: devices not free before launching ranks ({held}); another process (a vLLM "
            "engine, a notebook) holds them. Stop it, or set CUDA_VISIBLE_DEVICES to free GPUs"
        )
