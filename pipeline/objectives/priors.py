"""Prior terms: additive pieces of log zeta(y).

MI-DPO's implicit reward of a response is ``beta * (log pi(y|x) - log zeta(y))``. Because log zeta
enters additively, a prior is a list of terms whose contributions are summed. Each named method
(DPO, SimPO, TDPO, ...) is a preset list of these terms (see ``presets.py``), so adding a method
means adding a term, never a branch in the loss.

A term returns, for each response of the pair, its contribution to log zeta ``[B]`` and optionally a
penalty ``[B]`` added to the per-pair loss (SparsePO's L1 on its masks). Terms see a
``ResponseSide``: the per-token inputs of one side, already masked and cast to the objective's
compute dtype (float64 by default, so composing terms costs no precision).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .batch import PairBatch
from .sparse_masks import SparseMaskHead, activation_token_masks


@dataclass
class ResponseSide:
    """The inputs of one side of the pairs (chosen or rejected), masked, in compute dtype."""

    role: Literal["chosen", "rejected"]
    batch: PairBatch
    mask: Tensor  # [B, T] bool
    logps: Tensor  # [B, T] per-token log pi_theta, 0 outside the mask
    dtype: torch.dtype

    @property
    def lengths(self) -> Tensor:
        """|y|: number of response tokens, [B]."""
        return self.mask.sum(dim=1).to(self.dtype)

    @property
    def sequence_logps(self) -> Tensor:
        """l(y) = sum of response-token log-probs, [B]."""
        return self.logps.sum(dim=1)

    def tokens(self, generic: str, mask: Tensor | None = None) -> Tensor:
        """Optional per-token input `generic` ("ref_logps", "kl", ...), 0 outside the mask."""
        value = self.batch.get(generic, self.role)
        if value is None:  # validate_batch reports missing fields first; this is a backstop
            raise ValueError(f"{self.role} side: input {generic!r} is required but is None")
        keep = self.mask if mask is None else mask
        return torch.where(
            keep, value.to(self.dtype), torch.zeros((), dtype=self.dtype, device=value.device)
        )

    def total(self, per_token: Tensor) -> Tensor:
        """Sum of a masked per-token tensor over the response, [B]."""
        return per_token.sum(dim=1)


@dataclass
class PriorContribution:
    log_prior: Tensor  # [B] contribution to log zeta(y)
    penalty: Tensor | None = None  # [B] added to the per-pair loss
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, for logging


class PriorTerm(nn.Module):
    """Base class: one additive term of log zeta. Subclasses set `kind` and `needs`."""

    kind: ClassVar[str] = ""
    # Generic input names this term reads (keys of batch.SIDE_FIELDS): required, and read if given.
    needs: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    # Layers of reference hidden states the term reads (SparsePO's mask heads); 0 for none.
    reference_layers: int = 0
    # Where prompt-free log-probs come from when the term reads them: the policy run without the
    # prompt ("policy") or a separate prompt-free model fitted by maximum likelihood.
    marginal_source: str | None = None

    def forward(  # noqa: D102
        self, chosen: ResponseSide, rejected: ResponseSide
    ) -> tuple[PriorContribution, PriorContribution]:
        raise NotImplementedError

    def parameter_summary(self) -> dict[str, float]:
        """Current values of learnable quantities, for logging."""
        return {}


class ResponsePrior(PriorTerm):
    """A term whose value for a response depends on that response (and its role) only."""

    def forward(
        self, chosen: ResponseSide, rejected: ResponseSide
    ) -> tuple[PriorContribution, PriorContribution]:
        return _wrap(self.log_prior(chosen)), _wrap(self.log_prior(rejected))

    def log_prior(self, side: ResponseSide) -> Tensor | PriorContribution:
        raise NotImplementedError


def _wrap(value: Tensor | PriorContribution) -> PriorContribution:
    return value if isinstance(value, PriorContribution) else PriorContribution(value)


# --- fixed priors ---------------------------------------------------------------------------


class ReferencePrior(ResponsePrior):
    """log zeta += log pi_ref(y) (summed; stop-gradient: the reference is never trained). DPO."""

    kind = "reference"
    needs = frozenset({"ref_logps"})

    def log_prior(self, side: ResponseSide) -> Tensor:
        return side.total(side.tokens("ref_logps")).detach()


class PolicyTempering(ResponsePrior):
    """log zeta += coef * log pi(y), gradient through: entropy-controllable DPO (coef = 1 - alpha)."""

    kind = "policy_tempering"

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = float(coef)

    def log_prior(self, side: ResponseSide) -> Tensor:
        return self.coef * side.sequence_logps


class LengthPenalty(ResponsePrior):
    """log zeta -= coef * |y|. R-DPO with coef = alpha / beta (adds alpha * (|y_w| - |y_l|))."""

    kind = "length_penalty"

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = float(coef)

    def log_prior(self, side: ResponseSide) -> Tensor:
        return -self.coef * side.lengths


class LengthNormalization(ResponsePrior):
    """log zeta += (1 - 1/|y|) log pi(y), so log pi - log zeta is the mean token log-prob (SimPO)."""

    kind = "length_normalization"

    def log_prior(self, side: ResponseSide) -> Tensor:
        return (1.0 - 1.0 / side.lengths) * side.sequence_logps


class WinnerMargin(ResponsePrior):
    """log zeta(y_w) += margin (log-prob units; the logit loses beta * margin). SimPO's gamma/beta."""

    kind = "winner_margin"

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = float(margin)

    def log_prior(self, side: ResponseSide) -> Tensor:
        value = self.margin if side.role == "chosen" else 0.0
        return torch.full_like(side.lengths, value)


