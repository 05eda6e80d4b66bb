"""Learnable and marginal priors: the paper's section 5.2 claim and Lemma 1, measured."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from pipeline.objectives import (
    LearnableFamily,
    MIDPOObjective,
    PairBatch,
    ReferencePrior,
    make_objective,
    marginal_prior_nll,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


Problem = tuple[Tensor, Tensor, Tensor, Tensor]


def small_problem(seed: int = 0, pairs: int = 32, length: int = 6, vocab: int = 8) -> Problem:
    """Random pairs (noisy: no policy separates them) and a policy with 2 parameters.

    pi(. | prefix) = softmax(ref_logits + features @ theta): the policy family is constrained,
    so every objective has a finite optimum and the priors decide how low it goes.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, pairs, length), generator=g)
    lengths = torch.randint(1, length + 1, (2, pairs), generator=g)
    masks = torch.arange(length)[None, None, :] < lengths[..., None]
    ref_logits = torch.randn(2, pairs, length, vocab, generator=g)
    features = torch.randn(vocab, 2, generator=g)
    return tokens, masks, ref_logits, features


def batch_of(theta: Tensor, problem: Problem) -> PairBatch:
    tokens, masks, ref_logits, features = problem
    logps_all = (ref_logits + features @ theta).log_softmax(-1)
    ref_logps_all = ref_logits.log_softmax(-1)
    logps = logps_all.gather(-1, tokens[..., None]).squeeze(-1)
    ref_logps = ref_logps_all.gather(-1, tokens[..., None]).squeeze(-1)
    kl = (ref_logps_all.exp() * (ref_logps_all - logps_all)).sum(-1)  # KL(ref || pi)
    return PairBatch(
        logps[0], logps[1], masks[0], masks[1], ref_logps[0], ref_logps[1], kl[0], kl[1]
    )


def final_loss(objective: MIDPOObjective, problem: Problem, steps: int = 100) -> float:
    """Adam on the policy (and, if learnable, on the prior with its own group)."""
    objective.validate = False  # the inputs are known good; keeps the loop cheap
    theta = torch.zeros(2, requires_grad=True)
    groups = [{"params": [theta], "lr": 0.2}] + objective.parameter_groups(lr=0.2)
    optimizer = torch.optim.Adam(groups)
    for _ in range(steps):
        loss = objective(batch_of(theta, problem)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(objective(batch_of(theta, problem)).loss)


def test_joint_optimisation_beats_every_fixed_prior_of_its_family() -> None:
    """min over (pi, zeta) <= min over pi at any fixed zeta of the family (MI-DPO section 5.2).

    Fixed priors: the named methods inside the family and the corners of an inner box of it.
    """
    problem = small_problem()
    joint_objective = make_objective("learnable", beta=0.1, init="dpo")
    joint = final_loss(joint_objective, problem)
    fixed: dict[str, float] = {}
    for name, hparams in [
        ("dpo", {}),
        ("centropy", {"alpha": 0.95}),
        ("rdpo", {"alpha": 0.01}),
        ("tdpo", {"variant": 1}),
    ]:
        fixed[name] = final_loss(make_objective(name, beta=0.1, **hparams), problem)
    for gamma, length_coef, kl_coef in itertools.product((0.6, 1.4), (-0.8, 0.8), (-1.6, 1.6)):
        family = LearnableFamily(gamma, length_coef, kl_coef)
        family.requires_grad_(False)  # a fixed point of the family
        objective = make_objective("mi-dpo", beta=0.1, prior=[ReferencePrior(), family])
        fixed[f"gamma={gamma},c={length_coef},kappa={kl_coef}"] = final_loss(objective, problem)
    best_fixed = min(fixed.values())
    assert joint < best_fixed, (joint, sorted(fixed.items(), key=lambda kv: kv[1])[:3])
    # The prior moved away from its DPO starting point and stayed inside its bounds.
    summary = joint_objective.prior_parameter_summary()
    assert summary["prior/learnable_family1/gamma"] != 1.0
    assert 0.5 < summary["prior/learnable_family1/gamma"] < 1.5


def test_marginal_prior_step_recovers_the_marginal_and_minimises_mutual_information() -> None:
    """Lemma 1: fitting zeta by maximum likelihood to the policy's responses gives the marginal,
    which minimises E_x KL(pi(.|x) || zeta) (= I(X; Y) there)."""
    g = torch.Generator().manual_seed(0)
    prompts, responses = 3, 5
    policy = torch.randn(prompts, responses, generator=g).softmax(-1)  # pi(y|x), |y| = 1 token
    marginal = policy.mean(0)
    prior_logits = torch.zeros(responses, requires_grad=True)  # the prompt-free model
    optimizer = torch.optim.Adam([prior_logits], lr=0.1)
    # Every (x, y) once, weighted by pi(y|x): the exact expectation over the policy's responses.
    mask = torch.ones(prompts * responses, 1, dtype=torch.bool)
    weights = policy.reshape(-1)
    for _ in range(300):
        log_zeta = prior_logits.log_softmax(-1).repeat(prompts)[:, None]
        loss = marginal_prior_nll(log_zeta, mask, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted = prior_logits.detach().softmax(-1)
    torch.testing.assert_close(fitted, marginal, rtol=0, atol=1e-3)

    def expected_kl(q: Tensor) -> float:
        return float((policy * (policy.log() - q.log())).sum(-1).mean())

    mutual_information = expected_kl(marginal)
    assert expected_kl(fitted) <= mutual_information + 1e-5
    for _ in range(5):
        other = torch.rand(responses, generator=g).softmax(-1)
        assert expected_kl(other) > mutual_information
    # With zeta = marginal the implicit reward is beta * PMI.
    chosen, rejected = torch.tensor([[0]]), torch.tensor([[1]])
    log_pi = policy[0].log()
    one = torch.ones(1, 1, dtype=torch.bool)
    batch = PairBatch(
        log_pi[chosen].float(),
        log_pi[rejected].float(),
        one,
        one,
        chosen_marginal_logps=marginal.log()[chosen].float(),
        rejected_marginal_logps=marginal.log()[rejected].float(),
    )
    out = make_objective("marginal", beta=0.5)(batch)
    pmi = (log_pi - marginal.log()).float()
    torch.testing.assert_close(out.chosen_rewards, 0.5 * pmi[chosen].reshape(1))


def test_marginal_prior_nll_values_and_errors() -> None:
    logps = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(marginal_prior_nll(logps, mask).detach()) == pytest.approx(2.0)
    weighted = marginal_prior_nll(logps, mask, torch.tensor([1.0, 3.0]))
    assert float(weighted.detach()) == pytest.approx((3.0 + 3 * 3.0) / (2 + 3))
    weighted.backward()
    assert logps.grad is not None and float(logps.grad[0, 2]) == 0.0
    with pytest.raises(ValueError, match="mask"):
        marginal_prior_nll(logps, mask[:, :2])
    with pytest.raises(ValueError, match="at least one"):
        marginal_prior_nll(logps, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="weights"):
        marginal_prior_nll(logps, mask, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="marginal_logps"):
        marginal_prior_nll(torch.full((2, 3), float("nan")), mask)
