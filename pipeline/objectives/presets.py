"""Named objectives: each is MI-DPO with a preset list of prior terms and hyper-parameters.

Hyper-parameter names and defaults follow each method's reference code (see docs/objectives.md for
sources and the paper-vs-code differences). ``make_objective(name, **hparams)`` builds one;
``OBJECTIVES`` maps names to builders.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .objective import POLICY_LR, MIDPOObjective
from .priors import (
    LearnableFamily,
    LengthNormalization,
    LengthPenalty,
    MarginalPrior,
    PMIMargin,
    PolicyTempering,
    PriorSpec,
    ReferencePrior,
    ReverseTokenKL,
    SequenceKL,
    SparseTokenMasks,
    TokenWeighting,
    WinnerMargin,
)


def _hparams(frame_locals: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame_locals.items() if not k.startswith("_")}


def mi_dpo(
    beta: float = 0.1,
    prior: Sequence[PriorSpec] = (),
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    prior_lr: float | None = None,
) -> MIDPOObjective:
    """The general loss with any list of prior terms (an empty prior is the uniform zeta)."""
    return MIDPOObjective(
        beta,
        prior,
        label_smoothing=label_smoothing,
        sft_weight=sft_weight,
        name="mi-dpo",
        hparams={"beta": beta, "label_smoothing": label_smoothing, "sft_weight": sft_weight},
        prior_lr=prior_lr,
    )


def dpo(beta: float = 0.1, label_smoothing: float = 0.0) -> MIDPOObjective:
    """DPO: zeta = pi_ref. label_smoothing > 0 is conservative DPO (cDPO)."""
    hp = _hparams(locals())
    return MIDPOObjective(
        beta,
        [ReferencePrior()],
        label_smoothing=label_smoothing,
        name="dpo",
        hparams=hp,
    )


def dice(beta: float = 0.1, label_smoothing: float = 0.0) -> MIDPOObjective:
    """DICE: DPO whose reference slots hold the previous round's policy log-probs.

    The loss is DPO's; what makes DICE is its data loop (implicit-reward scoring with a length
    penalty, experience replay, rounds), switched on by the run config's ``score.dice`` section
    and ``make iterate`` — the config refuses this preset without it.
    """
    hp = _hparams(locals())
    return MIDPOObjective(
        beta,
        [ReferencePrior()],
        label_smoothing=label_smoothing,
        name="dice",
        hparams=hp,
    )


def centropy(
    beta: float = 0.1, alpha: float = 0.95, label_smoothing: float = 0.0
) -> MIDPOObjective:
    """Entropy-controllable DPO (H-DPO): zeta = pi_ref * pi_theta^(1 - alpha), gradient through zeta.

    The logit is beta * ([alpha l(y_w) - r(y_w)] - [alpha l(y_l) - r(y_l)]); alpha < 1 sharpens.
    """
    hp = _hparams(locals())
    if not alpha > 0:
        raise ValueError(f"alpha: expected > 0, got {alpha!r}")
    return MIDPOObjective(
        beta,
        [ReferencePrior(), PolicyTempering(1.0 - alpha)],
        label_smoothing=label_smoothing,
        name="centropy",
        hparams=hp,
    )


def simpo(
    beta: float = 2.0,
    gamma_beta_ratio: float | None = None,
    gamma: float | None = None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> MIDPOObjective:
    """SimPO: -log sig(beta * (mean l(y_w) - mean l(y_l)) - gamma), no reference.

    The SimPO repo sets ``gamma_beta_ratio`` (gamma = ratio * beta, default 0.25); TRL's CPO
    ``simpo_gamma`` is the absolute ``gamma``. Give one of them.
    """
    if gamma is not None and gamma_beta_ratio is not None:
        raise ValueError("gamma: give either gamma (absolute) or gamma_beta_ratio, not both")
    ratio = (
        gamma / beta
        if gamma is not None
        else (0.25 if gamma_beta_ratio is None else gamma_beta_ratio)
    )
    return MIDPOObjective(
        beta,
        [LengthNormalization(), WinnerMargin(ratio)],
        label_smoothing=label_smoothing,
        sft_weight=sft_weight,
        name="simpo",
        hparams={
            "beta": beta,
            "gamma_beta_ratio": ratio,
            "gamma": ratio * beta,
            "label_smoothing": label_smoothing,
            "sft_weight": sft_weight,
        },
    )


def rdpo(beta: float = 0.1, alpha: float = 0.01, label_smoothing: float = 0.0) -> MIDPOObjective:
    """R-DPO (Park et al.): -log sig(beta * Delta + alpha * (|y_w| - |y_l|)).

    Sign from maximising E[r - alpha |y|] - beta KL: zeta = pi_ref * exp(-(alpha/beta)|y|).
    """
    hp = _hparams(locals())
    return MIDPOObjective(
        beta,
        [ReferencePrior(), LengthPenalty(alpha / beta)],
        label_smoothing=label_smoothing,
        name="rdpo",
        hparams=hp,
    )


def tdpo(beta: float = 0.1, alpha: float = 0.5, variant: int = 1) -> MIDPOObjective:
    """TDPO (reference ``tdpo_loss``): zeta = pi_ref * exp(-SeqKL) (variant 1) or
    pi_ref * exp(-alpha * SeqKL) with the winner's SeqKL under stop-gradient (variant 2).

    SeqKL = sum over response tokens of KL(pi_ref || pi_theta). The repo's config default is
    variant 1 (``if_tdpo2: false``); alpha is used by variant 2 only.
    """
    hp = _hparams(locals())
    if variant not in (1, 2):
        raise ValueError(f"variant: expected 1 or 2, got {variant!r}")
    kl_term = SequenceKL(1.0) if variant == 1 else SequenceKL(alpha, stop_grad_chosen=True)
    return MIDPOObjective(beta, [ReferencePrior(), kl_term], name="tdpo", hparams=hp)


def tisdpo(beta: float = 0.1, token_level: bool = False, alpha: float = 0.5) -> MIDPOObjective:
    """TIS-DPO: margin sum_t w_t (log pi_t - log ref_t); weights in chosen/rejected_weights.

    token_level=True adds the reference code's optional term -alpha * sum_t w_t KL(pi || ref)_t
    (needs chosen/rejected_reverse_kl).
    """
    hp = _hparams(locals())
    prior: list[PriorSpec] = [ReferencePrior(), TokenWeighting()]
    if token_level:
        prior.append(ReverseTokenKL(alpha, weighted=True))
    return MIDPOObjective(beta, prior, name="tisdpo", hparams=hp)


def sparsepo(
    beta: float = 0.1,
    mask_source: str = "learned",
    hidden_size: int | None = None,
    num_layers: int | None = None,
    rw_kl_independent: bool = False,
    mask_on_reward: bool = True,
    mask_on_kl: bool = True,
    mask_dropout: float = 0.01,
    l1_norm_param_u: float = 0.0,
    l1_norm_param_d: float = 0.0,
    mask_weight_decay: float = 0.01,
    prior_lr: float | None = None,
) -> MIDPOObjective:
    """SparsePO: token masks on the log-ratio reward and on the token KL (TDPO1-like).

    mask_source: "learned" (mask head on reference hidden states; needs hidden_size, num_layers
    and chosen/rejected_ref_hidden), "activations" (from reference hidden states, no parameters)
    or "given" (chosen/rejected_weights). num_layers: how many of the reference's last layers feed
    the learned head; the reference code's default mask model ("simple_all") reads all of them,
    which the train stage passes. rw_kl_independent: separate reward and KL masks. The mask
    heads train as in the reference trainer: in the policy's optimizer at its learning rate
    (``prior_lr`` None; a number sets another), with ``mask_weight_decay`` on their matrices.
    """
    hp = _hparams(locals())
    masks = SparseTokenMasks(
        mask_source,  # type: ignore[arg-type]
        hidden_size=hidden_size,
        num_layers=num_layers,
        independent=rw_kl_independent,
        mask_on_reward=mask_on_reward,
        mask_on_kl=mask_on_kl,
        dropout=mask_dropout,
        l1_u=l1_norm_param_u,
        l1_d=l1_norm_param_d,
    )
    return MIDPOObjective(
        beta,
        [ReferencePrior(), masks],
        name="sparsepo",
        hparams=hp,
        prior_lr=POLICY_LR if prior_lr is None else prior_lr,
        prior_weight_decay=mask_weight_decay,
    )


def rmipo(
    beta: float = 2.0,
    gamma_min: float = 0.3,
    gamma_max: float = 1.6,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> MIDPOObjective:
    """RMiPO: SimPO with a per-pair margin from the detached PMI difference.

    Needs chosen/rejected_marginal_logps: the policy's log-probs of the response alone (no prompt,
    no grad); set chosen/rejected_marginal_mask to exclude unscored positions (the reference scores
    the response without its first token).
    """
    hp = _hparams(locals())
    return MIDPOObjective(
        beta,
        [LengthNormalization(), PMIMargin(gamma_min, gamma_max)],
        label_smoothing=label_smoothing,
        sft_weight=sft_weight,
        name="rmipo",
        hparams=hp,
    )


# Where each named method sits in the learnable family: (gamma, length_coef, kl_coef).
def _family_point(init: str, beta: float, hparams: Mapping[str, Any]) -> tuple[float, float, float]:
    allowed = {
        "dpo": set(),
        "dice": set(),
        "centropy": {"alpha"},
        "rdpo": {"alpha"},
        "tdpo": {"variant"},
    }
    if init not in allowed:
        raise ValueError(f"init: expected one of {sorted(allowed)}, got {init!r}")
    unknown = sorted(set(hparams) - allowed[init])
    if unknown:
        raise ValueError(
            f"init_hparams: unknown key(s) {unknown} for init={init!r}; expected {sorted(allowed[init])}"
        )
    if init == "centropy":
        return float(hparams.get("alpha", 0.95)), 0.0, 0.0
    if init == "rdpo":
        return 1.0, float(hparams.get("alpha", 0.01)) / beta, 0.0
    if init == "tdpo":
        if hparams.get("variant", 1) != 1:
            raise ValueError("init_hparams: only TDPO variant 1 lies in the learnable family")
        return 1.0, 0.0, 1.0
    return 1.0, 0.0, 0.0


def learnable(
    beta: float = 0.1,
    init: str = "dpo",
    init_hparams: Mapping[str, Any] | None = None,
    gamma_bounds: tuple[float, float] = (0.5, 1.5),
    length_coef_bounds: tuple[float, float] = (-1.0, 1.0),
    kl_coef_bounds: tuple[float, float] | None = (-2.0, 2.0),
    prior_lr: float = 1e-2,
    label_smoothing: float = 0.0,
) -> MIDPOObjective:
    """Joint optimisation over (pi, zeta), zeta in a bounded family (MI-DPO section 5.2).

    log zeta = log pi_ref + (1 - gamma) log pi - c |y| - kappa SeqKL, each parameter bounded.
    ``init`` ("dpo", "centropy", "rdpo", "tdpo") with ``init_hparams`` (e.g. {"alpha": 0.9})
    starts the prior at that method's point. ``kl_coef_bounds=None`` drops the KL direction.
    Train the prior with its own learning rate: ``objective.parameter_groups()`` (uses prior_lr).
    """
    hp = _hparams(locals())
    gamma, length_coef, kl_coef = _family_point(init, beta, dict(init_hparams or {}))
    family = LearnableFamily(
        gamma,
        length_coef,
        kl_coef,
        gamma_bounds=tuple(gamma_bounds),  # type: ignore[arg-type]
        length_coef_bounds=tuple(length_coef_bounds),  # type: ignore[arg-type]
        kl_coef_bounds=None if kl_coef_bounds is None else tuple(kl_coef_bounds),  # type: ignore[arg-type]
    )
    return MIDPOObjective(
        beta,
        [ReferencePrior(), family],
        label_smoothing=label_smoothing,
        name="learnable",
        hparams=hp,
        prior_lr=prior_lr,
    )


def marginal(
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    marginal_source: str = "prompt_free_model",
) -> MIDPOObjective:
    """Lemma 1's optimum: zeta = the policy's marginal over prompts; the reward is PMI.

    log zeta(y) comes from chosen/rejected_marginal_logps: a prompt-free language model
    ("prompt_free_model", initialised from the reference and fitted by maximum likelihood on the
    policy's responses with ``marginal_prior_nll``, alternating with policy steps) or the policy
    itself run without the prompt ("policy"). Either way the prior is under stop-gradient here.
    """
    hp = _hparams(locals())
    return MIDPOObjective(
        beta,
        [MarginalPrior(source=marginal_source)],
        label_smoothing=label_smoothing,
        name="marginal",
        hparams=hp,
    )


ObjectiveBuilder = Callable[..., MIDPOObjective]

OBJECTIVES: dict[str, ObjectiveBuilder] = {
    "mi-dpo": mi_dpo,
    "dpo": dpo,
    "dice": dice,
    "centropy": centropy,
    "simpo": simpo,
    "rdpo": rdpo,
    "tdpo": tdpo,
    "tisdpo": tisdpo,
    "sparsepo": sparsepo,
    "rmipo": rmipo,
    "learnable": learnable,
    "marginal": marginal,
}


def available_objectives() -> list[str]:
    """Names accepted by make_objective."""
    return sorted(OBJECTIVES)


def objective_hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of a named objective and their defaults."""
    builder = _builder(name)
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()}


def _builder(name: str) -> ObjectiveBuilder:
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"objective {name!r}: unknown; expected one of {available_objectives()}")
    return OBJECTIVES[name]


def make_objective(name: str, **hparams: Any) -> MIDPOObjective:
    """Build the named objective (an nn.Module); unknown names or hyper-parameters raise."""
    builder = _builder(name)
    accepted = objective_hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"objective {name!r}: unknown hyper-parameter(s) {unknown}; expected {sorted(accepted)}"
        )
    return builder(**hparams)
