"""Every named objective equals a plain re-implementation of its original formula.

The references below are written from the papers' reference code (sums via ``(x * mask).sum(-1)``,
then the method's loss), in float64 on the same input values. The library runs on float32 inputs:
loss, per-pair losses and gradients must match to 1e-6 relative. For bf16 inputs the loss still
matches the float64 reference on the same (bf16) values to 1e-6; gradients come back in bf16 and
match to 2^-7 relative.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.objectives import (
    OBJECTIVES,
    POLICY_LR,
    PairBatch,
    available_objectives,
    make_objective,
    objective_hyperparameters,
    validate_batch,
)
from pipeline.objectives.batch import SIDE_FIELDS, SIDES, field_names
from tests.host_reads import HostReadCounter


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRAD_FIELDS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_kl",
    "rejected_kl",
    "chosen_reverse_kl",
    "rejected_reverse_kl",
)
FILL = 123.0  # finite garbage outside the masks: must never reach the loss


def make_inputs(
    seed: int,
    batch: int = 5,
    chosen_len: int = 9,
    rejected_len: int = 6,
    extreme: bool = False,
) -> dict[str, Tensor]:
    """Random per-token inputs with padding, unequal lengths, optionally extreme values."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for side, length in (("chosen", chosen_len), ("rejected", rejected_len)):
        mask = torch.zeros(batch, length, dtype=torch.bool)
        for b in range(batch):
            n = int(torch.randint(1, length + 1, (1,), generator=g))
            start = int(torch.randint(0, length - n + 1, (1,), generator=g))
            mask[b, start : start + n] = True
        scale = 300.0 if extreme else 4.0
        kl_scale = 60.0 if extreme else 1.5

        def per_token(low: float, high: float, m: Tensor = mask) -> Tensor:
            values = low + (high - low) * torch.rand(m.shape, generator=g, dtype=torch.float64)
            return torch.where(m, values, FILL)

        out[f"{side}_mask"] = mask
        out[f"{side}_logps"] = per_token(-scale, 0.0)
        out[f"ref_{side}_logps"] = per_token(-scale, 0.0)
        out[f"{side}_kl"] = per_token(0.0, kl_scale)
        out[f"{side}_reverse_kl"] = per_token(0.0, kl_scale)
        out[f"{side}_weights"] = per_token(0.7, 1.3)
        out[f"{side}_marginal_logps"] = per_token(-1.5 * scale, 0.0)
        marginal_mask = mask.clone()
        first = mask.float().argmax(dim=1)
        marginal_mask[torch.arange(batch), first] = False  # prompt-free scoring skips token 1
        out[f"{side}_marginal_mask"] = marginal_mask
        out[f"{side}_ref_hidden"] = torch.where(
            mask[..., None], torch.randn(batch, length, 8, generator=g, dtype=torch.float64), FILL
        )
    return out


def to_batch(inputs: dict[str, Tensor], dtype: torch.dtype) -> tuple[PairBatch, dict[str, Tensor]]:
    """A PairBatch of leaf tensors in `dtype` (gradient fields require grad)."""
    leaves = {}
    for name, value in inputs.items():
        if value.dtype == torch.bool:
            leaves[name] = value
            continue
        leaf = value.to(dtype).detach()
        leaves[name] = leaf.requires_grad_(name in GRAD_FIELDS)
    return PairBatch(**leaves), leaves


