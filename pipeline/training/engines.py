"""One rank's DeepSpeed engines, built from a plan, and what each gives for a micro-batch.

- the **policy** engine (``PolicyModule``: the LM and the objective); its optimizer has a model
  group (weight decay on matrices), a no-decay group and the prior's group (own learning rate);
- the frozen **reference**, only when the plan's reference is "live": a plain module in inference
  mode, or under ZeRO-3 an engine without optimizer (its weights stay partitioned);
- the **marginal prior** engine (``PromptFreeModule``), only for an objective whose prompt-free
  log-probs come from a separate model; its own optimizer takes maximum-likelihood steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import distributed
from pipeline.config import TrainConfig
from pipeline.objectives import POLICY_LR, MIDPOObjective, split_for_weight_decay
from pipeline.training.batching import MicroBatch
from pipeline.training.ds_config import frozen_engine_config
from pipeline.training.modules import (
    ObjectiveCall,
    PolicyModule,
    PromptFreeModule,
    ReferenceModule,
    layer_classes,
    release_freed_memory,
    restore_float32_buffers,
)
from pipeline.training.pairs import check_vocabulary
from pipeline.training.plan import TrainPlan

# -- optimizer and schedule ----------------------------------------------------------------------


def lr_lambda(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier for optimizer step s (0-based): linear warmup, then decay.

    Warmup starts at 1/(w+1), not 0, so the first step already learns.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return fn


def prior_learning_rate(train: TrainConfig, objective: MIDPOObjective) -> float:
    """The prior groups' LR: ``objective_args.prior_lr`` if given; the policy's for an objective
    whose parts train with the policy (SparsePO's mask heads); else train.prior_learning_rate."""
    given = train.objective_args.get("prior_lr")
    if given is not None:
        return float(given)
    return train.learning_rate if objective.prior_lr == POLICY_LR else train.prior_learning_rate


def model_parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, exclude: nn.Module | None = None
) -> list[dict[str, Any]]:
    """The model's trainable weights: decay on matrices only; ``exclude``'s parameters left out."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    decay, no_decay = split_for_weight_decay(
        p for p in model.parameters() if p.requires_grad and id(p) not in skip
    )
    groups: list[dict[str, Any]] = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "model_no_decay"},
    ]
    return [g for g in groups if g["params"]]


def policy_parameter_groups(
    module: PolicyModule, objective: MIDPOObjective, train: TrainConfig
) -> list[dict[str, Any]]:
    """The model's groups, then the prior's ("prior": its rate is logged as ``lr/prior``)."""
    model = model_parameter_groups(
        module, train.learning_rate, train.weight_decay, exclude=objective
    )
    prior = objective.parameter_groups(lr=prior_learning_rate(train, objective))
    return model + [{**group, "name": "prior"} for group in prior]


def make_optimizer(
    groups: list[dict[str, Any]], lr: float, ds_config: dict[str, Any]
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (``lr``: the default of groups that name none)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device") == "cpu" and distributed.accelerator_name() != "cpu":
        # Optimizer states on the CPU of a GPU node: DeepSpeed's vectorised CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    # Fused AdamW: ZeRO hands the optimizer one flat tensor per group, and the default
    # "foreach" kernels allocate several temporaries of that size at every step (+1.5 GB
    # peak for a 135M model); the fused kernel updates in place.
    return torch.optim.AdamW(groups, lr=lr, fused=True)


# -- models --------------------------------------------------------------------------------------


def load_lm(
    folder: Path,
    dtype: torch.dtype,
    train: bool,
    gradient_checkpointing: bool,
    attention: str = "sdpa",
    compile_blocks: bool = False,
) -> Any:
    """A causal LM for an engine: trainable, or frozen in eval mode; ``compile_blocks``: each
    transformer block compiled (``train.compile``)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attention
    )
    restore_float32_buffers(lm)
    lm.config.use_cache = False
    if train and gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not train:
        lm.requires_grad_(False)
        lm.eval()
    if compile_blocks:
        # Regional compilation: the blocks share one graph (their parameters are its inputs),
        # so 30 blocks compile once, not 30 times, and the state dict keeps its names.
        blocks = tuple(layer_classes(lm))
        for module in lm.modules():
            if isinstance(module, blocks):
                module.compile()
    return lm