class SequenceKL(ResponsePrior):
    """log zeta -= coef * SeqKL(y), SeqKL = sum_t KL(pi_ref || pi_theta) over response positions.

    TDPO1: coef = 1. TDPO2: coef = alpha with the winner's KL under stop-gradient.
    """

    kind = "sequence_kl"
    needs = frozenset({"kl"})

    def __init__(self, coef: float = 1.0, stop_grad_chosen: bool = False) -> None:
        super().__init__()
        self.coef = float(coef)
        self.stop_grad_chosen = bool(stop_grad_chosen)

    def log_prior(self, side: ResponseSide) -> PriorContribution:
        seq_kl = side.total(side.tokens("kl"))
        if self.stop_grad_chosen and side.role == "chosen":
            seq_kl = seq_kl.detach()
        return PriorContribution(-self.coef * seq_kl, metrics={"seq_kl": seq_kl.detach().mean()})


class TokenWeighting(ResponsePrior):
    """log zeta += sum_t (1 - w_t)(log pi_t - log ref_t): the log-ratio becomes sum_t w_t(...).

    With ReferencePrior this is TIS-DPO's token-weighted margin. Weights come from the batch
    (``chosen_weights``), e.g. from ``tisdpo_weights.contrastive_token_weights``.
    """

    kind = "token_weighting"
    needs = frozenset({"ref_logps", "weights"})

    def log_prior(self, side: ResponseSide) -> Tensor:
        weights = side.tokens("weights")
        log_ratio = side.logps - side.tokens("ref_logps").detach()
        return side.total((1.0 - weights) * log_ratio)


class ReverseTokenKL(ResponsePrior):
    """log zeta += coef * sum_t w_t KL(pi_theta || pi_ref)_t: TIS-DPO's optional token-level term.

    The reference code uses the reverse direction and the opposite sign to TDPO here.
    """

    kind = "reverse_token_kl"

    def __init__(self, coef: float = 0.5, weighted: bool = True) -> None:
        super().__init__()
        self.coef = float(coef)
        self.weighted = bool(weighted)
        self.needs = frozenset({"reverse_kl", "weights"} if weighted else {"reverse_kl"})

    def log_prior(self, side: ResponseSide) -> PriorContribution:
        kl = side.tokens("reverse_kl")
        if self.weighted:
            kl = kl * side.tokens("weights")
        seq_kl = side.total(kl)
        return PriorContribution(self.coef * seq_kl, metrics={"reverse_kl": seq_kl.detach().mean()})


MaskSource = Literal["learned", "activations", "given"]


