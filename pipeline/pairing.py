"""The score stage's work: sampled responses (or a preference dataset) -> pairs.parquet rows.

1. Reward every sampled response (the run's scorer, or DICE's implicit reward), group them per
   prompt and pick pairs (``pipeline.scoring.build_pairs``); with DICE, the length-balanced alpha
   and experience replay from a preference dataset. Offline mode (``data.task=preference``)
   takes the dataset's pairs as they are (``text_pairs``).
2. Per-token reference log-probs of every distinct response, computed once
   (``LogprobModels``: transformers or vLLM by ``score.reference_logps``).
3. TIS-DPO token weights from a contrastive pair of models, when the objective reads them.

Every pair row is built by ``make_pair`` as a ``records.PairRecord``; per-side columns are named
through the records' column maps (``TOKEN_IDS``, ``REF_LOGPS``, ``WEIGHTS``, ...). Each side
carries a key (equal keys: the same response of the same prompt) so its log-probs are computed
once; keys live beside the record and never reach the parquet.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data
from pipeline.config import RunConfig, build_objective
from pipeline.generation import prompts_for, vllm_for
from pipeline.models import load_tokenizer
from pipeline.records import REF_LOGPS, REWARD, SIDES, TEXT, TOKEN_IDS, WEIGHTS, PairRecord
from pipeline.reference import (
    LogprobEngine,
    TransformersLogprobs,
    VLLMLogprobs,
    tokenize_response,
)
from pipeline.scoring import (
    PromptGroup,
    ScoringError,
    build_pairs,
    config_model_dir,
    describe_errors,
    implicit_rewards,
    length_balanced_alpha,
    length_gap,
    read_preference_rows,
    replay_count,
    scorer_for,
    token_weights,
    warn,
)


# -- pair rows --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    """One side of a pair: its text, token ids, reward and identity (for log-prob reuse)."""

    text: str
    token_ids: list[int]
    reward: float
    key: Hashable


@dataclass
class Pair:
    """A pair row being built, and the key of each side's response (side -> key)."""

    record: PairRecord
    keys: dict[str, Hashable]


def make_pair(
    *,
    prompt_id: str,
    prompt: Any,
    prompt_text: str,
    prompt_token_ids: list[int],
    chosen: Response,
    rejected: Response,
    source: str,
) -> Pair:
    """The one builder of pair rows: generated, offline, replayed and human pairs alike."""
    return Pair(
        PairRecord(
            prompt_id=prompt_id,
            prompt=prompt,
            prompt_text=prompt_text,
            prompt_token_ids=prompt_token_ids,
            chosen=chosen.text,
            rejected=rejected.text,
            chosen_token_ids=chosen.token_ids,
            rejected_token_ids=rejected.token_ids,
            chosen_reward=chosen.reward,
            rejected_reward=rejected.reward,
            source=source,
        ),
        {"chosen": chosen.key, "rejected": rejected.key},
    )


def pair_rows(pairs: Sequence[Pair], weights: bool) -> list[dict[str, Any]]:
    """The parquet rows; token-weight columns only when they were computed (``weights``)."""
    rows = [p.record.as_row() for p in pairs]
    if not weights:
        for row in rows:
            for side in SIDES:
                del row[WEIGHTS[side]]
    return rows


def _rating(row: dict[str, Any], side: str) -> float:
    # Dataset ratings when it has them (the built-in human pairs do), else not scored.
    return float(row.get(f"{side}_rating", row.get(f"score_{side}")) or math.nan)