def reference_tensors(leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    """float64 leaves with the same values as the library's inputs (after any dtype rounding)."""
    out = {}
    for name, value in leaves.items():
        if value.dtype == torch.bool:
            out[name] = value
        else:
            out[name] = value.detach().double().requires_grad_(name in GRAD_FIELDS)
    return out


# --- plain re-implementations of the original formulas ------------------------------------------


def seq(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum(-1)


def mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum(-1) / m.sum(-1)


def sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """eric-mitchell `preference_loss` / TRL sigmoid loss on the log-ratio logits."""
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def ref_dpo(t: dict[str, Tensor], beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    pi_logratios = seq(t["chosen_logps"], mc) - seq(t["rejected_logps"], mr)
    ref_logratios = seq(t["ref_chosen_logps"], mc) - seq(t["ref_rejected_logps"], mr)
    return sigmoid_loss(pi_logratios - ref_logratios, beta, label_smoothing)


def ref_centropy(t: dict[str, Tensor], beta: float = 0.1, alpha: float = 0.95) -> Tensor:
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    chosen = alpha * seq(t["chosen_logps"], mc) - seq(t["ref_chosen_logps"], mc)
    rejected = alpha * seq(t["rejected_logps"], mr) - seq(t["ref_rejected_logps"], mr)
    return -F.logsigmoid(beta * (chosen - rejected))


def ref_simpo(
    t: dict[str, Tensor],
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
) -> Tensor:
    """princeton-nlp/SimPO `simpo_loss` with average_log_prob=True."""
    pi_logratios = mean(t["chosen_logps"], t["chosen_mask"]) - mean(
        t["rejected_logps"], t["rejected_mask"]
    )
    return sigmoid_loss(pi_logratios - gamma_beta_ratio, beta, label_smoothing)


def ref_rdpo(t: dict[str, Tensor], beta: float = 0.1, alpha: float = 0.01) -> Tensor:
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    delta = (seq(t["chosen_logps"], mc) - seq(t["ref_chosen_logps"], mc)) - (
        seq(t["rejected_logps"], mr) - seq(t["ref_rejected_logps"], mr)
    )
    return -F.logsigmoid(beta * delta + alpha * (mc.sum(-1) - mr.sum(-1)))


def ref_tdpo(
    t: dict[str, Tensor], beta: float = 0.1, alpha: float = 0.5, variant: int = 1
) -> Tensor:
    """Vance0124 `tdpo_loss` on `_tdpo_get_batch_logps`-style sums."""
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    chosen_logps_margin = seq(t["chosen_logps"] - t["ref_chosen_logps"], mc)
    rejected_logps_margin = seq(t["rejected_logps"] - t["ref_rejected_logps"], mr)
    chosen_position_kl = seq(t["chosen_kl"], mc)
    rejected_position_kl = seq(t["rejected_kl"], mr)
    margin = chosen_logps_margin - rejected_logps_margin
    if variant == 1:
        logits = margin - (rejected_position_kl - chosen_position_kl)
    else:
        logits = margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    return -F.logsigmoid(beta * logits)


def ref_tisdpo(
    t: dict[str, Tensor], beta: float = 0.1, token_level: bool = False, alpha: float = 0.5
) -> Tensor:
    """exlaw/TIS-DPO `_get_batch_logps_tisdpo` + `tisdpo_loss`."""
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    wc, wr = t["chosen_weights"], t["rejected_weights"]
    chosen_margin = seq((t["chosen_logps"] - t["ref_chosen_logps"]) * wc, mc)
    rejected_margin = seq((t["rejected_logps"] - t["ref_rejected_logps"]) * wr, mr)
    logits = chosen_margin - rejected_margin
    if token_level:
        chosen_kl = seq(t["chosen_reverse_kl"] * wc, mc)
        rejected_kl = seq(t["rejected_reverse_kl"] * wr, mr)
        logits = logits - alpha * (chosen_kl - rejected_kl)
    return -F.logsigmoid(beta * logits)


def ref_sparsepo(
    t: dict[str, Tensor],
    masks: Callable[[str], tuple[Tensor, Tensor]],
    beta: float = 0.1,
    l1_u: float = 0.0,
    l1_d: float = 0.0,
    shared: bool = True,
) -> Tensor:
    """SparsePO trainer's loss: -log sig(beta (u - d)) + L1 of the masks (halved if shared)."""
    if shared:
        l1_u, l1_d = l1_u / 2, l1_d / 2
    parts = {}
    for side in ("chosen", "rejected"):
        m = t[f"{side}_mask"]
        reward_mask, kl_mask = masks(side)
        reward = seq(reward_mask * (t[f"{side}_logps"] - t[f"ref_{side}_logps"]), m)
        token_kl = seq(kl_mask * -t[f"{side}_kl"], m)  # sum p_ref (log pi - log ref) = -KL
        penalty = l1_u * seq(reward_mask.abs(), m) + l1_d * seq(kl_mask.abs(), m)
        parts[side] = (reward, token_kl, penalty)
    u = parts["chosen"][0] - parts["rejected"][0]
    d = parts["chosen"][1] - parts["rejected"][1]
    return -F.logsigmoid(beta * (u - d)) + parts["chosen"][2] + parts["rejected"][2]


def ref_rmipo(
    t: dict[str, Tensor], beta: float = 2.0, gamma_min: float = 0.3, gamma_max: float = 1.6
) -> Tensor:
    """liavonpenn/rmipo: SimPO with gamma from the detached PMI difference."""
    chosen_logps = mean(t["chosen_logps"], t["chosen_mask"])
    rejected_logps = mean(t["rejected_logps"], t["rejected_mask"])
    with torch.no_grad():
        prompt_chosen = mean(t["chosen_marginal_logps"], t["chosen_marginal_mask"].double())
        prompt_rejected = mean(t["rejected_marginal_logps"], t["rejected_marginal_mask"].double())
        prompt_chosen = torch.nan_to_num(prompt_chosen)  # 1-token responses: nothing scored
        prompt_rejected = torch.nan_to_num(prompt_rejected)
        delta_pmi = (chosen_logps - prompt_chosen) - (rejected_logps - prompt_rejected)
    scaling_factor = gamma_min + (gamma_max - gamma_min) * torch.exp(-delta_pmi.clamp(min=0.0))
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps - scaling_factor))


def ref_marginal(t: dict[str, Tensor], beta: float = 0.1) -> Tensor:
    """PMI reward: log pi(y|x) - log zeta(y) over the prompt-free model's scored tokens."""
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    zc, zr = t["chosen_marginal_mask"], t["rejected_marginal_mask"]
    pmi_c = seq(t["chosen_logps"], mc) - seq(t["chosen_marginal_logps"], zc).detach()
    pmi_r = seq(t["rejected_logps"], mr) - seq(t["rejected_marginal_logps"], zr).detach()
    return -F.logsigmoid(beta * (pmi_c - pmi_r))


# --- harness ------------------------------------------------------------------------------------


def compare(
    objective: torch.nn.Module,
    reference: Callable[[dict[str, Tensor]], Tensor],
    inputs: dict[str, Tensor],
    dtype: torch.dtype = torch.float32,
) -> None:
    """Loss, per-pair losses and input gradients of `objective` equal the reference's."""
    batch, leaves = to_batch(inputs, dtype)
    out = objective(batch)
    ref_t = reference_tensors(leaves)
    ref_losses = reference(ref_t)
    ref_loss = ref_losses.mean()
    rtol = 1e-6
    torch.testing.assert_close(out.losses.double(), ref_losses.detach(), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=rtol, atol=1e-12)
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    ref_loss.backward()
    grad_rtol = 1e-6 if dtype == torch.float32 else 2**-7
    for name in GRAD_FIELDS:
        if name not in leaves or leaves[name].grad is None and ref_t[name].grad is None:
            continue
        got = leaves[name].grad
        expected = ref_t[name].grad
        got = torch.zeros_like(leaves[name]) if got is None else got
        expected = torch.zeros_like(ref_t[name]) if expected is None else expected
        torch.testing.assert_close(
            got.double(), expected, rtol=grad_rtol, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )


CASES: list[tuple[str, dict[str, Any], Callable[..., Tensor]]] = [
    ("dpo", {}, ref_dpo),
    ("dpo", {"beta": 0.5, "label_smoothing": 0.2}, ref_dpo),
    ("dice", {"beta": 0.3}, ref_dpo),
    ("centropy", {}, ref_centropy),
    ("centropy", {"beta": 0.2, "alpha": 0.6}, ref_centropy),
    ("simpo", {}, ref_simpo),
    ("simpo", {"beta": 10.0, "gamma_beta_ratio": 0.8, "label_smoothing": 0.1}, ref_simpo),
    ("rdpo", {}, ref_rdpo),
    ("rdpo", {"beta": 0.05, "alpha": 0.2}, ref_rdpo),
    ("tdpo", {}, ref_tdpo),
    ("tdpo", {"beta": 0.1, "alpha": 0.5, "variant": 2}, ref_tdpo),
    ("tdpo", {"beta": 0.3, "alpha": 0.2, "variant": 2}, ref_tdpo),
    ("tisdpo", {}, ref_tisdpo),
    ("tisdpo", {"token_level": True, "alpha": 0.3}, ref_tisdpo),
    ("rmipo", {}, ref_rmipo),
    ("rmipo", {"beta": 2.5, "gamma_min": 0.1, "gamma_max": 2.0}, ref_rmipo),
    ("marginal", {"beta": 0.2}, ref_marginal),
]


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
@pytest.mark.parametrize(("name", "hparams", "reference"), CASES, ids=lambda v: str(v)[:30])
def test_objective_equals_original_formula(
    name: str, hparams: dict[str, Any], reference: Callable[..., Tensor], extreme: bool
) -> None:
    objective = make_objective(name, **hparams)
    compare(objective, lambda t: reference(t, **hparams), make_inputs(11, extreme=extreme))


@pytest.mark.parametrize(("name", "hparams", "reference"), CASES[::2], ids=lambda v: str(v)[:30])
def test_objective_bf16_inputs(
    name: str, hparams: dict[str, Any], reference: Callable[..., Tensor]
) -> None:
    objective = make_objective(name, **hparams)
    compare(objective, lambda t: reference(t, **hparams), make_inputs(12), dtype=torch.bfloat16)


def test_simpo_absolute_gamma_is_trl_convention() -> None:
    """TRL CPO's simpo_gamma is absolute: gamma = gamma_beta_ratio * beta."""
    inputs = make_inputs(13)
    compare(make_objective("simpo", beta=2.0, gamma=1.0), lambda t: ref_simpo(t, 2.0, 0.5), inputs)
    with pytest.raises(ValueError, match="gamma"):
        make_objective("simpo", gamma=1.0, gamma_beta_ratio=0.5)


def test_simpo_sft_weight_adds_token_mean_nll() -> None:
    inputs = make_inputs(14)
    objective = make_objective("simpo", sft_weight=0.3)
    batch, leaves = to_batch(inputs, torch.float32)
    out = objective(batch)
    t = reference_tensors(leaves)
    m = t["chosen_mask"]
    sft = -(t["chosen_logps"] * m).sum() / m.sum()  # nn.CrossEntropyLoss mean over tokens
    expected = ref_simpo(t).mean() + 0.3 * sft
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-6, atol=0)
    assert "sft_loss" in out.metrics


