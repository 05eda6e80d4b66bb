"""Every DeepSpeed config in ds_configs/ with every reference mode (none, precomputed, live) and
every objective family (sequence log-probs, per-token KL, hidden states), 2 gloo ranks, fp32, two
steps each: all train, and each case's losses (after an update) agree across the configs (the
same maths, partitioned differently). The padding-free layout gives the padded layout's losses
with a live reference. One torchrun job (this file's ``__main__``) runs the whole matrix.

In-process: the launch's automatic choices (ZeRO stage from the memory estimate, gradient
checkpointing from the activation estimate, attention, layout) and the device check.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import distributed, training
from pipeline.cli import exit_cleanly
from pipeline.config import TrainConfig, load_config
from pipeline.runstore import RunStore
from tests.conftest import TINY
from tests.test_train import TRAIN_ARGS, _worker_plan, launched_report, pairs_root, run_with_pairs

__all__ = ["pairs_root"]  # the fixture, shared with test_train

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "ds_configs").glob("*.json"))
# (objective, train.reference, objective_args) -> the reference mode and family each covers
CASES: dict[str, dict[str, Any]] = {
    "simpo_none": {"objective": "simpo"},  # no reference
    "dpo_precomputed": {"objective": "dpo"},  # sequence log-probs, from pairs.parquet
    "dpo_live": {"objective": "dpo", "reference": "live"},
    "tdpo_live": {"objective": "tdpo"},  # per-token KL against the live reference
    # masks from the reference's hidden states (activation masks: never all zero, no dropout)
    "sparsepo_live": {"objective": "sparsepo", "objective_args": {"mask_source": "activations"}},
}
EXPECTED_MODE = {
    "simpo_none": "none",
    "dpo_precomputed": "precomputed",
    "dpo_live": "live",
    "tdpo_live": "live",
    "sparsepo_live": "live",
}
PACKED = ("dpo_live", "tdpo_live", "sparsepo_live")  # also run packed under ZeRO-3


@pytest.fixture(scope="module")
def matrix(pairs_root: dict[str, Any]) -> dict[str, Any]:
    return launched_report(pairs_root, Path(__file__), [], "matrix", timeout=600)


def test_every_ds_config_with_every_reference_mode_and_family(matrix: dict[str, Any]) -> None:
    assert set(DS_CONFIGS) >= {"ds_configs/zero0.json", "ds_configs/zero2.json"}
    assert set(matrix["runs"]) == {f"{ds}|{case}" for ds in DS_CONFIGS for case in CASES}
    for key, run in matrix["runs"].items():
        case = key.split("|")[1]
        assert run["reference"] == EXPECTED_MODE[case], key
        losses = [h["loss"] for h in run["history"]]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), key
        assert all(math.isfinite(h["grad_norm"]) for h in run["history"]), key


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_trains_alike_under_every_ds_config(matrix: dict[str, Any], case: str) -> None:
    """The second loss follows an update: the same under every config (fp32)."""
    first = matrix["runs"][f"{DS_CONFIGS[0]}|{case}"]["history"]
    assert first[1]["loss"] != first[0]["loss"], case  # the update changed something
    for ds in DS_CONFIGS[1:]:
        other = matrix["runs"][f"{ds}|{case}"]["history"]
        for a, b in zip(first, other, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (ds, case)


def test_packed_layout_trains_like_padded(matrix: dict[str, Any]) -> None:
    for case in PACKED:
        padded = matrix["runs"][f"ds_configs/zero3.json|{case}"]["history"]
        packed = matrix["packed"][case]["history"]
        for a, b in zip(padded, packed, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), case
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), case


# -- in-process: the launch's choices -----------------------------------------------------------


def _model_dir(pairs_root: dict[str, Any]) -> Path:
    cfg = run_with_pairs(pairs_root, "choice")
    return training.model_dirs(cfg, RunStore(cfg))[0]


def test_auto_choices_follow_the_memory_estimate(pairs_root: dict[str, Any]) -> None:
    from pipeline.training.resources import ModelSize, activation_bytes, state_bytes

    model = _model_dir(pairs_root)
    size = ModelSize.of(model)
    assert size.params > 0
    train = TrainConfig()
    assert train.ds_config == "auto" and train.gradient_checkpointing == "auto"

    def choice(world: int, free: float, accelerator: str = "cuda", **changes: Any) -> Any:
        t = train.model_copy(update=changes)
        return training.choose(
            t, model, world, accelerator=accelerator, live_reference=True, max_length=64,
            free_bytes=free,
        )  # fmt: skip

    plenty = 1e12
    one = choice(1, plenty)  # one process on one device: nothing to partition
    # bf16 (the default precision) on a GPU: DeepSpeed's bf16 optimizer, through ZeRO-1
    assert one.ds_config == "ds_configs/zero1.json" and "one rank" in one.reason
    assert choice(1, plenty, precision="fp32").ds_config == "ds_configs/zero0.json"
    # one device partitions nothing: states that do not fit it go to host memory
    alone = state_bytes(size.params, 1, 1, True)
    assert choice(1, alone / 0.79).ds_config == "ds_configs/zero1.json"
    too_small = choice(1, alone / 0.81)
    assert too_small.ds_config == "ds_configs/zero3_offload.json"
    assert "one device partitions nothing" in too_small.reason
    fp32_alone = state_bytes(size.params, 0, 1, True)
    assert choice(1, fp32_alone / 0.79, precision="fp32").ds_config == "ds_configs/zero0.json"
    assert (
        choice(1, fp32_alone / 0.81, precision="fp32").ds_config == "ds_configs/zero3_offload.json"
    )
    assert not one.gradient_checkpointing and "checkpointing off" in one.reason
    assert choice(4, plenty).ds_config == "ds_configs/zero1.json"  # everything fits
    assert choice(4, plenty, precision="fp32").ds_config == "ds_configs/zero0.json"
    # states fit only once the optimizer state and gradients are partitioned
    lightest = state_bytes(size.params, 1, 4, True)
    zero2 = state_bytes(size.params, 2, 4, True)
    assert zero2 < lightest < state_bytes(size.params, 0, 4, True)
    assert choice(4, zero2 / 0.79).ds_config == "ds_configs/zero2.json"
    # ... only once the weights are partitioned too
    zero3 = state_bytes(size.params, 3, 4, True)
    picked = choice(4, zero3 / 0.79)
    assert picked.ds_config == "ds_configs/zero3.json"
    assert picked.gradient_checkpointing  # no room left for activations
    assert choice(4, zero3 / 2).ds_config == "ds_configs/zero3_offload.json"
    # checkpointing follows the activation estimate
    tokens = 2 * train.per_device_batch_size * 64
    act = activation_bytes(size, tokens, 64, checkpointing=False, fused_attention=True)
    assert choice(1, (alone + act) / 0.79).gradient_checkpointing is False
    assert choice(1, (alone + act) / 0.81).gradient_checkpointing is True
    # explicit settings win; CPU ranks share the host's RAM (ZeRO-3, the measured default)
    set_ = choice(4, 1.0, ds_config="ds_configs/zero2.json", gradient_checkpointing=False)
    assert (set_.ds_config, set_.gradient_checkpointing) == ("ds_configs/zero2.json", False)
    assert choice(1, plenty, accelerator="cpu").ds_config == "ds_configs/zero0.json"
    assert choice(2, plenty, accelerator="cpu").ds_config == "ds_configs/zero3.json"
    # attention and layout: packed rows need a kernel that skips other sequences
    assert choice(1, plenty, accelerator="cpu").layout == "shared_prompt"
    assert choice(1, plenty, accelerator="cpu", share_prompt=False).layout == "padded"
    assert choice(1, plenty, attention="flash_attention_2").layout == "packed"
    assert choice(1, plenty, attention="sdpa").layout == "padded"
    assert choice(1, plenty, accelerator="cpu", layout="packed").layout == "packed"
    assert one.line.startswith("[train] ds_config=ds_configs/zero1.json ")
    # logits: recomputed in backward unless set (keeping them gave no speed on an H200)
    assert one.recompute_logits and "logits recomputed" in one.reason
    assert choice(1, plenty, accelerator="cpu").recompute_logits
    kept = choice(1, plenty, recompute_logits=False)
    assert not kept.recompute_logits and "recompute_logits set" in kept.reason


def test_launch_records_the_choice_and_checks_devices(pairs_root: dict[str, Any]) -> None:
    cfg = run_with_pairs(pairs_root, "recorded")
    plan = training.make_plan(cfg, RunStore(cfg), 2)
    assert plan.launch.ds_config == "ds_configs/zero3.json"  # 2 CPU ranks
    assert plan.ds_config["zero_optimization"]["stage"] == 3
    result = training.TrainResult(1, 0.5, 0, {}, Path("m"), 1.0, 1.0, [])
    ranks = distributed.Ranks(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0)
    recorded = training.summary(plan, result, [], ranks, None)["launch_choice"]
    assert recorded == plan.launch.as_dict() and recorded["reason"]
    training.check_devices_free(training.device_memory_readings())  # this machine: free
    training.check_devices_free([(0, 2**29, 80 * 2**30)])  # a CUDA context's worth is fine
    with pytest.raises(training.TrainingError, match=r"GPU 1: 68\.0 GiB in use"):
        training.check_devices_free([(0, 0, 80 * 2**30), (1, 68 * 2**30, 80 * 2**30)])


# -- the torchrun worker ---------------------------------------------------------------------------


def _matrix_worker(root: str, cache: str, name: str, out: str) -> None:
    ranks = distributed.init_process_group(10)
    cfg = load_config(TINY, [f"root={root}", f"cache_dir={cache}", f"name={name}", *TRAIN_ARGS])
    store = RunStore(cfg)

    def train(**changes: Any) -> dict[str, Any]:
        import torch

        torch.manual_seed(0)  # SparsePO's mask head is initialised from the global generator
        plan = _worker_plan(cfg, store, ranks.world_size, max_steps=2, **changes)
        trainer = training.Trainer(plan, ranks)
        started = time.time()
        try:
            trainer.build()
            result = trainer.fit()
        finally:
            trainer.close()
        return {
            "history": result.history,
            "reference": plan.reference_mode,
            "seconds": time.time() - started,
        }

    report: dict[str, Any] = {"runs": {}, "packed": {}}
    for ds in DS_CONFIGS:
        for case, changes in CASES.items():
            report["runs"][f"{ds}|{case}"] = train(ds_config=ds, **changes)
    for case in PACKED:
        report["packed"][case] = train(
            ds_config="ds_configs/zero3.json", layout="packed", **CASES[case]
        )
    if ranks.is_main:
        Path(out).write_text(json.dumps(report))
    distributed.teardown()
    exit_cleanly(0)


if __name__ == "__main__":
    _matrix_worker(*sys.argv[1:5])


def test_shared_prompt_check_compares_in_fp32_and_names_the_attention(
    pairs_root: dict[str, Any],
) -> None:
    """The check runs both layouts on a float32 copy of the policy: a bf16 run passes on valid
    data (no bf16 rounding compared against a fixed limit); an attention that ignores custom
    4D masks (registered here the way Hugging Face registers kernels) stops with its name."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def ignores_masks(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
        return sdpa_attention_forward(module, q, k, v, None, **{**kw, "is_causal": True})

    AttentionInterface.register("ignores_masks", ignores_masks)
    cfg = run_with_pairs(pairs_root, "shared", "train.precision=bf16")
    ranks = distributed.Ranks(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0)
    plan = training.make_plan(cfg, RunStore(cfg), 1)
    assert plan.launch.layout == "shared_prompt" and plan.dtype == torch.bfloat16
    training.Trainer(plan, ranks).check_shared_prompt()  # valid data: passes
    broken = training.LaunchChoice(
        plan.launch.ds_config, False, "ignores_masks", "shared_prompt", "test"
    )
    plan.choice = broken
    with pytest.raises(training.TrainingError, match=r"attention 'ignores_masks'.*float32"):
        training.Trainer(plan, ranks).check_shared_prompt()
