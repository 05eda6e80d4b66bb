"""The MI-DPO loss with a composable prior.

    J = -E log sigmoid( beta * [log pi(y_w|x) - log zeta(y_w)] - beta * [log pi(y_l|x) - log zeta(y_l)] )

(the paper writes the multiplier as alpha = 1/beta_paper; here ``beta`` is the multiplier itself,
as in DPO). log zeta is the sum of the prior terms' contributions. Optional conservative-DPO label
smoothing eps replaces -log sig(z) by -(1 - eps) log sig(z) - eps log sig(-z).

The pair-level arithmetic runs in float64 (``compute_dtype``): inputs are ``[B, T]``, so this costs
nothing next to the model, and composing terms (e.g. l - (1 - 1/|y|) l for SimPO) loses no
precision. Outputs are float32 (or the inputs' dtype if wider).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import PairBatch, field_names, response_masks, validate_batch
from .priors import PriorContribution, PriorSpec, PriorTerm, ResponseSide, build_prior_term


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar: mean over pairs (+ sft term if any)
    losses: Tensor  # [B] per-pair loss
    chosen_rewards: Tensor  # [B] beta * (log pi(y_w) - log zeta(y_w)), detached
    rejected_rewards: Tensor  # [B]
    log_prior_chosen: Tensor  # [B] log zeta(y_w), detached
    log_prior_rejected: Tensor  # [B]
    metrics: dict[str, float]
    logits: Tensor  # [B] chosen_rewards - rejected_rewards (before label smoothing), detached


# Optional fields that can only be filled with the live reference distribution (full vocabulary).
_REFERENCE_DISTRIBUTION_FIELDS = field_names(["kl", "reverse_kl"])
# A ``prior_lr``: the policy's learning rate (parts trained in the policy's optimizer group, as
# SparsePO's trainer trains its mask heads).
POLICY_LR = "policy"


def split_for_weight_decay(
    params: Iterable[nn.Parameter],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices, the rest): weight decay goes on matrices only, as transformers' Trainer decays
    (no biases, no norms). ZeRO-3 leaves a partitioned parameter's shape in ``ds_shape``."""
    matrices: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in params:
        (matrices if len(getattr(p, "ds_shape", p.shape)) >= 2 else rest).append(p)
    return matrices, rest


