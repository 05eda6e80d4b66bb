"""The end of training: a consolidated Hugging Face folder, reloaded and checked against the engine.

Rank 0 writes the folder from the gathered (unpartitioned) weights; the folder is then reloaded
with plain transformers, and its sequence log-probs on a few pairs must equal the engine's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import distributed
from pipeline.objectives import response_token_stats
from pipeline.training.batching import MicroBatch
from pipeline.training.engines import Engines
from pipeline.training.errors import TrainingError
from pipeline.training.modules import decoder
from pipeline.training.plan import TrainPlan


def gathered_state_dict(module: nn.Module, is_main: bool) -> dict[str, Tensor]:
    """The full state dict on rank 0 (empty elsewhere), gathered one parameter at a time.

    Works for any ZeRO stage (GatheredParameters is a no-op for unpartitioned parameters); all
    ranks must call it. Tied parameters appear once, under their first name.
    """
    import deepspeed

    state: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().to("cpu", copy=True)
    if is_main:
        non_persistent = {
            f"{m}.{b}".lstrip(".")
            for m, sub in module.named_modules()
            for b in getattr(sub, "_non_persistent_buffers_set", ())
        }
        for name, buf in module.named_buffers():
            if name not in non_persistent:
                state[name] = buf.detach().to("cpu", copy=True)
    return state


def sequence_logps(engines: Engines, batch: MicroBatch) -> Tensor:
    """Each sequence's summed response log-prob under the policy engine (float64, on the CPU)."""
    (token_logps,) = engines.policy_logps([batch])
    return (token_logps * batch.response_mask).sum(dim=1).double().cpu()


def export(plan: TrainPlan, engines: Engines, probe: MicroBatch, is_main: bool) -> dict[str, Any]:
    """Consolidated Hugging Face folder on rank 0, then reload it and compare log-probs.

    ``probe``: a few pairs as separate sequences, as the reload check computes them (in bf16 the
    shared-prompt layout rounds differently; it is checked against this one before training).
    Every rank calls this; rank 0 returns the check (``export_check``), the others {}.
    """
    engine_logps = sequence_logps(engines, probe)
    state = gathered_state_dict(engines.lm, is_main)
    engines.end_zero_init()
    check: dict[str, Any] = {}
    out = plan.output_dir
    if is_main and out is not None:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engines.lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        engines.tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
        check = export_check(
            out,
            probe.to(torch.device("cpu")),
            engine_logps,
            probe.pair_ids,
            plan.dtype,
            plan.train.token_chunk_size,
        )
    distributed.barrier()
    return check


def export_check(
    folder: Path,
    batch: MicroBatch,
    engine_logps: Tensor,
    ids: list[str],
    dtype: torch.dtype,
    chunk_size: int,
) -> dict[str, Any]:
    """Reload the exported folder with plain transformers; its log-probs must match the engine's."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    lm.eval()
    with torch.no_grad():
        hidden = decoder(lm)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        stats = response_token_stats(
            hidden,
            batch.input_ids,
            batch.response_mask,
            lm.get_output_embeddings(),
            chunk_size=chunk_size,
        )
    reloaded = (stats.logps * batch.response_mask).sum(dim=1).double()
    diff = float((reloaded - engine_logps).abs().max())
    scale = float(engine_logps.abs().max()) + 1.0
    # Same weights, same inputs: only kernel and threading differences remain.
    tolerance = (1e-3 if dtype == torch.bfloat16 else 1e-4) * scale
    result = {
        "pair_ids": ids,
        "engine_logps": engine_logps.tolist(),
        "reloaded_logps": reloaded.tolist(),
        "max_abs_diff": diff,
        "tolerance": tolerance,
    }
    if not diff <= tolerance:
        raise TrainingError(
            f"exported model {folder} does not reproduce the engine's log-probs "
            f"(max difference {diff:.3g} > {tolerance:.3g})"
        )
    return result
