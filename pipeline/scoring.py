"""Scoring responses and building preference pairs.

Scorers (all map a batch of (prompt, response) to one float each):

- a Python reward function named ``module:function`` (``pipeline.rewards:vader_sentiment`` is the
  built-in one); rows where it raises or returns NaN/inf are reported, not guessed;
- a reward model: any ``AutoModelForSequenceClassification`` folder (1 label: its logit; 2 labels:
  logit[1] - logit[0]);
- a pairwise LLM judge through vLLM: every two responses of a prompt are compared in both orders,
  P(A better) = sigmoid(log p("A") - log p("B")) at the judge's first answer token, and a
  response's score is its mean win probability;
- DICE's implicit reward beta * (log pi_policy(y|x) - log pi_ref(y|x)) (``implicit_rewards``).

``scorer_for(cfg)`` builds the run's scorer (``score.scorer``) for score and evaluate alike.

Pairs (``build_pairs``): per prompt, duplicates are merged, truncated and unscorable responses
removed (counted), then best-vs-worst, every pair above a margin, or a random pair is taken on
the selection score reward - alpha * length (alpha = 0 unless DICE's length regularisation is on;
``length_balanced_alpha`` picks it so mean chosen and rejected lengths balance). Pair rows,
reference log-probs and TIS-DPO weights: ``pipeline.pairing``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import RunConfig, reward_function_problem
from pipeline.console import console, progress
from pipeline.generation import live_vllm_engine, release_vllm_engine, resolve_device, vllm_for
from pipeline.models import ModelError, check_model_folder, load_tokenizer, render_prompt
from pipeline.runstore import StageError

if TYPE_CHECKING:
    from pipeline.data import TextLimit

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class ScoringError(StageError):
    """Scoring cannot go on: a reward function that fails, a judge prompt too long, ..."""


# -- reward functions --------------------------------------------------------------------------
def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function`` (only the module named in config is imported; importing runs
    its top-level code: config is code, see docs/reliability.md). The shape and standard-library
    modules (``os:system``) are refused before any import; the function must accept
    ``(prompts, responses)``."""
    problem = reward_function_problem(spec)
    if problem:
        raise ScoringError(f"score.{problem}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScoringError(
            f"score.scorer.function={spec!r}: cannot import {module_name!r} ({e})"
        ) from None
    fn = getattr(module, attr, None)
    # A class would "return" an instance; a builtin is C code (print, eval), not a reward.
    if not callable(fn) or isinstance(fn, type) or inspect.isbuiltin(fn):
        raise ScoringError(
            f"score.scorer.function={spec!r}: {module_name}.{attr} is not a Python function"
            + ("" if fn is not None else f" ({module_name} has no function {attr!r})")
        )
    try:
        inspect.signature(fn).bind(["prompt"], ["response"])
    except TypeError:
        raise ScoringError(
            f"score.scorer.function={spec!r}: {module_name}.{attr}{inspect.signature(fn)} "
            "does not take (prompts, responses)"
        ) from None
    return fn


def reward_module_file(spec: str) -> Path | None:
    """The source file of a reward function's module, found without running the module (its
    parent packages are imported), or None when there is none to read."""
    try:
        found = importlib.util.find_spec(spec.partition(":")[0])
    except (ImportError, ValueError):
        return None  # load_reward_function reports it
    origin = Path(found.origin) if found is not None and found.origin else None
    return origin if origin is not None and origin.is_file() else None


def _check_rewards(values: Any, expected: int) -> list[float]:
    values = list(values)
    if len(values) != expected:
        raise ValueError(f"returned {len(values)} values for {expected} responses")
    return [float(v) for v in values]