class SparseTokenMasks(ResponsePrior):
    """SparsePO: token masks m_u on the log-ratio reward and m_d on the token KL.

    log zeta += sum_t (1 - m_u,t)(log pi_t - log ref_t) - sum_t m_d,t KL_t, so with ReferencePrior
    the implicit reward is sum_t m_u,t log(pi/ref)_t + sum_t m_d,t KL_t and the loss is
    -log sig(beta * (u_w - u_l - (d_l - d_w))) as in SparsePO's trainer (KL = KL(ref || pi)).

    Mask sources:
    - "learned": a SparseMaskHead on the reference hidden states (``chosen_ref_hidden``), trained
      with the policy; one head shared by both masks, or two when `independent`.
    - "activations": masks from reference activations (mean over hidden units, z-normalised over the
      response, rescaled to [0, 1]; averaged over layers): no parameters.
    - "given": ``chosen_weights`` used as the mask (both masks).
    A disabled mask (``mask_on_reward`` / ``mask_on_kl`` False) is all ones. ``l1_u`` / ``l1_d``
    add the L1 norm of the masks to each pair's loss (halved when one mask is shared by both, as in
    the reference trainer).
    """

    kind = "sparse_token_masks"

    def __init__(
        self,
        source: MaskSource = "learned",
        *,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        independent: bool = False,
        mask_on_reward: bool = True,
        mask_on_kl: bool = True,
        dropout: float = 0.01,
        l1_u: float = 0.0,
        l1_d: float = 0.0,
    ) -> None:
        super().__init__()
        if source not in ("learned", "activations", "given"):
            raise ValueError(
                f"mask_source: expected 'learned', 'activations' or 'given', got {source!r}"
            )
        self.source = source
        self.mask_on_reward = bool(mask_on_reward)
        self.mask_on_kl = bool(mask_on_kl)
        self.independent = bool(independent)
        shared = self.mask_on_reward and self.mask_on_kl and not self.independent
        self.l1_u = float(l1_u) / (2.0 if shared else 1.0)
        self.l1_d = float(l1_d) / (2.0 if shared else 1.0)
        self.reward_head: SparseMaskHead | None = None
        self.kl_head: SparseMaskHead | None = None
        if source == "learned":
            if hidden_size is None or hidden_size <= 0:
                raise ValueError(
                    "hidden_size: mask_source='learned' needs the reference hidden size (int > 0)"
                )
            if num_layers is None or num_layers <= 0:
                raise ValueError(
                    "num_layers: mask_source='learned' needs how many of the reference's last "
                    "layers feed the mask head (int > 0; the reference code reads all of them)"
                )
            self.reward_head = SparseMaskHead(hidden_size, num_layers, dropout)
            self.kl_head = SparseMaskHead(hidden_size, num_layers, dropout) if independent else None
        needs = {"ref_logps", "kl"}
        needs.add("weights" if source == "given" else "ref_hidden")
        self.needs = frozenset(needs)
        # The learned heads read their last `num_layers` layers; activation masks the last one.
        self.reference_layers = {"learned": num_layers or 0, "activations": 1, "given": 0}[source]

    def _masks(self, side: ResponseSide) -> tuple[Tensor, Tensor]:
        if self.source == "given":
            given = side.tokens("weights")
            return given, given
        hidden = side.batch.get("ref_hidden", side.role)
        assert hidden is not None
        hidden = hidden.detach()
        if self.source == "activations":
            act = activation_token_masks(hidden, side.mask).to(side.dtype)
            return act, act
        assert self.reward_head is not None
        reward_mask = self.reward_head.token_masks(hidden, side.mask).to(side.dtype)
        kl_head = self.kl_head if self.kl_head is not None else self.reward_head
        kl_mask = (
            reward_mask
            if kl_head is self.reward_head
            else kl_head.token_masks(hidden, side.mask).to(side.dtype)
        )
        return reward_mask, kl_mask

    def log_prior(self, side: ResponseSide) -> PriorContribution:
        reward_mask, kl_mask = self._masks(side)
        ones = side.mask.to(side.dtype)
        reward_mask = reward_mask if self.mask_on_reward else ones
        kl_mask = kl_mask if self.mask_on_kl else ones
        log_ratio = side.logps - side.tokens("ref_logps").detach()
        kl = side.tokens("kl")
        log_prior = side.total((1.0 - reward_mask) * log_ratio) - side.total(kl_mask * kl)
        penalty = torch.zeros_like(log_prior)
        if self.mask_on_reward and self.l1_u:
            penalty = penalty + self.l1_u * side.total(reward_mask.abs())
        if self.mask_on_kl and self.l1_d:
            penalty = penalty + self.l1_d * side.total(kl_mask.abs())
        n = side.lengths
        metrics = {
            "reward_mask_mean": (side.total(reward_mask) / n).detach().mean(),
            "kl_mask_mean": (side.total(kl_mask) / n).detach().mean(),
            "reward_mask_sparsity": (
                side.total(((reward_mask == 0) & side.mask).to(side.dtype)) / n
            )
            .detach()
            .mean(),
        }
        return PriorContribution(log_prior, penalty, metrics)


