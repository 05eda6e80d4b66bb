"""score: reward every sampled response, build preference pairs, precompute reference log-probs.

Inputs: generate's samples.parquet (or, for data.task=preference, prepare's preference.parquet
taken straight to pairs: offline mode), the reference model (score.reference_model, default
prepare's base model). Outputs in runs/<run>/score/: scored.parquet (every response with its
reward and why it was left out, if it was), pairs.parquet (chosen/rejected token ids, rewards,
per-token reference log-probs, TIS-DPO token weights when the objective needs them, source),
summary.png; the manifest records counts, drop reasons, the scorer, policy and reference folders.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig, objective_kwargs
from pipeline.generation import model_fingerprint, vllm_engine
from pipeline.models import ModelError, check_model_folder, load_tokenizer
from pipeline.reference import LogprobEngine, TransformersLogprobs, VLLMLogprobs
from pipeline.runstore import RunStore
from pipeline.scoring import (
    JudgeScorer,
    PromptGroup,
    RewardModelScorer,
    ScoringError,
    build_pairs,
    call_reward_function,
    describe_errors,
    implicit_rewards,
    length_balanced_alpha,
    length_gap,
    load_reward_function,
    read_preference_rows,
    replay_count,
    text_pairs,
    token_weights,
    warn,
    write_summary_plot,
)


def _model_dir(value: str, key: str) -> Path:
    path = Path(value).expanduser().resolve()
    try:
        return check_model_folder(path)
    except ModelError as e:
        raise ModelError(f"{key}: {e}") from None


def needs_token_weights(cfg: RunConfig) -> bool:
    """True when the training objective reads per-token weights (TIS-DPO)."""
    from pipeline.objectives import make_objective

    try:
        return (
            "chosen_weights"
            in make_objective(cfg.train.objective, **objective_kwargs(cfg.train)).requires
        )
    except (TypeError, ValueError):
        return cfg.train.objective == "tisdpo"


def _vllm(cfg: RunConfig, model_dir: Path, dtype: str) -> Any:
    """The process's vLLM engine for a folder, with generate's parallelism and memory settings
    (reused when generate just ran in this process with the same folder and dtype)."""
    g = cfg.generate
    return vllm_engine(
        model_dir,
        dtype=dtype,
        seed=g.seed,
        device=g.device,
        tensor_parallel_size=g.tensor_parallel_size,
        data_parallel_size=g.data_parallel_size,
        max_model_len=g.max_model_len,
        gpu_memory_utilization=g.gpu_memory_utilization,
        kv_cache_gib=g.kv_cache_gib,
        trust_remote_code=cfg.model.trust_remote_code,
    )


class LogprobModels:
    """Per-token log-prob engines by model folder: transformers models are loaded once each;
    vLLM keeps one engine per process, so it is asked for again on every use."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.models: dict[Path, LogprobEngine] = {}

    def __call__(self, model_dir: Path) -> LogprobEngine:
        s = self.cfg.score
        if s.reference_logps == "vllm":
            return VLLMLogprobs(_vllm(self.cfg, model_dir, s.reference_dtype))
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