def call_reward_function(
    fn: RewardFn,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    desc: str = "score",
) -> tuple[np.ndarray, dict[int, str]]:
    """Rewards (NaN where invalid) and {row: why} for rows that raised or were NaN/inf.

    A batch that raises is retried row by row, so one bad row does not hide the others.
    """
    rewards = np.full(len(responses), np.nan)
    errors: dict[int, str] = {}
    for b in progress(iterable=range(0, len(responses), batch_size), desc=desc, unit="batch"):
        rows = range(b, min(b + batch_size, len(responses)))
        try:
            values = _check_rewards(
                fn([prompts[i] for i in rows], [responses[i] for i in rows]), len(rows)
            )
            for i, v in zip(rows, values, strict=True):
                rewards[i] = v
        except Exception:
            for i in rows:
                try:
                    rewards[i] = _check_rewards(fn([prompts[i]], [responses[i]]), 1)[0]
                except Exception as e:  # the user's function: any error is reported per row
                    errors[i] = f"raised {type(e).__name__}: {e}"
    for i in np.flatnonzero(~np.isfinite(rewards)):
        errors.setdefault(int(i), f"returned {rewards[i]}")
    return rewards, errors


class RewardModelScorer:
    """``AutoModelForSequenceClassification`` on chat-rendered (prompt, response) pairs."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        device: str = "auto",
        max_length: int = 1024,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        path = check_model_folder(Path(model_dir).expanduser(), allow_pickle=allow_pickle)
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                str(path),
                dtype=getattr(torch, dtype),
                trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle or None,
            )
            .to(self.device)
            .eval()
        )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelError(
                f"reward model {path} has {labels} labels; expected 1 (a score) or "
                "2 (negative, positive)"
            )
        self.max_length = max_length
        self.path = path

    def text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(
                    [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": response},
                    ],
                    tokenize=False,
                )
            )
        return f"{prompt}\n{response}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        too_long = int((enc["attention_mask"].sum(-1) > self.max_length).sum())
        if too_long:
            raise ScoringError(
                f"{too_long} reward-model input(s) exceed score.scorer.max_length="
                f"{self.max_length} tokens"
            )
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        scores = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
        return [float(x) for x in scores.cpu()]


DEFAULT_JUDGE_TEMPLATE = (
    "Compare two responses to the same user message and say which one is better.\n\n"
    "User message:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Answer with one letter: A if Response A is better, B if Response B is better."
)


class JudgeScorer:
    """Pairwise LLM judge through vLLM; a response's score is its mean win probability."""

    def __init__(
        self, llm: Any, tokenizer: Any, template: str | None = None, max_length: int = 1024
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template or DEFAULT_JUDGE_TEMPLATE
        for key in ("{prompt}", "{response_a}", "{response_b}"):
            if key not in self.template:
                raise ScoringError(f"score.scorer.judge_template must contain {key}")
        self.answer_ids = []
        for letter in ("A", "B"):
            ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ModelError(
                    f"judge tokenizer splits {letter!r} into {len(ids)} tokens; "
                    "the judge needs single-token answers"
                )
            self.answer_ids.append(ids[0])
        self.max_length = max_length

    def judge_ids(self, prompt: str, a: str, b: str) -> list[int]:
        text = render_prompt(
            self.tokenizer, self.template.format(prompt=prompt, response_a=a, response_b=b)
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_groups(
        self, prompts: Sequence[str], groups: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per prompt, the mean win probability of each of its responses."""
        from vllm import SamplingParams

        comparisons = []  # (group, i, j, ids): response i shown as A, j as B
        for g, (prompt, responses) in enumerate(zip(prompts, groups, strict=True)):
            for i in range(len(responses)):
                for j in range(len(responses)):
                    if i != j:
                        ids = self.judge_ids(prompt, responses[i], responses[j])
                        if len(ids) + 1 > self.max_length:
                            raise ScoringError(
                                f"judge prompt for prompt #{g} is {len(ids)} tokens, over "
                                f"score.scorer.max_length={self.max_length}"
                            )
                        comparisons.append((g, i, j, ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [
            {"prompt_token_ids": ids + [answer]}
            for *_, ids in comparisons
            for answer in self.answer_ids
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=True)
        wins = [np.zeros(len(r)) for r in groups]
        for c, (g, i, j, _) in enumerate(comparisons):
            log_a, log_b = (
                float(outputs[2 * c + k].prompt_logprobs[-1][self.answer_ids[k]].logprob)
                for k in (0, 1)
            )
            p_a = 1.0 / (1.0 + math.exp(log_b - log_a))
            wins[g][i] += p_a
            wins[g][j] += 1.0 - p_a
        # Each response meets every other one twice (as A and as B).
        return [list(w / max(2 * (len(w) - 1), 1)) for w in wins]


def implicit_rewards(
    policy_logps: Sequence[Sequence[float]], ref_logps: Sequence[Sequence[float]], beta: float
) -> np.ndarray:
    """DICE's reward of the previous policy: beta * sum_t (log pi(y_t) - log pi_ref(y_t))."""
    return np.array(
        [beta * (math.fsum(p) - math.fsum(r)) for p, r in zip(policy_logps, ref_logps, strict=True)]
    )


# -- pairs ------------------------------------------------------------------------------------------
@dataclass
class PromptGroup:
    """The K scored responses of one prompt."""

    prompt_id: str
    rewards: np.ndarray  # NaN: no valid reward
    lengths: np.ndarray  # for length regularisation (chars or tokens)
    truncated: np.ndarray  # bool: finish reason "length"
    keys: list[Any]  # equal keys = identical responses (token ids)


@dataclass
class PairPick:
    group: int
    chosen: int
    rejected: int
    margin: float  # in selection score (reward - alpha * length)


@dataclass
class PairResult:
    pairs: list[PairPick]
    drops: Counter[str] = field(default_factory=Counter)


def _rng(seed: int, prompt_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def build_pairs(
    groups: Sequence[PromptGroup],
    strategy: str = "best_vs_worst",
    min_margin: float = 0.0,
    drop_ties: bool = True,
    drop_truncated: bool = True,
    alpha: float = 0.0,
    seed: int = 0,
) -> PairResult:
    """Preference pairs from scored groups; ``drops`` counts every response and prompt left out.

    A pair is kept when its margin (in selection score) is >= min_margin and, with drop_ties,
    > 0. Drops: ``response_truncated``, ``response_invalid_reward``, ``response_duplicate``
    (a response equal to an earlier one of its prompt), ``prompt_all_samples_equal``,
    ``prompt_too_few_responses``, ``prompt_tie``, ``prompt_below_margin``.
    """
    if strategy not in ("best_vs_worst", "margin", "random"):
        raise ValueError(f"unknown pair strategy {strategy!r}")
    result = PairResult(pairs=[])
    drops = result.drops
    for g, group in enumerate(groups):
        k = len(group.keys)
        if k >= 2 and all(key == group.keys[0] for key in group.keys):
            drops["prompt_all_samples_equal"] += 1
            continue
        seen: set[Any] = set()
        usable = []
        for i in range(k):
            if group.keys[i] in seen:
                drops["response_duplicate"] += 1
                continue
            seen.add(group.keys[i])
            if not np.isfinite(group.rewards[i]):
                drops["response_invalid_reward"] += 1
            elif drop_truncated and group.truncated[i]:
                drops["response_truncated"] += 1
            else:
                usable.append(i)
        if len(usable) < 2:
            drops["prompt_too_few_responses"] += 1
            continue
        score = group.rewards - alpha * group.lengths

        def keep(c: int, r: int, score: np.ndarray = score) -> bool:
            m = score[c] - score[r]
            return bool(m >= min_margin and (m > 0 or not drop_ties))

        if strategy == "best_vs_worst":
            # First index wins ties, so equal scores never swap the pair's order.
            c = max(usable, key=lambda i: (score[i], -i))
            r = min((i for i in usable if i != c), key=lambda i: (score[i], i))
            candidates = [(c, r)]
        elif strategy == "random":
            a, b = _rng(seed, group.prompt_id).choice(usable, size=2, replace=False).tolist()
            candidates = [(a, b) if score[a] >= score[b] else (b, a)]
        else:
            candidates = [
                (c, r)
                for c in usable
                for r in usable
                if score[c] > score[r] or (score[c] == score[r] and c < r)
            ]
        kept = [(c, r) for c, r in candidates if keep(c, r)]
        if not kept:
            tied = all(score[c] == score[r] for c, r in candidates)
            drops["prompt_tie" if tied and drop_ties else "prompt_below_margin"] += 1
            continue
        result.pairs.extend(PairPick(g, c, r, float(score[c] - score[r])) for c, r in kept)
    return result


def length_gap(groups: Sequence[PromptGroup], result: PairResult) -> float:
    """Mean chosen length minus mean rejected length over the pairs."""
    if not result.pairs:
        return 0.0
    return float(
        np.mean(
            [
                groups[p.group].lengths[p.chosen] - groups[p.group].lengths[p.rejected]
                for p in result.pairs
            ]
        )
    )


def length_balanced_alpha(
    groups: Sequence[PromptGroup], max_candidates: int = 256, **pair_kwargs: Any
) -> float:
    """DICE's alpha: the smallest alpha >= 0 whose pairs have the most balanced mean lengths.

    The pairs only change where two responses' scores r - alpha * L cross, at
    alpha = (r_i - r_j) / (L_i - L_j); we try 0, the midpoints between those crossings and one
    point past the last (subsampled to ``max_candidates`` by quantile when there are many).
    """
    crossings = []
    for g in groups:
        ok = np.isfinite(g.rewards)
        r, length = g.rewards[ok], g.lengths[ok]
        dr = r[:, None] - r[None, :]
        dl = length[:, None] - length[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = dr / dl
        crossings.append(a[(dl != 0) & (a > 0) & np.isfinite(a)])
    points = np.unique(np.concatenate(crossings)) if crossings else np.array([])
    if len(points) > max_candidates:
        points = np.unique(np.quantile(points, np.linspace(0, 1, max_candidates)))
    candidates = [0.0]
    if len(points):
        candidates += list((points[:-1] + points[1:]) / 2) + [float(points[-1]) * 2]
    best_alpha, best_gap = 0.0, math.inf
    for alpha in candidates:
        gap = abs(length_gap(groups, build_pairs(groups, alpha=alpha, **pair_kwargs)))
        if gap < best_gap - 1e-12:
            best_alpha, best_gap = float(alpha), gap
    return best_alpha


def replay_count(num_generated: int, fraction: float, available: int) -> int:
    """Replay pairs so they make up ``fraction`` of the final set (capped at what exists)."""
    if fraction <= 0 or available == 0:
        return 0
    return min(available, round(fraction * num_generated / (1.0 - fraction)))


def read_preference_rows(
    path: str | Path, tokenizer: Any, drop_bad: bool = False, limit: TextLimit | None = None
) -> list[dict[str, Any]]:
    """A user preference dataset (TRL formats) -> rows {prompt, prompt_text, chosen, rejected};
    ``limit`` bounds texts before they are rendered or tokenised."""
    from pipeline import data

    rows = data.validate_rows(data.load_records(path), "preference", drop_bad, str(path), limit)
    return [
        {
            "prompt": data.prompt_display(r["prompt"]),
            "prompt_text": render_prompt(tokenizer, r["prompt"]),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in rows
    ]


def describe_errors(errors: dict[int, str], where: Callable[[int], str], limit: int = 10) -> str:
    lines = [f"  {where(i)}: {why}" for i, why in sorted(errors.items())[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def warn(stage: str, message: str) -> None:
    """A warning on stderr, labelled with the stage that gives it."""
    print(f"[{stage}] {message}", file=console)


def config_model_dir(
    value: str | None, key: str, default: Path | None = None, allow_pickle: bool = False
) -> Path:
    """A model folder named by config key ``key`` (``default`` when the key is unset): resolved
    and checked (``allow_pickle``: model.allow_pickle_weights), errors naming the key."""
    if value is None:
        if default is None:
            raise ModelError(f"{key}: no model folder given")
        return default
    path = Path(value).expanduser().resolve()
    try:
        return check_model_folder(path, allow_pickle=allow_pickle)
    except ModelError as e:
        raise ModelError(f"{key}: {e}") from None


# -- the run's scorer ------------------------------------------------------------------------------
class RunScorer:
    """The run's scorer (``score.scorer``): rewards every response of each prompt's group.

    Calling it returns the rewards flattened prompt-major (NaN where invalid) and {flat index:
    why} for the invalid ones. A reward function or reward model scores each response on its
    own; the judge compares the responses of a group with each other. ``close`` (or leaving the
    ``with`` block) shuts down the judge's vLLM engine if this scorer started it; an engine that
    was already running (generate's, in the same process) is left for the next user.
    """

    def __init__(
        self,
        name: str,
        batch_size: int,
        reward_fn: RewardFn | None = None,
        judge: JudgeScorer | None = None,
        owns_engine: bool = False,
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.reward_fn = reward_fn
        self.judge = judge
        self.owns_engine = owns_engine

    def __call__(
        self, prompts: Sequence[Any], groups: Sequence[Sequence[str]], desc: str = "score"
    ) -> tuple[np.ndarray, dict[int, str]]:
        if self.judge is not None:
            scores = self.judge.score_groups(prompts, groups)
            return np.array([v for group in scores for v in group], dtype=float), {}
        assert self.reward_fn is not None
        flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
        responses = [t for group in groups for t in group]
        return call_reward_function(
            self.reward_fn, flat_prompts, responses, self.batch_size, desc=desc
        )

    def close(self) -> None:
        judge, self.judge = self.judge, None
        if judge is not None and self.owns_engine and live_vllm_engine() is judge.llm:
            release_vllm_engine()

    def __enter__(self) -> RunScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scorer_for(cfg: RunConfig) -> RunScorer:
    """The scorer ``score.scorer`` names: a reward function, a reward model or an LLM judge
    (model folders checked, errors naming ``score.scorer.model``). Used by score and evaluate."""
    sc = cfg.score.scorer
    if sc.kind == "function":
        return RunScorer(sc.function, sc.batch_size, reward_fn=load_reward_function(sc.function))
    assert sc.model is not None  # validated by ScorerConfig
    model_dir = config_model_dir(
        sc.model, "score.scorer.model", allow_pickle=cfg.model.allow_pickle_weights
    )
    if sc.kind == "reward_model":
        rm = RewardModelScorer(
            model_dir,
            dtype=sc.dtype,
            device=cfg.score.device,
            max_length=sc.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
            allow_pickle=cfg.model.allow_pickle_weights,
        )
        return RunScorer(f"reward_model({model_dir})", sc.batch_size, reward_fn=rm)
    running = live_vllm_engine()
    llm = vllm_for(cfg, model_dir, sc.dtype)
    judge = JudgeScorer(llm, load_tokenizer(model_dir), sc.judge_template, sc.max_length)
    return RunScorer(
        f"judge({model_dir})", sc.batch_size, judge=judge, owns_engine=llm is not running
    )


def token_weights(
    positive_logps: Sequence[float],
    negative_logps: Sequence[float],
    side: str,
    transform: str,
    params: dict[str, float],
    ends_with_eos: bool,
    generator: Any = None,
) -> list[float]:
    """TIS-DPO weights of one response's tokens (pipeline.objectives' estimator)."""
    import torch

    from pipeline.objectives import contrastive_token_weights

    n = len(positive_logps)
    weights = contrastive_token_weights(
        torch.tensor([list(positive_logps)], dtype=torch.float64),
        torch.tensor([list(negative_logps)], dtype=torch.float64),
        torch.ones((1, n), dtype=torch.bool),
        side=side,
        transform=transform,
        transform_params=params,
        zero_last_token=ends_with_eos,
        generator=generator,
    )
    return [float(x) for x in weights[0]]


def write_summary_plot(
    path: Path, scored: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]
) -> None:
    """Reward distribution, pair margins and chosen/rejected lengths in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [
        r["reward"] for r in scored if not r["invalid_reason"] and math.isfinite(r["reward"])
    ]
    margins = [
        p["chosen_reward"] - p["rejected_reward"]
        for p in pairs
        if math.isfinite(p["chosen_reward"] - p["rejected_reward"])
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].hist(rewards, bins=30, color="tab:blue")
    axes[0].set(title=f"rewards ({len(rewards)} responses)", xlabel="reward", ylabel="count")
    axes[1].hist(margins, bins=30, color="tab:green")
    axes[1].set(title=f"pair margins ({len(margins)} pairs)", xlabel="chosen - rejected reward")
    axes[2].hist(
        [
            [len(p["chosen_token_ids"]) for p in pairs],
            [len(p["rejected_token_ids"]) for p in pairs],
        ],
        bins=20,
        label=["chosen", "rejected"],
        color=["tab:green", "tab:red"],
    )
    axes[2].set(title="response lengths", xlabel="tokens")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