def partition_report(module: nn.Module) -> dict[str, Any]:
    """How much of each parameter this rank holds (ZeRO-3: about 1/world of each)."""
    fractions: list[float] = []
    local = full = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        held = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        local += held
        full += numel
        fractions.append(held / max(1, numel))
    return {
        "params": len(fractions),
        "local_numel": local,
        "full_numel": full,
        "min_fraction": min(fractions, default=0.0),
        "max_fraction": max(fractions, default=0.0),
    }


def skip_single_rank_reduction(engine: Any, world_size: int) -> None:
    """One rank has nothing to reduce, but a ZeRO-0/1 engine would still flatten every gradient
    into buckets, "all-reduce" them and copy them back: a transient copy of all gradients (0.5 GB
    in fp32 for a 135M model) and two passes over them a step. ZeRO-2/3 reduce in their own
    hooks, which partition the gradients: left as they are."""
    if world_size == 1 and engine.zero_optimization_stage() < 2:
        engine.enable_backward_allreduce = False


# -- the engines ---------------------------------------------------------------------------------


@dataclass
class Engines:
    """One rank's engines (DeepSpeed engines are typed ``Any``: DeepSpeed has no stubs)."""

    objective: MIDPOObjective
    tokenizer: Any
    pad_id: int
    lm: Any  # the policy's causal LM (what is exported)
    policy: Any  # engine around PolicyModule
    optimizer: Any
    scheduler: Any
    group_names: list[str]  # the policy optimizer's parameter groups, in order
    # The live reference: a plain ReferenceModule in inference (it fits on each device), or a
    # ZeRO-3 engine around it where the weights must stay partitioned.
    reference: Any | None = None
    marginal: Any | None = None  # engine around PromptFreeModule (marginal prior model)
    # While this lives, from_pretrained builds ZeRO-3 models already partitioned (zero.Init).
    hf_ds_config: Any = None
    fp32_grad_norm: Tensor | None = None  # see note_grad_norm

    def reference_outputs(self, batch: MicroBatch) -> dict[str, Tensor | None] | None:
        """The live reference's log-probs or hidden states for ``batch`` (None without one)."""
        if self.reference is None:
            return None
        distribution = self.objective.needs_reference_distribution
        with torch.no_grad():
            out: dict[str, Tensor | None] = self.reference(
                batch.as_dict(),
                want_logps=not distribution,
                want_hidden=distribution,
                hidden_layers=self.objective.reference_layers,
            )
        return out

    @property
    def reference_head(self) -> nn.Module | None:
        """The reference's LM head (the policy computes KL chunks with it)."""
        return self.reference_module.head if self.reference_module is not None else None

    @property
    def reference_module(self) -> ReferenceModule | None:
        if self.reference is None:
            return None
        module: ReferenceModule = getattr(self.reference, "module", self.reference)
        return module

    def marginal_logps(self, batch: MicroBatch) -> tuple[Tensor, Tensor] | None:
        """The marginal prior model's prompt-free (logps, mask), no gradient (None without one)."""
        if self.marginal is None:
            return None
        with torch.no_grad():
            out: tuple[Tensor, Tensor] = self.marginal(batch.as_dict())
        return out

    def policy_logps(self, batches: list[MicroBatch]) -> list[Tensor]:
        """Per-token log-probs of each batch under the policy, in eval mode, no gradient."""
        self.policy.eval()
        with torch.no_grad():
            out = [self.policy(batch.as_dict(), mode="logps") for batch in batches]
        self.policy.empty_partition_cache()  # no-grad passes can leave blocks gathered
        self.policy.train()
        return out

    def learning_rates(self) -> list[float]:
        """Each parameter group's learning rate for the coming step."""
        lrs: list[float] = self.scheduler.get_last_lr()
        return lrs

    def note_grad_norm(self) -> None:
        """Before the update: keep the gradient norm where the engine does not (ZeRO stage 0 in
        float32 clips without recording it); a device tensor, read with the step's metrics."""
        if self.policy.zero_optimization_stage() == 0 and not self.policy.bfloat16_enabled():
            # accumulated in float64, as DeepSpeed's ZeRO norms are (float32 sums drift ~1e-5)
            norms = [
                torch.linalg.vector_norm(p.grad, dtype=torch.float64)
                for p in self.policy.module.parameters()
                if p.grad is not None
            ]
            self.fp32_grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def step_figures(self, lrs: list[float]) -> dict[str, float]:
        """The policy step's gradient norm and learning rates ("lr", "lr/prior")."""
        norm = self.policy.get_global_grad_norm()
        if norm is None:
            norm = self.fp32_grad_norm
        out = {"grad_norm": float(norm) if norm is not None else float("nan")}
        for name, lr in zip(self.group_names, lrs, strict=False):
            if name != "model_no_decay":
                out["lr" if name == "model" else f"lr/{name}"] = float(lr)
        return out

    def partition(self) -> dict[str, Any]:
        """How much of each engine's parameters this rank holds."""
        out: dict[str, Any] = {"policy": partition_report(self.policy.module.lm)}
        if self.reference is not None:
            out["reference"] = partition_report(self.reference)
        if self.marginal is not None:
            out["marginal_prior"] = partition_report(self.marginal.module)
        return out

    def end_zero_init(self) -> None:
        """From here on from_pretrained builds ordinary (unpartitioned) models."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        self.hf_ds_config = None


def build_engines(plan: TrainPlan) -> Engines:
    """Load the models and wrap them in engines (every rank; ZeRO-3 partitions as it loads)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.models import load_tokenizer

    t, ds, objective = plan.train, plan.ds_config, plan.objective
    tokenizer = load_tokenizer(plan.policy_dir)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    hf_ds_config = HfDeepSpeedConfig(ds)  # before any model is loaded: no rank holds a full copy
    total = plan.total_steps
    schedule = lr_lambda(t.lr_scheduler, total, int(t.warmup_ratio * total))

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    launch = plan.launch
    lm = load_lm(
        plan.policy_dir,
        plan.dtype,
        True,
        launch.gradient_checkpointing,
        launch.attention,
        t.compile,
    )
    check_vocabulary(plan.data, int(lm.config.vocab_size))
    module = PolicyModule(lm, objective, t.token_chunk_size, launch.recompute_logits)
    # The objective's few prior parameters are gathered together when it is called.
    set_z3_leaf_modules(module, [ObjectiveCall, *layer_classes(lm)])
    groups = policy_parameter_groups(module, objective, t)
    policy, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=module,
        optimizer=make_optimizer(groups, t.learning_rate, ds),
        config=ds,
        lr_scheduler=scheduler,
    )
    skip_single_rank_reduction(policy, plan.world_size)
    engines = Engines(
        objective=objective,
        tokenizer=tokenizer,
        pad_id=pad_id,
        lm=lm,
        policy=policy,
        optimizer=optimizer,
        scheduler=lr_scheduler,
        group_names=[g["name"] for g in groups],
        hf_ds_config=hf_ds_config,
    )

    if plan.reference_mode == "live":
        ref_lm = load_lm(plan.reference_dir, plan.dtype, False, False, launch.attention, t.compile)
        reference = ReferenceModule(ref_lm, t.token_chunk_size)
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            # the weights stay partitioned: an inference engine gathers them layer by layer
            engines.reference, *_ = deepspeed.initialize(
                model=reference, config=frozen_engine_config(ds)
            )
        else:
            # it fits: a plain module, no engine (ZeRO-1/2 engines refuse to run without an
            # optimizer, and one adds hooks for nothing)
            engines.reference = reference.to(distributed.current_device())
        engines.reference.eval()

    if objective.marginal_source == "prompt_free_model":
        # Lemma 1's prior: a prompt-free copy of the reference, fitted to the policy's
        # responses by maximum likelihood with its own optimizer.
        m_lm = load_lm(
            plan.reference_dir,
            plan.dtype,
            True,
            launch.gradient_checkpointing,
            launch.attention,
            t.compile,
        )
        m_module = PromptFreeModule(m_lm, t.token_chunk_size, launch.recompute_logits)
        m_lr = t.marginal_prior_learning_rate or t.learning_rate
        m_groups = model_parameter_groups(m_module, m_lr, t.weight_decay)
        engines.marginal, *_ = deepspeed.initialize(
            model=m_module,
            optimizer=make_optimizer(m_groups, t.learning_rate, ds),
            config=ds,
            lr_scheduler=scheduler,
        )
        skip_single_rank_reduction(engines.marginal, plan.world_size)
    release_freed_memory()
    return engines