def text_pairs(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    cfg: RunConfig,
    source: str,
    where: str,
    stage: str,
) -> tuple[list[Pair], dict[str, int]]:
    """Preference rows {prompt_id, prompt, prompt_text, chosen, rejected} -> pairs.

    The prompt is tokenised once (truncated or refused per generate.long_prompts), each response
    appended with EOS (``tokenize_response``) and cut to fit model.max_length. ``stage`` labels
    warnings.
    """
    prepared = prompts_for(cfg, tokenizer, rows, where)
    stats: Counter[str] = Counter(prompts_truncated=sum(prepared.truncated))
    pairs = []
    for row, prompt_ids, prompt_text in zip(rows, prepared.token_ids, prepared.texts, strict=True):
        full_ids = tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
        budget = cfg.model.max_length - len(prompt_ids)
        sides = {}
        for side in SIDES:
            ids, kept = tokenize_response(
                tokenizer, full_ids, row["prompt_text"], row[side], tokenizer.eos_token_id
            )
            stats["tokenisation_boundary_mismatch"] += int(not kept)
            if len(ids) > budget:
                ids = ids[:budget]
                stats["responses_cut_to_max_length"] += 1
            sides[side] = ids
        if sides["chosen"] == sides["rejected"]:
            stats["pairs_identical_after_cut"] += 1
            continue
        pid = str(row["prompt_id"])
        response = {
            side: Response(row[side], sides[side], _rating(row, side), (pid, side))
            for side in SIDES
        }
        pairs.append(
            make_pair(
                prompt_id=pid,
                prompt=row["prompt"],
                prompt_text=prompt_text,
                prompt_token_ids=prompt_ids,
                chosen=response["chosen"],
                rejected=response["rejected"],
                source=source,
            )
        )
    if stats["tokenisation_boundary_mismatch"]:
        warn(
            stage,
            f"{stats['tokenisation_boundary_mismatch']} response(s) in {where} merged with the "
            "prompt's last token when tokenised together; they were tokenised on their own",
        )
    return pairs, {k: v for k, v in stats.items() if v}