def score_samples(
    cfg: RunConfig,
    samples: list[dict[str, Any]],
    policy_dir: Path,
    reference_dir: Path,
    base_dir: Path,
    logprobs: LogprobModels,
) -> tuple[np.ndarray, dict[int, str], str, list[list[float]] | None]:
    """Rewards of every response (flattened prompt-major), invalid rows, the scorer's name, and
    the reference log-probs of every response when they were computed on the way (DICE)."""
    sc = cfg.score.scorer
    flat = [(r, k) for r in samples for k in range(len(r["responses"]))]
    prompts = [r["prompt"] for r, _ in flat]
    responses = [r["responses"][k] for r, k in flat]
    if cfg.score.dice.enabled:
        d = cfg.score.dice
        dice_policy = (
            _model_dir(d.policy_model, "score.dice.policy_model") if d.policy_model else policy_dir
        )
        dice_ref = (
            _model_dir(d.reference_model, "score.dice.reference_model")
            if d.reference_model
            else base_dir
        )
        seqs = [(r["prompt_token_ids"], r["response_token_ids"][k]) for r, k in flat]
        ref = logprobs(dice_ref)(seqs, desc="implicit-reward reference log-probs")
        pol = logprobs(dice_policy)(seqs, desc="implicit-reward policy log-probs")
        rewards = implicit_rewards(pol, ref, d.beta)
        errors = {int(i): "non-finite log-prob" for i in np.flatnonzero(~np.isfinite(rewards))}
        name = f"dice-implicit({dice_policy} vs {dice_ref})"
        return rewards, errors, name, ref if dice_ref == reference_dir else None
    if sc.kind == "function":
        fn = load_reward_function(sc.function)
        rewards, errors = call_reward_function(fn, prompts, responses, sc.batch_size)
        return rewards, errors, sc.function, None
    assert sc.model is not None  # validated by ScorerConfig
    model_dir = _model_dir(sc.model, "score.scorer.model")
    if sc.kind == "reward_model":
        rm = RewardModelScorer(
            model_dir,
            dtype=sc.dtype,
            device=cfg.score.device,
            max_length=sc.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        rewards, errors = call_reward_function(rm, prompts, responses, sc.batch_size)
        return rewards, errors, f"reward_model({model_dir})", None
    llm = _vllm(cfg, model_dir, sc.dtype)
    judge = JudgeScorer(llm, load_tokenizer(model_dir), sc.judge_template, sc.max_length)
    scores = judge.score_groups([r["prompt"] for r in samples], [r["responses"] for r in samples])
    rewards = np.array([v for group in scores for v in group], dtype=float)
    return rewards, {}, f"judge({model_dir})", None


@dataclass
class Scored:
    """What scoring produced before reference log-probs: pairs and everything to report."""

    pairs: list[dict[str, Any]]
    scored_rows: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    scorer: str = "none (offline pairs)"
    alpha: float = 0.0
    # (prompt_id, sample) -> reference log-probs computed on the way (DICE scores with them).
    known_ref: dict[Any, list[float]] = field(default_factory=dict)


def pairs_from_samples(
    cfg: RunConfig,
    store: RunStore,
    tokenizer: Any,
    policy_dir: Path,
    reference_dir: Path,
    logprobs: LogprobModels,
) -> Scored:
    s = cfg.score
    samples = data.read_rows(store.stage_dir("generate") / "samples.parquet")
    base_dir = Path(store.require("prepare")["model_dir"])
    rewards, errors, scorer_name, all_ref = score_samples(
        cfg, samples, policy_dir, reference_dir, base_dir, logprobs
    )
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
            f"dropping {len(errors)} responses without a valid reward; first: "
            f"{describe_errors(errors, where, limit=1).strip()}"
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
        _pair_row(samples[p.group], p.chosen, p.rejected, groups[p.group].rewards)
        for p in result.pairs
    ]
    out.counts["generated_pairs"] = len(out.pairs)
    if s.dice.enabled:
        out.counts["length_gap"] = length_gap(groups, result)
        if s.dice.replay_fraction > 0:
            out.pairs += _replay_pairs(cfg, store, tokenizer, len(out.pairs), out.counts)
    return out


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    s = cfg.score
    offline = cfg.data.task == "preference"
    prep = store.require("prepare")
    gen = None if offline else store.require("generate")
    reference_dir = _model_dir(s.reference_model or prep["model_dir"], "score.reference_model")
    policy_dir = Path(gen["model_dir"]) if gen else reference_dir
    fingerprints = {"reference": model_fingerprint(reference_dir)}
    current = store.complete_manifest("score")
    if current is not None and current.get("model_fingerprints") != fingerprints:
        force = True  # same reference path, new weights

    inputs = ["prepare"] if offline else ["prepare", "generate"]
    with store.stage("score", inputs=inputs, force=force) as st:
        if st.skipped:
            return
        tokenizer = load_tokenizer(policy_dir, trust_remote_code=cfg.model.trust_remote_code)
        if reference_dir != policy_dir:
            ref_tok = load_tokenizer(reference_dir, trust_remote_code=cfg.model.trust_remote_code)
            if ref_tok.get_vocab() != tokenizer.get_vocab():
                raise ScoringError(
                    f"the reference model {reference_dir} has a different vocabulary from the "
                    f"generating model {policy_dir}: token ids cannot be shared"
                )
        logprobs = LogprobModels(cfg)
        if offline:
            source = store.stage_dir("prepare") / "preference.parquet"
            pairs, stats = text_pairs(
                data.read_rows(source), tokenizer, cfg, "offline", str(source)
            )
            result = Scored(pairs=pairs, counts=dict(stats))
        else:
            result = pairs_from_samples(cfg, store, tokenizer, policy_dir, reference_dir, logprobs)
        pairs = result.pairs
        if not pairs:
            raise ScoringError(
                f"no preference pairs left (drops: {result.drops or 'none'}); check the scorer, "
                "score.drop_ties / score.drop_truncated / score.min_margin"
            )

        # Reference log-probs: every distinct response once.
        if s.reference_logps != "none":
            _attach_logps(pairs, logprobs(reference_dir), "ref_{}_logps", result.known_ref)
        else:
            for p in pairs:
                p["ref_chosen_logps"], p["ref_rejected_logps"] = [], []
        if needs_token_weights(cfg):
            result.counts["tisdpo_models"] = _attach_token_weights(
                cfg, pairs, tokenizer, policy_dir, reference_dir, logprobs, result.known_ref
            )

        for p in pairs:
            del p["_keys"]
        scored_rows = result.scored_rows or _offline_scored(pairs)
        data.write_rows(st.dir / "pairs.parquet", pairs)
        data.write_rows(st.dir / "scored.parquet", scored_rows)
        summary = _summary(scored_rows, pairs, result.drops, result.alpha)
        write_summary_plot(st.dir / "summary.png", scored_rows, pairs)
        st.record(
            counts={**result.counts, "pairs": len(pairs)},
            drops=result.drops,
            summary=summary,
            scorer=result.scorer,
            reference_model_dir=str(reference_dir),
            policy_model_dir=str(policy_dir),
            model_fingerprints=fingerprints,
            reference_logps=s.reference_logps,
            dice_alpha=result.alpha if s.dice.enabled else None,
        )
        if store.is_writer:
            with tracking.stage_run(
                cfg,
                "score",
                params={
                    "scorer": result.scorer,
                    "pair_strategy": s.pair_strategy,
                    "reference_model_dir": str(reference_dir),
                    "policy_model_dir": str(policy_dir),
                },
            ):
                import mlflow

                mlflow.log_metrics({k: float(v) for k, v in summary.items() if math.isfinite(v)})
                mlflow.log_artifact(str(st.dir / "summary.png"))
        print(
            f"[score] {len(pairs)} pairs ({result.scorer}); drops {result.drops or 'none'} "
            f"-> {st.final_dir}",
            file=sys.stderr,
        )