def _sparse_head_reference(objective: torch.nn.Module, hidden: Tensor) -> Tensor:
    """SparsePO `SimpleMaskAllLayers` with one layer, written out (dropout off).

    The head is part of the model, so it runs in its own precision (float32), like the log-probs.
    """
    head = objective.terms[1].reward_head
    ln = head.layer_norm
    x = F.layer_norm(hidden.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    per_layer = torch.relu(F.linear(x, head.per_layer[0].weight, head.per_layer[0].bias))
    return torch.relu(F.linear(per_layer, head.mixer.weight)).squeeze(-1).double()


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
def test_sparsepo_learned_masks(extreme: bool) -> None:
    torch.manual_seed(0)
    objective = make_objective(
        "sparsepo",
        hidden_size=8,
        num_layers=1,
        mask_dropout=0.0,
        l1_norm_param_u=0.01,
        l1_norm_param_d=0.02,
    )
    head_params = list(objective.parameters())
    assert len(head_params) == 5  # LayerNorm (2), per-layer linear (2), bias-free mixer (1)

    def masks(t: dict[str, Tensor], side: str) -> tuple[Tensor, Tensor]:
        m = _sparse_head_reference(objective, t[f"{side}_ref_hidden"])
        return m, m

    inputs = make_inputs(15, extreme=extreme)
    inputs = {k: v for k, v in inputs.items() if "marginal" not in k}

    def reference(t: dict[str, Tensor]) -> Tensor:
        return ref_sparsepo(t, lambda side: masks(t, side), 0.1, 0.01, 0.02, shared=True)

    compare(objective, reference, inputs)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in head_params)