# -- log-probs --------------------------------------------------------------------------------------
class LogprobModels:
    """Per-token log-prob engines by model folder: transformers models are loaded once each;
    vLLM keeps one engine per process, so it is asked for again on every use."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.models: dict[Path, LogprobEngine] = {}

    def __call__(self, model_dir: Path) -> LogprobEngine:
        s = self.cfg.score
        if s.reference_logps == "vllm":
            return VLLMLogprobs(vllm_for(self.cfg, model_dir, s.reference_dtype))
        if model_dir not in self.models:
            self.models[model_dir] = TransformersLogprobs(
                model_dir,
                dtype=s.reference_dtype,
                device=s.device,
                batch_size=2 * s.batch_size,
                trust_remote_code=self.cfg.model.trust_remote_code,
                allow_pickle=self.cfg.model.allow_pickle_weights,
            )
        return self.models[model_dir]


def response_logps(
    pairs: Sequence[Pair], engine: LogprobEngine, known: dict[Any, list[float]], desc: str
) -> list[dict[str, list[float]]]:
    """Per pair, each side's per-token log-probs; each distinct response (by key) is computed
    once and kept in ``known`` (which may hold some already)."""
    todo: dict[Any, tuple[list[int], list[int]]] = {}
    for p in pairs:
        for side in SIDES:
            if p.keys[side] not in known:
                todo[p.keys[side]] = (p.record.prompt_token_ids, getattr(p.record, TOKEN_IDS[side]))
    if todo:
        keys = list(todo)
        known.update(zip(keys, engine([todo[k] for k in keys], desc=desc), strict=True))
    return [{side: known[p.keys[side]] for side in SIDES} for p in pairs]


# -- scoring samples into pairs ---------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreModels:
    """The model folders scoring reads."""

    policy: Path  # generated the samples (the reference itself in offline mode)
    reference: Path  # reference log-probs
    base: Path  # prepare's base model (DICE's default reference)


@dataclass
class Scored:
    """Pairs and everything to report about how they were made."""

    pairs: list[Pair]
    scored_rows: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    scorer: str = "none (offline pairs)"
    alpha: float = 0.0
    # (prompt_id, sample) -> reference log-probs computed on the way (DICE scores with them).
    known_ref: dict[Any, list[float]] = field(default_factory=dict)
    token_weights: bool = False  # TIS-DPO weights attached

    def pair_rows(self) -> list[dict[str, Any]]:
        return pair_rows(self.pairs, self.token_weights)


def shared_tokenizer(cfg: RunConfig, models: ScoreModels) -> Any:
    """The generating model's tokenizer, checked to be the reference's vocabulary too."""
    trust = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(models.policy, trust_remote_code=trust)
    if models.reference != models.policy:
        ref_tok = load_tokenizer(models.reference, trust_remote_code=trust)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise ScoringError(
                f"the reference model {models.reference} has a different vocabulary from the "
                f"generating model {models.policy}: token ids cannot be shared"
            )
    return tokenizer


def score_pairs(cfg: RunConfig, tokenizer: Any, models: ScoreModels, source: Path) -> Scored:
    """Pairs with reference log-probs (and TIS-DPO weights when the objective reads them) from
    ``source``: generate's samples.parquet, or in offline mode prepare's preference.parquet."""
    logprobs = LogprobModels(cfg)
    if cfg.data.pairs_from_data:
        pairs, stats = text_pairs(
            data.read_rows(source), tokenizer, cfg, "offline", str(source), stage="score"
        )
        scored = Scored(pairs=pairs, scored_rows=_offline_scored(pairs), counts=dict(stats))
    else:
        scored = pairs_from_samples(cfg, data.read_rows(source), tokenizer, models, logprobs)
    if not scored.pairs:
        raise ScoringError(
            f"no preference pairs left (drops: {scored.drops or 'none'}; counts: "
            f"{scored.counts or 'none'}); check the scorer, "
            "score.drop_ties / score.drop_truncated / score.min_margin"
        )
    if cfg.score.reference_logps != "none":
        engine = logprobs(models.reference)
        found = response_logps(scored.pairs, engine, scored.known_ref, "reference log-probs")
        for p, logps in zip(scored.pairs, found, strict=True):
            for side in SIDES:
                setattr(p.record, REF_LOGPS[side], logps[side])
    if build_objective(cfg.train).needs_token_weights:
        scored.counts["tisdpo_models"] = attach_token_weights(
            cfg, scored, tokenizer, models, logprobs
        )
    return scored


def sample_rewards(
    cfg: RunConfig,
    samples: list[dict[str, Any]],
    models: ScoreModels,
    logprobs: LogprobModels,
) -> tuple[np.ndarray, dict[int, str], str, list[list[float]] | None]:
    """Rewards of every response (flattened prompt-major), invalid rows, the scorer's name, and
    the reference log-probs of every response when they were computed on the way (DICE)."""
    if cfg.score.dice.enabled:
        d = cfg.score.dice
        pickle = cfg.model.allow_pickle_weights
        dice_policy = config_model_dir(
            d.policy_model, "score.dice.policy_model", models.policy, pickle
        )
        dice_ref = config_model_dir(
            d.reference_model, "score.dice.reference_model", models.base, pickle
        )
        seqs = [(r["prompt_token_ids"], ids) for r in samples for ids in r["response_token_ids"]]
        ref = logprobs(dice_ref)(seqs, desc="implicit-reward reference log-probs")
        pol = logprobs(dice_policy)(seqs, desc="implicit-reward policy log-probs")
        rewards = implicit_rewards(pol, ref, d.beta)
        errors = {int(i): "non-finite log-prob" for i in np.flatnonzero(~np.isfinite(rewards))}
        name = f"dice-implicit({dice_policy} vs {dice_ref})"
        return rewards, errors, name, ref if dice_ref == models.reference else None
    scorer = scorer_for(cfg)
    with scorer:
        rewards, errors = scorer([r["prompt"] for r in samples], [r["responses"] for r in samples])
    return rewards, errors, scorer.name, None


def pairs_from_samples(
    cfg: RunConfig,
    samples: list[dict[str, Any]],
    tokenizer: Any,
    models: ScoreModels,
    logprobs: LogprobModels,
) -> Scored:
    """Score generate's samples and pick pairs (with DICE: length alpha, replayed pairs)."""
    s = cfg.score
    rewards, errors, scorer_name, all_ref = sample_rewards(cfg, samples, models, logprobs)
    flat_keys = [(r["prompt_id"], k) for r in samples for k in range(len(r["responses"]))]

    def where(i: int) -> str:
        return f"prompt_id {flat_keys[i][0]} sample {flat_keys[i][1]}"

    if errors and not s.scorer.drop_invalid:
        raise ScoringError(
            f"{len(errors)} of {len(rewards)} responses got no valid reward from {scorer_name}:\n"
            f"{describe_errors(errors, where)}\n"
            "set score.scorer.drop_invalid=true to drop them and go on"
        )
    if errors:
        warn(
            "score",
            f"dropping {len(errors)} responses without a valid reward; first: "
            f"{describe_errors(errors, where, limit=1).strip()}",
        )
    groups, scored_rows = _groups(samples, rewards, errors, s.dice.length_unit)
    out = Scored(pairs=[], scored_rows=scored_rows, scorer=scorer_name)
    if all_ref is not None:
        out.known_ref.update(zip(flat_keys, all_ref, strict=True))
    pair_kwargs: dict[str, Any] = dict(
        strategy=s.pair_strategy,
        min_margin=s.min_margin,
        drop_ties=s.drop_ties,
        drop_truncated=s.drop_truncated,
        seed=s.seed,
    )
    if s.dice.enabled:
        out.alpha = (
            length_balanced_alpha(groups, **pair_kwargs)
            if s.dice.length_alpha == "auto"
            else float(s.dice.length_alpha)
        )
        out.counts["length_gap_unregularised"] = length_gap(
            groups, build_pairs(groups, **pair_kwargs)
        )
    result = build_pairs(groups, alpha=out.alpha, **pair_kwargs)
    out.drops = dict(sorted(result.drops.items()))
    out.pairs = [
        _generated_pair(samples[p.group], p.chosen, p.rejected, groups[p.group].rewards)
        for p in result.pairs
    ]
    out.counts["generated_pairs"] = len(out.pairs)
    if s.dice.enabled:
        out.counts["length_gap"] = length_gap(groups, result)
        if s.dice.replay_fraction > 0:
            out.pairs += replay_pairs(cfg, tokenizer, len(out.pairs), out.counts)
    return out


