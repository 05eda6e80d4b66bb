"""PairBatch: the per-token inputs every objective reads, and their validation.

All per-token tensors are ``[B, T]`` and aligned with the *label* positions of one side: entry
``[b, t]`` is about response token ``t`` of pair ``b`` (see ``token_statistics`` for the shift
convention that produces them). Chosen and rejected may have different ``T``. Positions where the
side's mask is False are ignored: objectives select with ``torch.where``, so padding values
(even NaN) never reach the loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

SIDES = ("chosen", "rejected")

# Generic (side-free) name of an optional per-token input -> (chosen field, rejected field).
# Prior terms declare what they need with the generic names; `requires` reports field names.
SIDE_FIELDS: dict[str, tuple[str, str]] = {
    "ref_logps": ("ref_chosen_logps", "ref_rejected_logps"),
    "kl": ("chosen_kl", "rejected_kl"),
    "weights": ("chosen_weights", "rejected_weights"),
    "marginal_logps": ("chosen_marginal_logps", "rejected_marginal_logps"),
    "marginal_mask": ("chosen_marginal_mask", "rejected_marginal_mask"),
    "reverse_kl": ("chosen_reverse_kl", "rejected_reverse_kl"),
    "ref_hidden": ("chosen_ref_hidden", "rejected_ref_hidden"),
}

# What each optional input is, for error messages.
FIELD_DESCRIPTIONS: dict[str, str] = {
    "ref_logps": "per-token log pi_ref(y_t | x, y_<t), float [B, T]",
    "kl": "per-token KL(pi_ref(.|prefix) || pi_theta(.|prefix)) over the vocabulary, float [B, T]",
    "weights": "per-token weights / masks, float [B, T]",
    "marginal_logps": "per-token prompt-free log-probs (marginal prior), float [B, T]",
    "marginal_mask": "bool [B, T]: which prompt-free log-probs are scored",
    "reverse_kl": "per-token KL(pi_theta(.|prefix) || pi_ref(.|prefix)), float [B, T]",
    "ref_hidden": "reference hidden states aligned with the tokens, float [B, T, H] or [B, T, L, H]",
}


def field_names(generic: Iterable[str]) -> frozenset[str]:
    """Generic input names -> the PairBatch field names for both sides."""
    return frozenset(name for key in generic for name in SIDE_FIELDS[key])


@dataclass
class PairBatch:
    """One batch of preference pairs as per-token statistics.

    The first ten fields are the public contract; the keyword-only ones after them are optional
    inputs used by a few priors (RMiPO's prompt-free scoring mask, TIS-DPO's token-level KL,
    SparsePO's reference activations).
    """

    chosen_logps: Tensor  # [B, Tc] per-token log pi_theta; 0 where the mask is False
    rejected_logps: Tensor  # [B, Tr]
    chosen_mask: Tensor  # [B, Tc] bool: response tokens that count
    rejected_mask: Tensor  # [B, Tr]
    ref_chosen_logps: Tensor | None = None  # [B, Tc] per-token log pi_ref
    ref_rejected_logps: Tensor | None = None
    chosen_kl: Tensor | None = None  # [B, Tc] per-token KL(pi_ref || pi_theta)
    rejected_kl: Tensor | None = None
    chosen_weights: Tensor | None = None  # [B, Tc] token weights / masks
    rejected_weights: Tensor | None = None
    chosen_marginal_logps: Tensor | None = None  # [B, Tc] prompt-free log-probs (PMI, marginal)
    rejected_marginal_logps: Tensor | None = None
    # Optional extras (keyword-only).
    chosen_marginal_mask: Tensor | None = field(default=None, kw_only=True)
    rejected_marginal_mask: Tensor | None = field(default=None, kw_only=True)
    chosen_reverse_kl: Tensor | None = field(default=None, kw_only=True)
    rejected_reverse_kl: Tensor | None = field(default=None, kw_only=True)
    chosen_ref_hidden: Tensor | None = field(default=None, kw_only=True)
    rejected_ref_hidden: Tensor | None = field(default=None, kw_only=True)

    @property
    def batch_size(self) -> int:
        return int(self.chosen_logps.shape[0])

    def get(self, generic: str, side: str) -> Tensor | None:
        """The optional input `generic` ("kl", "ref_logps", ...) of `side` ("chosen"/"rejected")."""
        name = SIDE_FIELDS[generic][SIDES.index(side)]
        value: Tensor | None = getattr(self, name)
        return value

    def to(self, device: torch.device | str) -> PairBatch:
        """A copy with every tensor moved to `device`."""
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return PairBatch(**moved)


def _holds(condition: Tensor, deferred: list[Tensor] | None) -> bool:
    """Whether the 0-dim bool `condition` is True. With a `deferred` list, the read is left for
    later (the condition is appended and taken to hold), so one read covers a whole batch: on a
    GPU each read stalls the queue."""
    if deferred is None:
        return bool(condition)
    deferred.append(condition)
    return True


def _as_bool_mask(mask: Tensor, name: str, deferred: list[Tensor] | None = None) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not _holds(~((mask != 0) & (mask != 1)).any(), deferred):
        raise ValueError(f"{name}: expected a bool mask (or 0/1 values), got other values")
    return mask != 0


def response_masks(batch: PairBatch) -> tuple[Tensor, Tensor]:
    """The chosen and rejected masks as bool tensors."""
    return (
        _as_bool_mask(batch.chosen_mask, "chosen_mask"),
        _as_bool_mask(batch.rejected_mask, "rejected_mask"),
    )


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_finite(value: Tensor, mask: Tensor, name: str, deferred: list[Tensor] | None) -> None:
    # Only response positions count: padding may hold anything, it is never read. The [B, T] mask
    # covers the trailing dims of [B, T, H] / [B, T, L, H] values.
    mask = mask.reshape(mask.shape + (1,) * (value.dim() - mask.dim()))
    nonfinite = ~torch.isfinite(value) & mask
    if not _holds(~nonfinite.any(), deferred):
        bad = int(nonfinite.sum())
        raise ValueError(
            f"{name}: {bad} NaN/inf value(s) at response positions; expected finite values "
            "wherever the mask is True"
        )


def validate_batch(batch: PairBatch, requires: Iterable[str] = (), objective: str = "") -> None:
    """Raise ValueError naming the field and what was expected, for any malformed input.

    Checks shapes (chosen/rejected may differ in T, not in B), that every pair has at least one
    response token on each side, that every field in `requires` is present, and that no value at
    a response position is NaN or inf.
    """
    required = sorted(requires)
    # A first pass defers every value check and reads them all at once: a valid batch costs one
    # device read. On any failure, a second pass runs the checks in order and reports the first
    # problem, so a value problem still takes precedence over a later shape problem.
    deferred: list[Tensor] = []
    try:
        _validate(batch, required, objective, deferred)
        valid = bool(torch.stack(deferred).all())
    except Exception:  # whatever went wrong, the ordered pass reports it
        valid = False
    if not valid:
        _validate(batch, required, objective, None)


def _validate(
    batch: PairBatch, required: list[str], objective: str, deferred: list[Tensor] | None
) -> None:
    """The checks of `validate_batch`; value checks go through `_holds` (see there)."""
    who = f"objective {objective!r}: " if objective else ""
    sides = {}
    for side in SIDES:
        logps = _check_tensor(getattr(batch, f"{side}_logps"), f"{side}_logps")
        mask = _check_tensor(getattr(batch, f"{side}_mask"), f"{side}_mask")
        if logps.dim() != 2:
            raise ValueError(f"{side}_logps: expected [B, T], got shape {tuple(logps.shape)}")
        if not logps.is_floating_point():
            raise ValueError(f"{side}_logps: expected a floating tensor, got {logps.dtype}")
        if mask.shape != logps.shape:
            raise ValueError(
                f"{side}_mask: expected shape {tuple(logps.shape)} (as {side}_logps), "
                f"got {tuple(mask.shape)}"
            )
        sides[side] = (logps, _as_bool_mask(mask, f"{side}_mask", deferred))
    if sides["chosen"][0].shape[0] != sides["rejected"][0].shape[0]:
        raise ValueError(
            "rejected_logps: expected the same batch size as chosen_logps "
            f"({sides['chosen'][0].shape[0]}), got {sides['rejected'][0].shape[0]}"
        )
    for side, (logps, mask) in sides.items():
        has_token = mask.any(dim=1)
        if not _holds(has_token.all(), deferred):
            empty = (~has_token).nonzero().flatten().tolist()
            raise ValueError(
                f"{side}_mask: pair(s) {empty} have no response token; expected at least one "
                "True per row (drop empty responses before training)"
            )
        _check_finite(logps, mask, f"{side}_logps", deferred)

    for name in required:
        if getattr(batch, name) is None:
            generic = next(k for k, names in SIDE_FIELDS.items() if name in names)
            raise ValueError(f"{who}{name} is required ({FIELD_DESCRIPTIONS[generic]}) but is None")

    for generic, names in SIDE_FIELDS.items():
        for side, name in zip(SIDES, names, strict=True):
            value = getattr(batch, name)
            if value is None:
                continue
            value = _check_tensor(value, name)
            logps, mask = sides[side]
            if generic == "ref_hidden":
                if value.dim() not in (3, 4) or value.shape[:2] != logps.shape:
                    raise ValueError(
                        f"{name}: expected [B, T, H] or [B, T, L, H] with [B, T] = "
                        f"{tuple(logps.shape)}, got {tuple(value.shape)}"
                    )
            elif value.shape != logps.shape:
                raise ValueError(
                    f"{name}: expected shape {tuple(logps.shape)} (as {side}_logps), "
                    f"got {tuple(value.shape)}"
                )
            if generic == "marginal_mask":
                marginal = _as_bool_mask(value, name, deferred)
                if not _holds(~(marginal & ~mask).any(), deferred):
                    raise ValueError(f"{name}: expected a subset of {side}_mask")
                continue
            if not value.is_floating_point():
                raise ValueError(f"{name}: expected a floating tensor, got {value.dtype}")
            _check_finite(value, mask, name, deferred)