def test_sparsepo_head_gradients_match_reference() -> None:
    torch.manual_seed(1)
    objective = make_objective(
        "sparsepo", hidden_size=8, num_layers=1, mask_dropout=0.0, l1_norm_param_u=0.01
    )
    inputs = make_inputs(16)
    batch, leaves = to_batch(inputs, torch.float32)
    objective(batch).loss.backward()
    got = [p.grad.clone() for p in objective.parameters()]  # type: ignore[union-attr]
    # Same loss with float64 parameters through the written-out head.
    params = [p.detach().double().requires_grad_() for p in objective.parameters()]
    ln_w, ln_b, lin_w, lin_b, mix_w = params
    t = reference_tensors(leaves)

    def masks(side: str) -> tuple[Tensor, Tensor]:
        h = t[f"{side}_ref_hidden"]
        x = F.layer_norm(h, (8,), ln_w, ln_b, 1e-5)
        m = torch.relu(F.linear(torch.relu(F.linear(x, lin_w, lin_b)), mix_w)).squeeze(-1)
        return m, m

    ref_sparsepo(t, masks, 0.1, 0.01, 0.0).mean().backward()
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g.double(), p.grad, rtol=1e-5, atol=1e-10)


def test_sparsepo_all_layer_head_matches_the_reference_model() -> None:
    """The default learned mask (the code's ``simple_all``) over L = 3 layers, written out in
    float64 as SparsePO's SimpleMaskAllLayers: one shared LayerNorm, per layer Linear(H, 1) +
    ReLU, a bias-free mixer + ReLU; values and the head's gradients."""
    torch.manual_seed(3)
    objective = make_objective("sparsepo", hidden_size=8, num_layers=3, mask_dropout=0.0)
    inputs = {k: v for k, v in make_inputs(19).items() if "marginal" not in k}
    g = torch.Generator().manual_seed(19)
    for side in ("chosen", "rejected"):
        mask = inputs[f"{side}_mask"]
        layers = torch.randn(*mask.shape, 3, 8, generator=g, dtype=torch.float64)
        inputs[f"{side}_ref_hidden"] = torch.where(mask[..., None, None], layers, FILL)
    batch, leaves = to_batch(inputs, torch.float32)
    out = objective(batch)
    out.loss.backward()
    got = [p.grad.clone() for p in objective.parameters()]  # type: ignore[union-attr]
    params = [p.detach().double().requires_grad_() for p in objective.parameters()]
    ln_w, ln_b, *per_layer, mix_w = params
    t = reference_tensors(leaves)

    def masks(side: str) -> tuple[Tensor, Tensor]:
        h = t[f"{side}_ref_hidden"]
        units = [
            torch.relu(
                F.linear(
                    F.layer_norm(h[..., i, :], (8,), ln_w, ln_b, 1e-5),
                    *per_layer[2 * i : 2 * i + 2],
                )
            )
            for i in range(3)
        ]
        m = torch.relu(F.linear(torch.cat(units, dim=-1), mix_w)).squeeze(-1)
        return m * t[f"{side}_mask"], m * t[f"{side}_mask"]

    expected = ref_sparsepo(t, masks, 0.1, 0.0, 0.0)
    torch.testing.assert_close(out.loss.double(), expected.mean().detach(), rtol=1e-5, atol=0)
    expected.mean().backward()
    assert len(got) == 2 + 2 * 3 + 1
    for a, b in zip(got, params, strict=True):
        torch.testing.assert_close(a.double(), b.grad, rtol=1e-5, atol=1e-10)


