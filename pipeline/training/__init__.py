"""MI-DPO training on DeepSpeed: data, order, engines, the step loop, checkpoints, export.

Read in this order:

1. ``pairs``: the score stage's pairs, truncated to the model's limits (keep the prompt's end and
   the response's start, and count), checked row by row (``load_pairs``).
2. ``batching``: a deterministic order from (seed, epoch), global batches cut into micro-batches
   of neighbouring lengths (the last, uneven batch kept), padded by ``collate``, with the layout
   the decoder runs on: each pair's prompt once followed by both responses (``pack_pairs``), or
   every sequence in one row without padding (``pack_sequences``).
3. ``ds_config``: the DeepSpeed JSON, "auto" values filled from the run config;
   ``resources``: ``train.*: auto`` resolved for the hardware at launch (ZeRO stage, gradient
   checkpointing, attention, layout) and the check that the devices are free.
4. ``plan``: ``make_plan`` resolves data, model folders, the reference mode and the DeepSpeed
   config before any process starts; ``TrainPlan`` is what every rank trains from.
5. ``modules``: what the engines wrap (``PolicyModule``: the LM and the objective;
   ``ReferenceModule``; ``PromptFreeModule``).
6. ``engines``: the policy engine (model group + prior group), the frozen reference (only for a
   live reference: a plain module, or a ZeRO-3 engine), the marginal prior engine (its own maximum-likelihood steps).
7. ``checkpoints``: save with a completion marker of sha256 digests, resume from the newest
   intact checkpoint (falling back to the previous one).
8. ``export``: the Hugging Face folder, reloaded and compared with the engine.
9. ``trainer``: ``Trainer``, the step loop (metric means over the global batch, NaN stop).
"""

from __future__ import annotations

from pipeline.training.batching import (
    LAYOUTS,
    SHARED_PROMPT_TOLERANCE,
    MicroBatch,
    collate,
    epoch_batches,
    pack_pairs,
    pack_sequences,
    shared_prompt_mask,
    split_global_batch,
)
from pipeline.training.checkpoints import (
    CHECKPOINT_MARKER,
    Checkpoints,
    checkpoint_dir,
    drop_resumable_checkpoints,
    prepare_checkpoint_dir,
    read_latest,
)
from pipeline.training.ds_config import (
    MIN_BUCKET_ELEMENTS,
    deepspeed_config,
    find_ds_config,
    frozen_engine_config,
)
from pipeline.training.engines import (
    Engines,
    build_engines,
    lr_lambda,
    model_parameter_groups,
    partition_report,
    policy_parameter_groups,
    prior_learning_rate,
)
from pipeline.training.errors import TrainingError
from pipeline.training.export import export_check, gathered_state_dict
from pipeline.training.modules import (
    ObjectiveCall,
    PolicyModule,
    PromptFreeModule,
    ReferenceModule,
    ReferenceOutputs,
    decoder_outputs,
    prompt_free_logps,
    release_freed_memory,
    response_logps,
    restore_float32_buffers,
    scatter_prompt_free,
)
from pipeline.training.pairs import (
    PairData,
    TruncationReport,
    check_vocabulary,
    load_pairs,
    truncate_pair,
)
from pipeline.training.plan import (
    TrainPlan,
    TrainResult,
    choose_reference,
    make_plan,
    model_dirs,
    summary,
)
from pipeline.training.resources import (
    LaunchChoice,
    check_devices_free,
    choose,
    device_memory_readings,
    settings_choice,
)
from pipeline.training.trainer import Trainer

__all__ = [
    "LAYOUTS",
    "LaunchChoice",
    "check_devices_free",
    "choose",
    "device_memory_readings",
    "pack_sequences",
    "response_logps",
    "settings_choice",
    "CHECKPOINT_MARKER",
    "MIN_BUCKET_ELEMENTS",
    "SHARED_PROMPT_TOLERANCE",
    "Checkpoints",
    "Engines",
    "MicroBatch",
    "ObjectiveCall",
    "PairData",
    "PolicyModule",
    "PromptFreeModule",
    "ReferenceModule",
    "ReferenceOutputs",
    "TrainPlan",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "TruncationReport",
    "build_engines",
    "check_vocabulary",
    "checkpoint_dir",
    "choose_reference",
    "collate",
    "decoder_outputs",
    "deepspeed_config",
    "epoch_batches",
    "export_check",
    "find_ds_config",
    "frozen_engine_config",
    "gathered_state_dict",
    "load_pairs",
    "lr_lambda",
    "make_plan",
    "model_dirs",
    "model_parameter_groups",
    "pack_pairs",
    "partition_report",
    "policy_parameter_groups",
    "drop_resumable_checkpoints",
    "prepare_checkpoint_dir",
    "prior_learning_rate",
    "prompt_free_logps",
    "read_latest",
    "release_freed_memory",
    "restore_float32_buffers",
    "scatter_prompt_free",
    "shared_prompt_mask",
    "split_global_batch",
    "summary",
    "truncate_pair",
]