class MIDPOObjective(nn.Module):
    """MI-DPO loss with prior ``log zeta = sum(term for term in prior)``.

    ``objective.parameters()`` are the prior's learnable parameters (learnable family, SparsePO mask
    heads); give them their own optimizer groups (``parameter_groups``): ``prior_lr`` (a rate,
    ``POLICY_LR``, or None for the optimizer's default) and ``prior_weight_decay`` (on matrices).
    """

    def __init__(
        self,
        beta: float,
        prior: Sequence[PriorSpec] = (),
        *,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        name: str = "mi-dpo",
        hparams: Mapping[str, Any] | None = None,
        prior_lr: float | str | None = None,
        prior_weight_decay: float = 0.0,
        compute_dtype: torch.dtype = torch.float64,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta: expected a number > 0, got {beta!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected 0 <= eps < 0.5, got {label_smoothing!r}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight: expected >= 0, got {sft_weight!r}")
        if isinstance(prior, (str, Mapping, PriorTerm)):
            prior = [prior]
        self.beta = float(beta)
        self.prior = nn.ModuleList(build_prior_term(term) for term in prior)
        self.label_smoothing = float(label_smoothing)
        self.sft_weight = float(sft_weight)
        self.name = name
        self.hparams: dict[str, Any] = dict(hparams or {"beta": beta})
        if not (prior_lr is None or prior_lr == POLICY_LR or isinstance(prior_lr, (int, float))):
            raise ValueError(f"prior_lr: expected a number or {POLICY_LR!r}, got {prior_lr!r}")
        if prior_weight_decay < 0:
            raise ValueError(f"prior_weight_decay: expected >= 0, got {prior_weight_decay!r}")
        self.prior_lr = prior_lr
        self.prior_weight_decay = float(prior_weight_decay)
        self.compute_dtype = compute_dtype
        self.validate = validate

    # --- what the train stage needs to know -------------------------------------------------

    @property
    def terms(self) -> list[PriorTerm]:
        return [term for term in self.prior if isinstance(term, PriorTerm)]

    @property
    def requires(self) -> frozenset[str]:
        """Optional PairBatch fields this objective reads (the four logps/mask fields always)."""
        return field_names(set().union(*(term.needs for term in self.terms)))

    @property
    def accepts(self) -> frozenset[str]:
        """`requires` plus optional fields read when given (e.g. chosen_marginal_mask)."""
        return self.requires | field_names(set().union(*(term.optional for term in self.terms)))

    @property
    def needs_reference_distribution(self) -> bool:
        """True if the live reference model is needed per step (full-vocabulary KL)."""
        return bool(self.requires & _REFERENCE_DISTRIBUTION_FIELDS)

    @property
    def needs_reference_logps(self) -> bool:
        """True if reference token log-probs are read (precomputable unless KL is needed too)."""
        return bool(self.requires & field_names(["ref_logps"]))

    @property
    def needs_reference_hidden(self) -> bool:
        """True if reference hidden states are read (SparsePO masks)."""
        return bool(self.requires & field_names(["ref_hidden"]))

    @property
    def needs_marginal_logps(self) -> bool:
        """True if prompt-free log-probs are read (PMI margin, marginal prior)."""
        return bool(self.requires & field_names(["marginal_logps"]))

    @property
    def needs_token_weights(self) -> bool:
        """True if per-token weights are read (TIS-DPO; SparsePO with given masks)."""
        return bool(self.requires & field_names(["weights"]))

    @property
    def reference_layers(self) -> int:
        """How many of the reference's last hidden layers are read (0 when none)."""
        return max((term.reference_layers for term in self.terms), default=0)

    @property
    def needs_live_reference(self) -> bool:
        """True if the reference model must run at every step: its full distribution (KL) or
        its hidden states are read, which no precomputed log-probs can serve."""
        return self.needs_reference_distribution or self.reference_layers > 0

    @property
    def needs_reference(self) -> bool:
        """True if the reference model is read at all (live, or as precomputed log-probs)."""
        return self.needs_reference_logps or self.needs_live_reference

    @property
    def marginal_source(self) -> str | None:
        """Where prompt-free log-probs come from ("policy", "prompt_free_model"); None if unread."""
        if not self.needs_marginal_logps:
            return None
        return next((t.marginal_source for t in self.terms if t.marginal_source), "policy")

    def prior_parameter_summary(self) -> dict[str, float]:
        """Current values of the learnable prior quantities, for logging."""
        summary: dict[str, float] = {}
        for index, term in enumerate(self.terms):
            for key, value in term.parameter_summary().items():
                summary[f"prior/{term.kind}{index}/{key}"] = value
        return summary

    def parameter_groups(
        self, lr: float | None = None, weight_decay: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the prior (empty if nothing is learnable): weight decay
        (default ``prior_weight_decay``) on matrices only, as transformers' Trainer decays (no
        biases, no norms); the rate ``lr``, else ``prior_lr`` when it is a number (else the
        optimizer's default: the policy's, in the policy's optimizer)."""
        decay = self.prior_weight_decay if weight_decay is None else weight_decay
        group_lr = lr if lr is not None else self.prior_lr
        matrices, rest = split_for_weight_decay(p for p in self.parameters() if p.requires_grad)
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((matrices, decay), (rest, 0.0))
            if params
        ]
        if isinstance(group_lr, (int, float)):
            for group in groups:
                group["lr"] = float(group_lr)
        return groups

    # --- the loss ---------------------------------------------------------------------------

    def _side(self, batch: PairBatch, role: str, mask: Tensor) -> ResponseSide:
        logps = getattr(batch, f"{role}_logps").to(self.compute_dtype)
        zero = torch.zeros((), dtype=self.compute_dtype, device=logps.device)
        return ResponseSide(
            role=role,  # type: ignore[arg-type]
            batch=batch,
            mask=mask,
            logps=torch.where(mask, logps, zero),
            dtype=self.compute_dtype,
        )

    def forward(self, batch: PairBatch) -> ObjectiveOutput:
        if self.validate:
            validate_batch(batch, self.requires, self.name)
        chosen_mask, rejected_mask = response_masks(batch)
        chosen = self._side(batch, "chosen", chosen_mask)
        rejected = self._side(batch, "rejected", rejected_mask)

        contributions = [term(chosen, rejected) for term in self.terms]
        zero = torch.zeros_like(chosen.lengths)
        log_prior_chosen = sum((c.log_prior for c, _ in contributions), zero)
        log_prior_rejected = sum((r.log_prior for _, r in contributions), zero)

        chosen_rewards = self.beta * (chosen.sequence_logps - log_prior_chosen)
        rejected_rewards = self.beta * (rejected.sequence_logps - log_prior_rejected)
        logits = chosen_rewards - rejected_rewards
        eps = self.label_smoothing
        losses = -F.logsigmoid(logits)
        if eps:
            losses = (1.0 - eps) * losses - eps * F.logsigmoid(-logits)
        for c, r in contributions:
            for part in (c, r):
                if part.penalty is not None:
                    losses = losses + part.penalty
        loss = losses.mean()
        sft_loss = None
        if self.sft_weight:
            # SimPO's sft_weight: token-mean NLL of the chosen responses over the batch.
            sft_loss = -chosen.logps.sum() / chosen_mask.sum().to(self.compute_dtype)
            loss = loss + self.sft_weight * sft_loss

        out_dtype = torch.promote_types(batch.chosen_logps.dtype, torch.float32)
        metrics = self._metrics(
            loss,
            chosen,
            rejected,
            chosen_rewards,
            rejected_rewards,
            log_prior_chosen,
            log_prior_rejected,
            contributions,
            sft_loss,
        )
        return ObjectiveOutput(
            loss=loss.to(out_dtype),
            losses=losses.to(out_dtype),
            chosen_rewards=chosen_rewards.detach().to(out_dtype),
            rejected_rewards=rejected_rewards.detach().to(out_dtype),
            log_prior_chosen=log_prior_chosen.detach().to(out_dtype),
            log_prior_rejected=log_prior_rejected.detach().to(out_dtype),
            metrics=metrics,
            logits=logits.detach().to(out_dtype),
        )

    def _metrics(
        self,
        loss: Tensor,
        chosen: ResponseSide,
        rejected: ResponseSide,
        chosen_rewards: Tensor,
        rejected_rewards: Tensor,
        log_prior_chosen: Tensor,
        log_prior_rejected: Tensor,
        contributions: list[tuple[PriorContribution, PriorContribution]],
        sft_loss: Tensor | None,
    ) -> dict[str, float]:
        values: dict[str, Tensor] = {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
            "logps/chosen": chosen.sequence_logps.mean(),
            "logps/rejected": rejected.sequence_logps.mean(),
            "log_prior/chosen": log_prior_chosen.mean(),
            "log_prior/rejected": log_prior_rejected.mean(),
        }
        if sft_loss is not None:
            values["sft_loss"] = sft_loss
        for index, (term, (c, r)) in enumerate(zip(self.terms, contributions, strict=True)):
            for role, part in (("chosen", c), ("rejected", r)):
                for key, value in part.metrics.items():
                    values[f"prior/{term.kind}{index}/{key}/{role}"] = value
        keys = list(values)
        # One device sync for all metrics.
        stacked = torch.stack([values[k].detach().to(torch.float64).reshape(()) for k in keys])
        metrics = dict(zip(keys, stacked.tolist(), strict=True))
        metrics.update(self.prior_parameter_summary())
        return metrics