def _zn_rescale_reference(act: Tensor, mask: Tensor) -> Tensor:
    """MaPO's `zn_rescale`, written per row (float64, no fp16 casts)."""
    rows = []
    for i in range(act.shape[0]):
        a, m = act[i], mask[i]
        z = (a - a[m].mean()) / (a[m].std() + 1e-12)
        rows.append((z - z[m].min()) / (z[m].max() - z[m].min()) * m)
    return torch.stack(rows)


@pytest.mark.parametrize("source", ["activations", "given"])
def test_sparsepo_activation_and_given_masks(source: str) -> None:
    inputs = make_inputs(17, chosen_len=8, rejected_len=7)
    for side in ("chosen", "rejected"):  # activation masks need >= 2 tokens per response
        inputs[f"{side}_mask"][:, 2:5] = True
    inputs = {k: v for k, v in inputs.items() if "marginal" not in k}
    objective = make_objective("sparsepo", mask_source=source, beta=0.2)

    def masks(t: dict[str, Tensor], side: str) -> tuple[Tensor, Tensor]:
        if source == "given":
            w = t[f"{side}_weights"]
            return w, w
        m = _zn_rescale_reference(t[f"{side}_ref_hidden"].mean(-1), t[f"{side}_mask"])
        return m, m

    # Refill the padding with FILL after changing masks (make_inputs filled it before).
    for name, value in list(inputs.items()):
        if value.dtype != torch.bool and not name.endswith("ref_hidden"):
            side = "chosen" if "chosen" in name else "rejected"
            inputs[name] = torch.where(inputs[f"{side}_mask"], value.clamp(-500, 500), FILL)
    compare(objective, lambda t: ref_sparsepo(t, lambda s: masks(t, s), beta=0.2), inputs)


def test_sparsepo_independent_masks_and_switches() -> None:
    torch.manual_seed(2)
    inputs = {k: v for k, v in make_inputs(18).items() if "marginal" not in k}
    objective = make_objective(
        "sparsepo",
        hidden_size=8,
        num_layers=1,
        rw_kl_independent=True,
        mask_dropout=0.0,
        mask_on_kl=False,
    )
    term = objective.terms[1]
    assert term.kl_head is not None and term.kl_head is not term.reward_head
    batch, _ = to_batch(inputs, torch.float32)
    out = objective(batch)
    assert bool(torch.isfinite(out.loss))
    # mask_on_kl=False: the KL part is the full TDPO1 sequence KL.
    out_full = make_objective(
        "sparsepo", mask_source="given", mask_on_reward=False, mask_on_kl=False
    )(batch)
    tdpo = make_objective("tdpo", variant=1)(batch)
    torch.testing.assert_close(out_full.loss, tdpo.loss, rtol=1e-6, atol=0)


# --- presets are compositions -------------------------------------------------------------------

COMPOSITIONS: list[tuple[str, dict[str, Any], list[Any], dict[str, Any]]] = [
    ("dpo", {"beta": 0.2}, ["reference"], {}),
    ("centropy", {"alpha": 0.8}, ["reference", {"type": "policy_tempering", "coef": 0.2}], {}),
    (
        "simpo",
        {"beta": 2.0, "gamma_beta_ratio": 0.3},
        ["length_normalization", {"type": "winner_margin", "margin": 0.3}],
        {},
    ),
    (
        "rdpo",
        {"beta": 0.1, "alpha": 0.02},
        ["reference", {"type": "length_penalty", "coef": 0.2}],
        {},
    ),
    ("tdpo", {"variant": 1}, ["reference", {"type": "sequence_kl", "coef": 1.0}], {}),
    (
        "tdpo",
        {"variant": 2, "alpha": 0.5},
        ["reference", {"type": "sequence_kl", "coef": 0.5, "stop_grad_chosen": True}],
        {},
    ),
    (
        "tisdpo",
        {"token_level": True, "alpha": 0.4},
        ["reference", "token_weighting", {"type": "reverse_token_kl", "coef": 0.4}],
        {},
    ),
    (
        "rmipo",
        {"beta": 2.0},
        ["length_normalization", {"type": "pmi_margin", "gamma_min": 0.3, "gamma_max": 1.6}],
        {},
    ),
    ("marginal", {}, ["marginal"], {}),
    (
        "sparsepo",
        {"mask_source": "given"},
        ["reference", {"type": "sparse_token_masks", "source": "given"}],
        {},
    ),
]