def _attach_token_weights(
    cfg: RunConfig,
    pairs: list[dict[str, Any]],
    tokenizer: Any,
    policy_dir: Path,
    reference_dir: Path,
    logprobs: LogprobModels,
    known_ref: dict[Any, list[float]],
) -> dict[str, str]:
    """TIS-DPO weights from the contrastive pair (default: generating policy vs reference)."""
    s = cfg.score
    positive = (
        _model_dir(s.tisdpo_positive_model, "score.tisdpo_positive_model")
        if s.tisdpo_positive_model
        else policy_dir
    )
    negative = (
        _model_dir(s.tisdpo_negative_model, "score.tisdpo_negative_model")
        if s.tisdpo_negative_model
        else reference_dir
    )
    for model, key in ((positive, "_pos_{}_logps"), (negative, "_neg_{}_logps")):
        _attach_logps(pairs, logprobs(model), key, known_ref if model == reference_dir else {})
    eos = tokenizer.eos_token_id
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_token_ids"]
            p[f"{side}_weights"] = token_weights(
                p.pop(f"_pos_{side}_logps"),
                p.pop(f"_neg_{side}_logps"),
                side,
                s.tisdpo_transform,
                s.tisdpo_transform_params,
                ends_with_eos=bool(ids) and ids[-1] == eos,
            )
    return {"positive": str(positive), "negative": str(negative)}


# -- helpers ------------------------------------------------------------------------------------
def _groups(
    samples: list[dict[str, Any]], rewards: np.ndarray, errors: dict[int, str], length_unit: str
) -> tuple[list[PromptGroup], list[dict[str, Any]]]:
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