class MarginalPrior(ResponsePrior):
    """log zeta(y) = log of a prompt-free model's probability of y (Lemma 1: the marginal).

    Stop-gradient: the prior is fitted by its own maximum-likelihood step
    (``marginal.marginal_prior_nll``), never by the MI-DPO loss, which would drive zeta(y_w) to 0.
    Scored positions: ``chosen_marginal_mask`` if given, else the response mask.
    """

    kind = "marginal"
    needs = frozenset({"marginal_logps"})
    optional = frozenset({"marginal_mask"})

    def __init__(self, source: str = "policy") -> None:
        super().__init__()
        if source not in ("prompt_free_model", "policy"):
            raise ValueError(
                f"marginal_source: expected 'prompt_free_model' or 'policy', got {source!r}"
            )
        self.marginal_source = source

    def log_prior(self, side: ResponseSide) -> Tensor:
        return side.total(side.tokens("marginal_logps", _marginal_mask(side))).detach()


def _marginal_mask(side: ResponseSide) -> Tensor:
    given = side.batch.get("marginal_mask", side.role)
    if given is None:
        return side.mask
    return (given if given.dtype == torch.bool else given != 0) & side.mask


def mean_pmi(side: ResponseSide) -> Tensor:
    """Length-normalised PMI: mean log pi(y|x) - mean prompt-free log p(y) (RMiPO), detached."""
    marginal_mask = _marginal_mask(side)
    marginal_count = marginal_mask.sum(dim=1).clamp(min=1).to(side.dtype)
    marginal_mean = side.total(side.tokens("marginal_logps", marginal_mask)) / marginal_count
    return (side.sequence_logps / side.lengths - marginal_mean).detach()


class PMIMargin(PriorTerm):
    """RMiPO: log zeta(y_w) += gamma_min + (gamma_max - gamma_min) * exp(-max(dPMI, 0)).

    dPMI = PMI(y_w) - PMI(y_l) with length-normalised PMI (``mean_pmi``), detached. Used with
    LengthNormalization, the logit is beta * (mean l(y_w) - mean l(y_l) - gamma).
    """

    kind = "pmi_margin"
    needs = frozenset({"marginal_logps"})
    optional = frozenset({"marginal_mask"})
    marginal_source = "policy"  # RMiPO: the policy itself, prompt-free, no gradient

    def __init__(self, gamma_min: float = 0.3, gamma_max: float = 1.6) -> None:
        super().__init__()
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)

    def forward(
        self, chosen: ResponseSide, rejected: ResponseSide
    ) -> tuple[PriorContribution, PriorContribution]:
        delta_pmi = mean_pmi(chosen) - mean_pmi(rejected)
        gamma = self.gamma_min + (self.gamma_max - self.gamma_min) * torch.exp(
            -delta_pmi.clamp(min=0.0)
        )
        metrics = {"delta_pmi": delta_pmi.mean(), "gamma": gamma.mean()}
        return PriorContribution(gamma, metrics=metrics), PriorContribution(torch.zeros_like(gamma))


# --- learnable prior ------------------------------------------------------------------------


class BoundedScalar(nn.Module):
    """A scalar in the open interval (low, high): value = center + half_width * tanh(offset + raw).

    `raw` is the trainable parameter and starts at 0; `offset` places the start exactly at `init`
    (computed in float64, so a prior initialised at a method's point reproduces that method).
    """

    def __init__(self, init: float, low: float, high: float, name: str = "value") -> None:
        super().__init__()
        if not low < init < high:
            raise ValueError(
                f"{name}: initial value {init} must lie strictly inside ({low}, {high})"
            )
        self.low, self.high = float(low), float(high)
        self.center = (self.low + self.high) / 2.0
        self.half_width = (self.high - self.low) / 2.0
        self.offset = math.atanh((float(init) - self.center) / self.half_width)
        # Shape [1], not []: DeepSpeed ZeRO-3 cannot partition 0-dim parameters.
        self.raw = nn.Parameter(torch.zeros(1))

    def value(self, dtype: torch.dtype = torch.float64) -> Tensor:
        raw = self.raw.to(dtype).reshape(())
        return self.center + self.half_width * torch.tanh(self.offset + raw)