@pytest.mark.parametrize(
    ("name", "hparams", "prior", "extra"), COMPOSITIONS, ids=[c[0] for c in COMPOSITIONS]
)
def test_preset_equals_its_composition(
    name: str, hparams: dict[str, Any], prior: list[Any], extra: dict[str, Any]
) -> None:
    inputs = make_inputs(19)
    batch, _ = to_batch(inputs, torch.float32)
    preset = make_objective(name, **hparams)
    beta = hparams.get("beta", objective_hyperparameters(name)["beta"])
    composed = make_objective("mi-dpo", beta=beta, prior=prior, **extra)
    a, b = preset(batch), composed(batch)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-7, atol=0)
    torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards, rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    ("init", "init_hparams", "method", "method_hparams"),
    [
        ("dpo", {}, "dpo", {}),
        ("centropy", {"alpha": 0.9}, "centropy", {"alpha": 0.9}),
        ("rdpo", {"alpha": 0.03}, "rdpo", {"alpha": 0.03}),
        ("tdpo", {}, "tdpo", {"variant": 1}),
    ],
)
def test_learnable_initialised_at_a_method_equals_it(
    init: str, init_hparams: dict[str, Any], method: str, method_hparams: dict[str, Any]
) -> None:
    inputs = make_inputs(20, extreme=True)
    batch_a, leaves_a = to_batch(inputs, torch.float32)
    batch_b, leaves_b = to_batch(inputs, torch.float32)
    learned = make_objective("learnable", beta=0.1, init=init, init_hparams=init_hparams)
    fixed = make_objective(method, beta=0.1, **method_hparams)
    a, b = learned(batch_a), fixed(batch_b)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-6, atol=1e-12)
    a.loss.backward()
    b.loss.backward()
    for name in ("chosen_logps", "rejected_logps", "chosen_kl", "rejected_kl"):
        ga, gb = leaves_a[name].grad, leaves_b[name].grad
        gb = torch.zeros_like(ga) if gb is None else gb
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-12)
    # The prior's own parameters receive a gradient: it is trainable from there.
    assert all(p.grad is not None for p in learned.parameters())


def test_sparsepo_mask_heads_train_like_the_reference_trainer() -> None:
    """SparsePO's trainer puts the mask heads in the policy's optimizer: its learning rate
    (no "lr" of their own) and mask_weight_decay on weight matrices only (its decay names
    exclude biases and LayerNorm)."""
    objective = make_objective("sparsepo", hidden_size=8, num_layers=2)
    assert objective.prior_lr == POLICY_LR
    decay, no_decay = objective.parameter_groups()
    head = objective.terms[1].reward_head
    matrices = {id(lin.weight) for lin in head.per_layer} | {id(head.mixer.weight)}
    assert {id(p) for p in decay["params"]} == matrices and decay["weight_decay"] == 0.01
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2 + 2  # LN, biases
    assert "lr" not in decay and "lr" not in no_decay
    own = make_objective(
        "sparsepo", hidden_size=8, num_layers=2, prior_lr=0.003, mask_weight_decay=0
    )
    assert [(g["lr"], g["weight_decay"]) for g in own.parameter_groups()] == [(0.003, 0.0)] * 2
    with pytest.raises(ValueError, match="prior_lr"):
        make_objective("mi-dpo", prior_lr="fast")


def test_learnable_prior_is_bounded_and_has_its_own_group() -> None:
    objective = make_objective("learnable", prior_lr=0.05, kl_coef_bounds=None)
    assert "chosen_kl" not in objective.requires and not objective.needs_reference_distribution
    groups = objective.parameter_groups()
    assert len(groups) == 1 and groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 0.0
    term = objective.terms[1]
    with torch.no_grad():
        term.gamma.raw.fill_(1e6)
        term.length_coef.raw.fill_(-1e6)
    summary = objective.prior_parameter_summary()
    assert summary["prior/learnable_family1/gamma"] <= 1.5
    assert summary["prior/learnable_family1/length_coef"] >= -1.0
    with pytest.raises(ValueError, match="gamma"):
        make_objective("learnable", init="centropy", init_hparams={"alpha": 0.2})
    with pytest.raises(ValueError, match="variant"):
        make_objective("learnable", init="tdpo", init_hparams={"variant": 2})