def _generated_pair(sample: dict[str, Any], c: int, r: int, rewards: np.ndarray) -> Pair:
    pid = sample["prompt_id"]

    def response(i: int) -> Response:
        return Response(
            sample["responses"][i], sample["response_token_ids"][i], float(rewards[i]), (pid, i)
        )

    return make_pair(
        prompt_id=pid,
        prompt=sample["prompt"],
        prompt_text=sample["prompt_text"],
        prompt_token_ids=sample["prompt_token_ids"],
        chosen=response(c),
        rejected=response(r),
        source="generated",
    )


def _groups(
    samples: list[dict[str, Any]], rewards: np.ndarray, errors: dict[int, str], length_unit: str
) -> tuple[list[PromptGroup], list[dict[str, Any]]]:
    """Per-prompt groups for pair selection, and scored.parquet's rows (one per response)."""
    groups, scored, i = [], [], 0
    for r in samples:
        k = len(r["responses"])
        ids = r["response_token_ids"]
        lengths = [
            len(ids[j]) if length_unit == "tokens" else len(r["responses"][j]) for j in range(k)
        ]
        truncated = [f == "length" for f in r["finish_reasons"]]
        groups.append(
            PromptGroup(
                prompt_id=r["prompt_id"],
                rewards=rewards[i : i + k].astype(float),
                lengths=np.array(lengths, dtype=float),
                truncated=np.array(truncated),
                keys=[tuple(x) for x in ids],
            )
        )
        for j in range(k):
            scored.append(
                {
                    "prompt_id": r["prompt_id"],
                    "sample_index": j,
                    "response": r["responses"][j],
                    "reward": float(rewards[i + j]),
                    "num_tokens": len(ids[j]),
                    "num_chars": len(r["responses"][j]),
                    "finish_reason": r["finish_reasons"][j],
                    "invalid_reason": errors.get(i + j, ""),
                }
            )
        i += k
    return groups, scored