class LearnableFamily(ResponsePrior):
    """A bounded family of priors, learned jointly with the policy (MI-DPO section 5.2).

    log zeta += (1 - gamma) log pi(y) - c |y| - kappa SeqKL(y), with each parameter confined to an
    open interval by a tanh reparameterisation (unbounded zeta is degenerate). With ReferencePrior
    its points include DPO (gamma=1, c=0, kappa=0), entropy-controllable DPO (gamma=alpha),
    R-DPO (c=alpha/beta) and TDPO1 (kappa=1). ``kl_coef_bounds=None`` drops the KL direction (no
    reference distribution needed).
    """

    kind = "learnable_family"

    def __init__(
        self,
        gamma: float = 1.0,
        length_coef: float = 0.0,
        kl_coef: float = 0.0,
        *,
        gamma_bounds: tuple[float, float] = (0.5, 1.5),
        length_coef_bounds: tuple[float, float] = (-1.0, 1.0),
        kl_coef_bounds: tuple[float, float] | None = (-2.0, 2.0),
    ) -> None:
        super().__init__()
        self.gamma = BoundedScalar(gamma, *gamma_bounds, name="gamma")
        self.length_coef = BoundedScalar(length_coef, *length_coef_bounds, name="length_coef")
        self.kl_coef: BoundedScalar | None = None
        if kl_coef_bounds is not None:
            self.kl_coef = BoundedScalar(kl_coef, *kl_coef_bounds, name="kl_coef")
            self.needs = frozenset({"kl"})
        elif kl_coef != 0.0:
            raise ValueError("kl_coef: must be 0 when kl_coef_bounds is None (no KL direction)")

    def log_prior(self, side: ResponseSide) -> Tensor:
        gamma = self.gamma.value(side.dtype)
        log_prior = (1.0 - gamma) * side.sequence_logps
        log_prior = log_prior - self.length_coef.value(side.dtype) * side.lengths
        if self.kl_coef is not None:
            log_prior = log_prior - self.kl_coef.value(side.dtype) * side.total(side.tokens("kl"))
        return log_prior

    @torch.no_grad()
    def parameter_summary(self) -> dict[str, float]:
        summary = {
            "gamma": float(self.gamma.value()),
            "length_coef": float(self.length_coef.value()),
        }
        if self.kl_coef is not None:
            summary["kl_coef"] = float(self.kl_coef.value())
        return summary


# --- registry -------------------------------------------------------------------------------

PRIOR_TERMS: dict[str, type[PriorTerm]] = {
    cls.kind: cls
    for cls in (
        ReferencePrior,
        PolicyTempering,
        LengthPenalty,
        LengthNormalization,
        WinnerMargin,
        SequenceKL,
        TokenWeighting,
        ReverseTokenKL,
        SparseTokenMasks,
        MarginalPrior,
        PMIMargin,
        LearnableFamily,
    )
}

PriorSpec = PriorTerm | str | Mapping[str, Any]


def build_prior_term(spec: PriorSpec) -> PriorTerm:
    """A PriorTerm from itself, its kind ("reference") or a mapping {"type": kind, **kwargs}."""
    if isinstance(spec, PriorTerm):
        return spec
    if isinstance(spec, str):
        kind, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        kind = kwargs.pop("type", None)
        if not isinstance(kind, str):
            raise ValueError(f"prior term {dict(spec)!r}: expected a 'type' key naming the term")
    else:
        raise ValueError(
            f"prior: expected a PriorTerm, a term name or a mapping, got {type(spec).__name__}"
        )
    if kind not in PRIOR_TERMS:
        raise ValueError(f"prior term {kind!r}: unknown; expected one of {sorted(PRIOR_TERMS)}")
    cls = PRIOR_TERMS[kind]
    accepted = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"prior term {kind!r}: unknown hyper-parameter(s) {unknown}; expected {accepted}"
        )
    return cls(**kwargs)