# --- closed forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "dice", "centropy", "rdpo", "tdpo", "tisdpo", "marginal"])
def test_zero_margin_gives_log_2(name: str) -> None:
    """Identical chosen and rejected inputs: logit 0, loss log 2 (any beta, any smoothing)."""
    inputs = make_inputs(21, chosen_len=6, rejected_len=6)
    for key in list(inputs):
        if key.startswith("rejected"):
            inputs[key] = inputs[key.replace("rejected", "chosen")].clone()
        if key.startswith("ref_rejected"):
            inputs[key] = inputs["ref_chosen_logps"].clone()
    batch, _ = to_batch(inputs, torch.float32)
    out = make_objective(name)(batch)
    torch.testing.assert_close(out.losses, torch.full((5,), math.log(2.0)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.chosen_rewards, out.rejected_rewards)


def test_simpo_zero_margin_and_known_dpo_value() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero = torch.zeros(1, 2)
    batch = PairBatch(zero - 1, zero - 1, mask, mask)
    out = make_objective("simpo", gamma=0.0)(batch)
    assert math.isclose(float(out.loss), math.log(2.0), rel_tol=1e-7)
    # DPO with beta * Delta = log 3: loss = log(1 + 1/3).
    chosen = torch.tensor([[math.log(3.0), 0.0]])
    batch = PairBatch(chosen, zero, mask, mask, ref_chosen_logps=zero, ref_rejected_logps=zero)
    out = make_objective("dpo", beta=1.0)(batch)
    assert math.isclose(float(out.loss), math.log(4.0 / 3.0), rel_tol=1e-7)
    out = make_objective("dpo", beta=1.0, label_smoothing=0.25)(batch)
    expected = 0.75 * math.log(4.0 / 3.0) + 0.25 * math.log(4.0)
    assert math.isclose(float(out.loss), expected, rel_tol=1e-7)


def test_rewards_are_beta_times_log_ratio_to_the_prior() -> None:
    inputs = make_inputs(22)
    batch, leaves = to_batch(inputs, torch.float32)
    out = make_objective("tdpo", beta=0.3)(batch)
    t = reference_tensors(leaves)
    expected = 0.3 * (
        seq(t["chosen_logps"] - t["ref_chosen_logps"], t["chosen_mask"])
        + seq(t["chosen_kl"], t["chosen_mask"])
    )  # the reference code's chosen_rewards for TDPO1
    torch.testing.assert_close(out.chosen_rewards.double(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.logits, out.chosen_rewards - out.rejected_rewards)
    log_prior = seq(t["ref_chosen_logps"] - t["chosen_kl"], t["chosen_mask"])
    torch.testing.assert_close(out.log_prior_chosen.double(), log_prior.detach(), rtol=1e-6, atol=0)
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "log_prior/rejected",
        "prior/sequence_kl1/seq_kl/chosen",
    ):
        assert isinstance(out.metrics[key], float)


def test_padding_values_never_reach_the_loss() -> None:
    inputs = make_inputs(23)
    batch, _ = to_batch(inputs, torch.float32)
    clean = make_objective("tdpo")(batch).losses
    for name, value in inputs.items():
        if value.dtype != torch.bool and not name.endswith("ref_hidden"):
            side = "chosen" if "chosen" in name else "rejected"
            inputs[name] = torch.where(inputs[f"{side}_mask"], value, float("nan"))
    batch, _ = to_batch(inputs, torch.float32)
    out = make_objective("tdpo")(batch)
    torch.testing.assert_close(out.losses, clean)
    out.loss.backward()
    assert bool(torch.isfinite(batch.chosen_logps.grad).all())  # type: ignore[arg-type]


# --- requires / registry / bad input ------------------------------------------------------------


def test_requires_and_reference_needs() -> None:
    expect = {
        "dpo": ({"ref_chosen_logps", "ref_rejected_logps"}, False),
        "simpo": (set(), False),
        "tdpo": ({"ref_chosen_logps", "ref_rejected_logps", "chosen_kl", "rejected_kl"}, True),
        "tisdpo": (
            {"ref_chosen_logps", "ref_rejected_logps", "chosen_weights", "rejected_weights"},
            False,
        ),
        "rmipo": ({"chosen_marginal_logps", "rejected_marginal_logps"}, False),
        "marginal": ({"chosen_marginal_logps", "rejected_marginal_logps"}, False),
    }
    for name, (fields, distribution) in expect.items():
        objective = make_objective(name)
        assert objective.requires == fields, name
        assert objective.needs_reference_distribution is distribution, name
        assert objective.name == name
    rmipo = make_objective("rmipo")
    assert rmipo.accepts == rmipo.requires | {"chosen_marginal_mask", "rejected_marginal_mask"}
    assert make_objective("dpo").accepts == make_objective("dpo").requires
    sparse = make_objective("sparsepo", hidden_size=4, num_layers=1)
    assert {"chosen_ref_hidden", "chosen_kl"} <= sparse.requires and sparse.needs_reference_hidden
    assert make_objective("tisdpo", token_level=True).needs_reference_distribution
    assert (
        set(available_objectives())
        == set(OBJECTIVES)
        >= {
            "dpo",
            "dice",
            "centropy",
            "simpo",
            "rdpo",
            "tdpo",
            "tisdpo",
            "sparsepo",
            "rmipo",
            "learnable",
            "marginal",
            "mi-dpo",
        }
    )
    assert isinstance(make_objective("dpo"), torch.nn.Module)


def _valid(**overrides: Any) -> PairBatch:
    inputs = make_inputs(24)
    inputs.update(overrides)
    return to_batch(inputs, torch.float32)[0]


@pytest.mark.parametrize(
    ("objective", "batch_fn", "match"),
    [
        ("dpo", lambda: _valid(chosen_mask=torch.ones(5, 3, dtype=torch.bool)), "chosen_mask"),
        ("dpo", lambda: _valid(rejected_logps=torch.zeros(4, 6)), "rejected_mask|rejected_logps"),
        ("dpo", lambda: _valid(ref_chosen_logps=torch.zeros(5, 2)), "ref_chosen_logps"),
        ("tdpo", lambda: _valid(rejected_kl=torch.zeros(5, 9)), "rejected_kl"),
        (
            "dpo",
            lambda: _valid(chosen_mask=torch.zeros(5, 9, dtype=torch.bool)),
            "chosen_mask: pair",
        ),
        ("dpo", lambda: _valid(chosen_logps=torch.full((5, 9), float("nan"))), "chosen_logps"),
        (
            "dpo",
            lambda: _valid(ref_rejected_logps=torch.full((5, 6), float("-inf"))),
            "ref_rejected_logps",
        ),
        ("tdpo", lambda: _valid(chosen_kl=torch.full((5, 9), float("inf"))), "chosen_kl"),
        ("dpo", lambda: _valid(chosen_mask=torch.full((5, 9), 2)), "chosen_mask"),
    ],
)
def test_bad_batches_raise_naming_the_field(
    objective: str, batch_fn: Callable[[], PairBatch], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_objective(objective)(batch_fn())


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("tdpo", "chosen_kl"),
        ("dpo", "ref_chosen_logps"),
        ("tisdpo", "chosen_weights"),
        ("rmipo", "chosen_marginal_logps"),
        ("marginal", "rejected_marginal_logps"),
    ],
)
def test_missing_field_for_prior_raises(name: str, missing: str) -> None:
    inputs = make_inputs(25)
    inputs.pop(missing)
    batch, _ = to_batch(inputs, torch.float32)
    with pytest.raises(ValueError, match=f"objective '{name}': {missing} is required"):
        make_objective(name)(batch)


