"""MI-DPO objectives: one loss, composable priors, every method of the paper as a preset.

    from pipeline.objectives import PairBatch, make_objective
    objective = make_objective("tdpo", beta=0.1, alpha=0.5, variant=2)
    out = objective(PairBatch(chosen_logps, rejected_logps, chosen_mask, rejected_mask, ...))
    out.loss.backward()

Pure torch (no DeepSpeed / transformers imports). See docs/objectives.md.
"""

from .batch import PairBatch, validate_batch
from .marginal import marginal_prior_nll
from .objective import POLICY_LR, MIDPOObjective, ObjectiveOutput, split_for_weight_decay
from .presets import (
    OBJECTIVES,
    available_objectives,
    make_objective,
    objective_hyperparameters,
)
from .priors import (
    PRIOR_TERMS,
    BoundedScalar,
    LearnableFamily,
    LengthNormalization,
    LengthPenalty,
    MarginalPrior,
    PMIMargin,
    PolicyTempering,
    PriorContribution,
    PriorTerm,
    ReferencePrior,
    ResponsePrior,
    ResponseSide,
    ReverseTokenKL,
    SequenceKL,
    SparseTokenMasks,
    TokenWeighting,
    WinnerMargin,
    build_prior_term,
)
from .sparse_masks import SparseMaskHead, activation_token_masks
from .tisdpo_weights import contrastive_token_weights, transform_scores
from .token_statistics import (
    TokenStats,
    linear_head,
    response_token_stats,
    sequence_logps,
    token_stats,
)

__all__ = [
    "OBJECTIVES",
    "PRIOR_TERMS",
    "BoundedScalar",
    "LearnableFamily",
    "LengthNormalization",
    "LengthPenalty",
    "MIDPOObjective",
    "POLICY_LR",
    "MarginalPrior",
    "ObjectiveOutput",
    "PMIMargin",
    "PairBatch",
    "PolicyTempering",
    "PriorContribution",
    "PriorTerm",
    "ReferencePrior",
    "ResponsePrior",
    "ResponseSide",
    "ReverseTokenKL",
    "SequenceKL",
    "SparseMaskHead",
    "SparseTokenMasks",
    "TokenStats",
    "TokenWeighting",
    "WinnerMargin",
    "activation_token_masks",
    "available_objectives",
    "build_prior_term",
    "contrastive_token_weights",
    "linear_head",
    "make_objective",
    "marginal_prior_nll",
    "objective_hyperparameters",
    "response_token_stats",
    "sequence_logps",
    "token_stats",
    "transform_scores",
    "split_for_weight_decay",
    "validate_batch",
]