def replay_pairs(
    cfg: RunConfig, tokenizer: Any, num_generated: int, counts: dict[str, Any]
) -> list[Pair]:
    """DICE's experience replay: pairs drawn from ``score.dice.replay_path`` so that they make
    up ``score.dice.replay_fraction`` of the final set."""
    d = cfg.score.dice
    if not d.replay_path:
        raise ScoringError(
            "score.dice.replay_fraction > 0 needs score.dice.replay_path (a preference dataset); "
            "the built-in task's human pairs are held out for evaluation"
        )
    limit = data.TextLimit.for_length(cfg.model.max_length, cfg.generate.long_prompts)
    rows = read_preference_rows(d.replay_path, tokenizer, cfg.data.drop_bad_rows, limit)
    counts["replay_texts_clipped"] = limit.clipped
    want = replay_count(num_generated, d.replay_fraction, len(rows))
    if want == 0:  # no generated pairs to add a share to: the caller reports the drops
        counts["replay_pairs"] = 0
        return []
    picked = np.random.default_rng(cfg.score.seed).choice(len(rows), size=want, replace=False)
    chosen_rows = [{**rows[i], "prompt_id": f"replay-{i}"} for i in sorted(picked.tolist())]
    pairs, stats = text_pairs(chosen_rows, tokenizer, cfg, "replay", d.replay_path, stage="score")
    counts.update({f"replay_{k}": v for k, v in stats.items()})
    counts["replay_pairs"] = len(pairs)
    return pairs


def attach_token_weights(
    cfg: RunConfig, scored: Scored, tokenizer: Any, models: ScoreModels, logprobs: LogprobModels
) -> dict[str, str]:
    """TIS-DPO weights from the contrastive pair (default: generating policy vs reference)."""
    s = cfg.score
    pickle = cfg.model.allow_pickle_weights
    positive = config_model_dir(
        s.tisdpo_positive_model, "score.tisdpo_positive_model", models.policy, pickle
    )
    negative = config_model_dir(
        s.tisdpo_negative_model, "score.tisdpo_negative_model", models.reference, pickle
    )
    pos, neg = (
        response_logps(
            scored.pairs,
            logprobs(model),
            scored.known_ref if model == models.reference else {},
            f"TIS-DPO {role} log-probs",
        )
        for model, role in ((positive, "positive"), (negative, "negative"))
    )
    eos = tokenizer.eos_token_id
    for p, pos_logps, neg_logps in zip(scored.pairs, pos, neg, strict=True):
        for side in SIDES:
            ids = getattr(p.record, TOKEN_IDS[side])
            weights = token_weights(
                pos_logps[side],
                neg_logps[side],
                side,
                s.tisdpo_transform,
                s.tisdpo_transform_params,
                ends_with_eos=bool(ids) and ids[-1] == eos,
            )
            setattr(p.record, WEIGHTS[side], weights)
    scored.token_weights = True
    return {"positive": str(positive), "negative": str(negative)}


def _offline_scored(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """scored.parquet's rows for dataset pairs: each side as a response, its rating as reward."""
    rows = []
    for p in pairs:
        for index, side in enumerate(SIDES):
            text, ids = getattr(p.record, TEXT[side]), getattr(p.record, TOKEN_IDS[side])
            rows.append(
                {
                    "prompt_id": p.record.prompt_id,
                    "sample_index": index,
                    "response": text,
                    "reward": getattr(p.record, REWARD[side]),
                    "num_tokens": len(ids),
                    "num_chars": len(text),
                    "finish_reason": "stop",
                    "invalid_reason": "",
                }
            )
    return rows


def summary(
    scored: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    drops: dict[str, int],
    alpha: float,
) -> dict[str, float]:
    """The score manifest's and MLflow's numbers, from scored.parquet and pairs.parquet rows."""
    rewards = np.array([r["reward"] for r in scored if not r["invalid_reason"]], dtype=float)
    margins = np.array([p[REWARD["chosen"]] - p[REWARD["rejected"]] for p in pairs], dtype=float)
    margins = margins[np.isfinite(margins)]
    out: dict[str, float] = {
        "pairs": float(len(pairs)),
        "chosen_tokens_mean": float(np.mean([len(p[TOKEN_IDS["chosen"]]) for p in pairs])),
        "rejected_tokens_mean": float(np.mean([len(p[TOKEN_IDS["rejected"]]) for p in pairs])),
        "dice_alpha": alpha,
    }
    if len(rewards):
        out.update(
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            reward_min=float(rewards.min()),
            reward_max=float(rewards.max()),
        )
    if len(margins):
        out.update(margin_mean=float(margins.mean()), margin_min=float(margins.min()))
    out.update({f"dropped_{k}": float(v) for k, v in drops.items()})
    return out