def test_bad_names_and_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="objective 'ipo': unknown; expected one of"):
        make_objective("ipo")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['if_tdpo2'\]"):
        make_objective("tdpo", if_tdpo2=True)
    with pytest.raises(ValueError, match="variant"):
        make_objective("tdpo", variant=3)
    with pytest.raises(ValueError, match="beta"):
        make_objective("dpo", beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_objective("dpo", label_smoothing=0.7)
    with pytest.raises(ValueError, match="hidden_size"):
        make_objective("sparsepo")
    with pytest.raises(ValueError, match="num_layers"):
        make_objective("sparsepo", hidden_size=8)
    with pytest.raises(ValueError, match="mask_source"):
        make_objective("sparsepo", mask_source="attention")
    with pytest.raises(ValueError, match="prior term 'entropy': unknown"):
        make_objective("mi-dpo", prior=["entropy"])
    with pytest.raises(ValueError, match=r"prior term 'sequence_kl': unknown hyper-parameter"):
        make_objective("mi-dpo", prior=[{"type": "sequence_kl", "alpha": 1.0}])
    with pytest.raises(ValueError, match="marginal_source"):
        make_objective("marginal", marginal_source="ema")


def test_validating_a_valid_batch_reads_the_device_once() -> None:
    inputs = make_inputs(26)
    for side in SIDES:  # 4-D activations [B, T, L, H]; non-bool (0/1) masks take the value check
        inputs[f"{side}_ref_hidden"] = inputs[f"{side}_ref_hidden"].reshape(5, -1, 2, 4)
        inputs[f"{side}_mask"] = inputs[f"{side}_mask"].float()
        inputs[f"{side}_marginal_mask"] = inputs[f"{side}_marginal_mask"].long()
    batch, _ = to_batch(inputs, torch.float32)
    assert all(getattr(batch, f.name) is not None for f in dataclasses.fields(PairBatch))
    counter = HostReadCounter()
    with counter:
        validate_batch(batch, field_names(SIDE_FIELDS), "mi-dpo")
    assert len(counter.reads) == 1, counter.reads