def _pair_row(sample: dict[str, Any], c: int, r: int, rewards: np.ndarray) -> dict[str, Any]:
    return {
        "prompt_id": sample["prompt_id"],
        "prompt": sample["prompt"],
        "prompt_text": sample["prompt_text"],
        "prompt_token_ids": sample["prompt_token_ids"],
        "chosen": sample["responses"][c],
        "rejected": sample["responses"][r],
        "chosen_token_ids": sample["response_token_ids"][c],
        "rejected_token_ids": sample["response_token_ids"][r],
        "chosen_reward": float(rewards[c]),
        "rejected_reward": float(rewards[r]),
        "source": "generated",
        "_keys": ((sample["prompt_id"], c), (sample["prompt_id"], r)),
    }


def _replay_pairs(
    cfg: RunConfig, store: RunStore, tokenizer: Any, num_generated: int, counts: dict[str, Any]
) -> list[dict[str, Any]]:
    d = cfg.score.dice
    if d.replay_path:
        rows = read_preference_rows(d.replay_path, tokenizer, cfg.data.drop_bad_rows)
        source = d.replay_path
    elif cfg.data.task == "preference":
        source = str(store.stage_dir("prepare") / "preference.parquet")
        rows = data.read_rows(Path(source))
    else:
        raise ScoringError(
            "score.dice.replay_fraction > 0 needs score.dice.replay_path (a preference dataset); "
            "the built-in task's human pairs are held out for evaluation"
        )
    want = replay_count(num_generated, d.replay_fraction, len(rows))
    picked = np.random.default_rng(cfg.score.seed).choice(len(rows), size=want, replace=False)
    chosen_rows = [{**rows[i], "prompt_id": f"replay-{i}"} for i in sorted(picked.tolist())]
    pairs, stats = text_pairs(chosen_rows, tokenizer, cfg, "replay", source)
    counts.update({f"replay_{k}": v for k, v in stats.items()})
    counts["replay_pairs"] = len(pairs)
    return pairs


def _attach_logps(
    pairs: list[dict[str, Any]], engine: LogprobEngine, key: str, known: dict[Any, list[float]]
) -> None:
    """Fill p[key.format(side)] with per-token log-probs, each distinct response computed once."""
    todo: dict[Any, tuple[list[int], list[int]]] = {}
    for p in pairs:
        for k, side in zip(p["_keys"], ("chosen", "rejected"), strict=True):
            if k not in known:
                todo[k] = (p["prompt_token_ids"], p[f"{side}_token_ids"])
    if todo:
        keys = list(todo)
        known.update(
            zip(keys, engine([todo[k] for k in keys], desc=key.format("responses")), strict=True)
        )
    for p in pairs:
        for k, side in zip(p["_keys"], ("chosen", "rejected"), strict=True):
            p[key.format(side)] = known[k]


def _offline_scored(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            rows.append(
                {
                    "prompt_id": p["prompt_id"],
                    "sample_index": 0 if side == "chosen" else 1,
                    "response": p[side],
                    "reward": p[f"{side}_reward"],
                    "num_tokens": len(p[f"{side}_token_ids"]),
                    "num_chars": len(p[side]),
                    "finish_reason": "stop",
                    "invalid_reason": "",
                }
            )
    return rows


def _summary(
    scored: list[dict[str, Any]], pairs: list[dict[str, Any]], drops: dict[str, int], alpha: float
) -> dict[str, float]:
    rewards = np.array([r["reward"] for r in scored if not r["invalid_reason"]], dtype=float)
    margins = np.array([p["chosen_reward"] - p["rejected_reward"] for p in pairs], dtype=float)
    margins = margins[np.isfinite(margins)]
    out: dict[str, float] = {
        "pairs": float(len(pairs)),
        "chosen_tokens_mean": float(np.mean([len(p["chosen_token_ids"]) for p in pairs])),
        "rejected_tokens_mean": float(np.mean([len(p["rejected_token_ids"]) for p in pairs])),
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


def main(argv: list[str] | None = None) -> None:
    stage_main("score", run, argv)


if __name__ == "__main__":
    main()
