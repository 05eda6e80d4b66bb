"""The marginal prior's own step (Lemma 1): fit zeta(y) to the policy's marginal by max likelihood.

MI-DPO's optimal prior is the policy's marginal over prompts, p(y) = E_x pi(y|x); with it,
log pi(y|x) - log zeta(y) is the pointwise mutual information. The trainable form alternates:

1. policy step: the ``marginal`` objective (MI-DPO loss with zeta under stop-gradient), with
   ``chosen/rejected_marginal_logps`` = per-token log-probs of the responses under the
   prompt-free model (the response scored without its prompt);
2. prior step: minimise ``marginal_prior_nll`` of the prompt-free model on the policy's responses
   (samples from the policy, or the batch's responses weighted towards the policy, e.g.
   self-normalised pi/ref ratios) with the prompt-free model's own optimizer.

This is the template of mutual-information-regularised RL (the prior tracks the policy's marginal
by maximum likelihood). The train stage owns the prompt-free model (initialised from the
reference) and the schedule; this module gives the loss of step 2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def marginal_prior_nll(
    marginal_logps: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Token-mean negative log-likelihood of responses under the prompt-free model.

    marginal_logps [B, T]: per-token log zeta(y_t | y_<t) with gradient to the prompt-free model;
    mask [B, T] bool: scored tokens; weights [B] (optional, >= 0): per-response weights, e.g.
    importance weights towards the current policy. Returns a scalar to minimise.
    """
    if marginal_logps.dim() != 2:
        raise ValueError(
            f"marginal_logps: expected [B, T], got shape {tuple(marginal_logps.shape)}"
        )
    if mask.shape != marginal_logps.shape:
        raise ValueError(
            f"mask: expected shape {tuple(marginal_logps.shape)}, got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask: expected at least one scored token")
    values = marginal_logps.masked_select(mask)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("marginal_logps: NaN/inf at scored positions")
    zero = torch.zeros((), dtype=marginal_logps.dtype, device=marginal_logps.device)
    token_logps = torch.where(mask, marginal_logps, zero)
    counts = mask.sum(dim=1).to(marginal_logps.dtype)
    if weights is None:
        return -token_logps.sum() / counts.sum()
    if weights.shape != marginal_logps.shape[:1]:
        raise ValueError(
            f"weights: expected shape {tuple(marginal_logps.shape[:1])}, got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights: expected finite values >= 0")
    weights = weights.detach().to(marginal_logps.dtype)
    denominator = (weights * counts).sum()
    if not bool(denominator > 0):
        raise ValueError("weights: expected a positive total weight on scored tokens")
    return -(weights * token_logps.sum(dim=1)).sum() / denominator
