"""The evaluate stage's work: sample, score and measure the policy against a baseline, then the
report (``pipeline.evaluation`` holds the metrics, pure functions of what is gathered here).

1. Held-out prompts sampled from both models with the generate backend and the same per-prompt
   seeds (``generation.sample_resumable``: policy chunks in the stage's scratch, baseline
   chunks in a shared cache, since they depend only on the baseline model and the settings).
2. The run's scorer (``scoring.scorer_for``) rewards policy and baseline responses of a prompt
   together, so a pairwise judge compares them with each other.
3. Sequence log-probs under the policy and the reference (transformers): KL(pi || ref), the DID
   entropy, implicit-reward agreement with the human pairs, likelihood displacement on the
   training pairs. The reference's log-probs of the fixed pair sets are cached.
4. ``evaluation.build_report`` plus the run's details; samples, plots, summary.txt, report.json.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import data, plots
from pipeline.config import RunConfig, build_objective, config_hash
from pipeline.evaluation import ModelSamples, PairLogps, build_report
from pipeline.generation import (
    prompts_for,
    release_vllm_engine,
    sample_resumable,
    settings_for,
)
from pipeline.models import load_tokenizer
from pipeline.pairing import text_pairs
from pipeline.reference import TransformersLogprobs
from pipeline.runstore import RunStore, StageError, atomic_write_json, json_safe
from pipeline.scoring import ScoringError, describe_errors, scorer_for

Sequences = list[tuple[list[int], list[int]]]


@dataclass
class Evaluation:
    """The report and what it was computed from (samples with rewards, sequence log-probs)."""

    report: dict[str, Any]
    policy_rows: list[dict[str, Any]]
    baseline_rows: list[dict[str, Any]]
    policy_logps: list[float]  # per policy sample, under the policy
    policy_ref_logps: list[float]  # per policy sample, under the reference
    baseline_logps: list[float] | None  # per baseline sample (None: the baseline is the ref)
    baseline_ref_logps: list[float] | None


def evaluate_policy(
    cfg: RunConfig,
    store: RunStore,
    policy_dir: Path,
    reference_dir: Path,
    baseline: dict[str, Any],
    policy_hash: str,
) -> Evaluation:
    """Sample, score and measure the policy (``policy_dir``) against ``baseline``
    (``registry.resolve_baseline``) on prepare's held-out prompts, human pairs and score's
    training pairs; ``policy_hash`` identifies the policy in the report."""
    ev, g = cfg.evaluate, cfg.generate
    tokenizer = shared_tokenizer(cfg, reference_dir, {str(policy_dir), baseline["model_dir"]})
    source = store.stage_dir("prepare") / "prompts" / f"{ev.split}.parquet"
    rows = data.read_rows(source)[: ev.num_prompts]
    if not rows:
        raise StageError(f"{source} has no prompts to evaluate on")
    prompts = prompts_for(cfg, tokenizer, rows, str(source))
    settings = settings_for(cfg, ev.n)

    def sample(model_dir: Path, role: str, scratch: Path) -> list[dict[str, Any]]:
        # Finished chunks survive a kill and are reused for exactly these settings, model
        # (path and contents) and prompts.
        key = [
            store.expected_hash("evaluate"),
            str(model_dir),
            store.fingerprint(model_dir),
            [r["prompt_id"] for r in rows],
        ]
        desc = f"sample {role} ({g.backend})"
        args = (cfg, model_dir, tokenizer, rows, prompts, settings)
        return sample_resumable(*args, scratch=scratch, key=key, desc=desc)[0]

    # Policy samples: scratch (kept across a kill, removed on success). Baseline samples
    # depend only on the baseline model and these settings: a shared cache, so runs that
    # differ only in training (the frontier's points) sample the reference once.
    policy_rows = sample(policy_dir, "policy", store.scratch_dir("evaluate"))
    baseline_rows = sample(
        Path(baseline["model_dir"]), "baseline", Path(cfg.cache_dir) / "evaluate-samples"
    )
    release_vllm_engine()
    scorer = score_responses(cfg, policy_rows, baseline_rows)

    # -- sequence log-probs under the policy, the reference (and the champion) ----------------
    human = human_pairs(cfg, store.stage_dir("prepare"), tokenizer)
    train_pairs = data.read_rows(store.stage_dir("score") / "pairs.parquet")[: ev.num_train_pairs]
    policy_seqs = _sample_sequences(policy_rows)
    pair_seqs = _pair_sequences(human) + _pair_sequences(train_pairs)
    base_seqs = _sample_sequences(baseline_rows) if baseline["kind"] != "reference" else []
    on_policy = sequence_logps(cfg, policy_dir, policy_seqs + pair_seqs, "policy log-probs")
    on_ref = sequence_logps(cfg, reference_dir, policy_seqs + base_seqs, "reference log-probs")
    on_ref += sequence_logps(
        cfg, reference_dir, pair_seqs, "reference log-probs (pairs)", cache=True
    )
    base_logps = base_ref = None
    if base_seqs:
        base_logps = sequence_logps(
            cfg, Path(baseline["model_dir"]), base_seqs, "baseline log-probs"
        )
        base_ref = on_ref[len(policy_seqs) : len(policy_seqs) + len(base_seqs)]
        del on_ref[len(policy_seqs) : len(policy_seqs) + len(base_seqs)]

    n_pol, n_human = len(policy_seqs), 2 * len(human)
    beta = build_objective(cfg.train).beta  # its implicit reward is beta * log(pi/ref)
    report = build_report(
        _model_samples(policy_rows, on_policy[:n_pol], on_ref[:n_pol]),
        _model_samples(baseline_rows, base_logps, base_ref),
        baseline_is_reference=baseline["kind"] == "reference",
        human_pairs=_pair_logps(
            human, on_policy[n_pol : n_pol + n_human], on_ref[n_pol : n_pol + n_human]
        ),
        train_pairs=_pair_logps(
            train_pairs, on_policy[n_pol + n_human :], on_ref[n_pol + n_human :]
        ),
        beta=beta,
        bootstrap_samples=ev.bootstrap_samples,
        confidence=ev.confidence,
        seed=cfg.seed,
    )
    report["policy"].update(
        model_dir=str(policy_dir), objective=cfg.train.objective, model_hash=policy_hash
    )
    report["baseline"].update(baseline)
    report.update(
        run=cfg.name,
        split=ev.split,
        prompts=len(rows),
        samples_per_prompt=ev.n,
        sampling=settings.as_dict(),
        backend=g.backend,
        scorer=scorer,
        reference_dir=str(reference_dir),
        implicit_reward_beta=beta,
        # KL from samples estimates KL(pi || ref) only when the samples come from pi itself.
        kl_from_policy_samples=g.temperature == 1.0 and g.top_p == 1.0,
    )
    report["summary"] = _headline(report)
    return Evaluation(
        report, policy_rows, baseline_rows, on_policy[:n_pol], on_ref[:n_pol], base_logps, base_ref
    )


def write_outputs(folder: Path, result: Evaluation, metrics_file: Path) -> list[Path]:
    """Samples (policy_samples / baseline_samples.parquet), plots/, summary.txt and report.json
    into ``folder``; returns the plot files. ``metrics_file``: train's metrics.jsonl."""
    _write_samples(
        folder / "policy_samples.parquet",
        result.policy_rows,
        result.policy_logps,
        result.policy_ref_logps,
    )
    _write_samples(
        folder / "baseline_samples.parquet",
        result.baseline_rows,
        result.baseline_logps,
        result.baseline_ref_logps,
    )
    plot_files = _plots(
        folder / "plots", result.report, result.policy_rows, result.baseline_rows, metrics_file
    )
    (folder / "summary.txt").write_text(summary_text(result.report) + "\n")
    (folder / "report.json").write_text(
        json.dumps(json_safe(result.report), indent=2, sort_keys=True, default=str) + "\n"
    )
    return plot_files


def samples_table(result: Evaluation) -> dict[str, list[Any]]:
    """Every evaluated response, one row each (MLflow's samples table): which model, the
    prompt, the response, why it ended and its reward."""
    table: dict[str, list[Any]] = {
        k: [] for k in ("model", "prompt_id", "prompt", "response", "finish_reason", "reward")
    }
    for model, rows in (("policy", result.policy_rows), ("baseline", result.baseline_rows)):
        for r in rows:
            for response, finish, reward in zip(
                r["responses"], r["finish_reasons"], r["rewards"], strict=True
            ):
                for key, value in zip(
                    table,
                    (model, r["prompt_id"], r["prompt"], response, finish, reward),
                    strict=True,
                ):
                    table[key].append(value)
    return table


# -- steps ------------------------------------------------------------------------------------------
def shared_tokenizer(cfg: RunConfig, reference_dir: Path, others: set[str]) -> Any:
    """The reference's tokenizer, checked to be every other model's vocabulary too."""
    tokenizer = load_tokenizer(reference_dir, trust_remote_code=cfg.model.trust_remote_code)
    for other in sorted(others - {str(reference_dir)}):
        if load_tokenizer(other).get_vocab() != tokenizer.get_vocab():
            raise StageError(
                f"{other} has a different vocabulary from the reference "
                f"{reference_dir}: their token ids cannot be compared"
            )
    return tokenizer


def score_responses(
    cfg: RunConfig, policy_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]
) -> str:
    """Reward every response with the run's scorer (``score.scorer``) into each row's
    ``rewards``; policy and baseline responses of a prompt are scored together, so a pairwise
    judge compares them with each other. DICE's implicit reward is a training signal, not a
    metric: it is not used here. Returns the scorer's name."""
    joint = [
        {**p, "responses": p["responses"] + b["responses"]}
        for p, b in zip(policy_rows, baseline_rows, strict=True)
    ]
    with scorer_for(cfg) as scorer:
        rewards, errors = scorer(
            [r["prompt"] for r in joint], [r["responses"] for r in joint], desc="reward"
        )
    if errors:
        keys = [(r["prompt_id"], k) for r in joint for k in range(len(r["responses"]))]
        raise ScoringError(
            f"{len(errors)} evaluation responses got no valid reward from {scorer.name}:\n"
            + describe_errors(errors, lambda i: f"prompt_id {keys[i][0]} response {keys[i][1]}")
        )
    i = 0
    for p, b in zip(policy_rows, baseline_rows, strict=True):
        k_p, k_b = len(p["responses"]), len(b["responses"])
        p["rewards"] = [float(x) for x in rewards[i : i + k_p]]
        b["rewards"] = [float(x) for x in rewards[i + k_p : i + k_p + k_b]]
        i += k_p + k_b
    return scorer.name


def human_pairs(cfg: RunConfig, prepare_dir: Path, tokenizer: Any) -> list[dict[str, Any]]:
    """prepare's held-out human pairs (up to evaluate.num_human_pairs) as pair rows."""
    source = prepare_dir / "human_pairs.parquet"
    if not source.is_file():
        return []
    rows = data.read_rows(source)[: cfg.evaluate.num_human_pairs]
    for i, r in enumerate(rows):
        r.setdefault("prompt_id", f"human-{i}")
    pairs, _ = text_pairs(rows, tokenizer, cfg, "human", str(source), stage="evaluate")
    return [p.record.as_row() for p in pairs]


def sequence_logps(
    cfg: RunConfig, model_dir: Path, seqs: Sequences, desc: str, cache: bool = False
) -> list[float]:
    """Sequence log-prob (sum over response tokens) of each sequence under one model.

    ``cache``: keep the result in ``cache_dir/evaluate-logps`` by model (path and contents),
    dtype and sequences; for the reference on the fixed pair sets, which every evaluation
    against that reference (each frontier point) would otherwise recompute.
    """
    if not seqs:
        return []
    ev = cfg.evaluate
    path = None
    if cache:
        key = config_hash([str(model_dir), RunStore(cfg).fingerprint(model_dir), ev.dtype, seqs])
        path = Path(cfg.cache_dir) / "evaluate-logps" / f"{key}.json"
        if path.is_file():
            return [float(x) for x in json.loads(path.read_text())]
    engine = TransformersLogprobs(
        model_dir,
        dtype=ev.dtype,
        device=ev.device,
        batch_size=ev.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle_weights,
        token_chunk_size=cfg.train.token_chunk_size,
    )
    out = [math.fsum(t) for t in engine(seqs, desc=desc)]
    del engine
    gc.collect()
    if path is not None:
        atomic_write_json(path, out)
    return out


def _sample_sequences(rows: list[dict[str, Any]]) -> Sequences:
    return [
        (list(r["prompt_token_ids"]), list(ids)) for r in rows for ids in r["response_token_ids"]
    ]


def _pair_sequences(pairs: list[dict[str, Any]]) -> Sequences:
    return [(list(p["prompt_token_ids"]), list(p["chosen_token_ids"])) for p in pairs] + [
        (list(p["prompt_token_ids"]), list(p["rejected_token_ids"])) for p in pairs
    ]


def _regroup(rows: list[dict[str, Any]], flat: list[float] | None) -> list[list[float]] | None:
    if flat is None:
        return None
    out, i = [], 0
    for r in rows:
        k = len(r["response_token_ids"])
        out.append(flat[i : i + k])
        i += k
    return out


def _model_samples(
    rows: list[dict[str, Any]], logps: list[float] | None, ref_logps: list[float] | None
) -> ModelSamples:
    return ModelSamples(
        rewards=[r["rewards"] for r in rows],
        lengths=[[len(ids) for ids in r["response_token_ids"]] for r in rows],
        texts=[list(r["responses"]) for r in rows],
        logps=_regroup(rows, logps),
        ref_logps=_regroup(rows, ref_logps),
    )


def _pair_logps(
    pairs: list[dict[str, Any]], policy: list[float], ref: list[float]
) -> PairLogps | None:
    n = len(pairs)
    if n == 0:
        return None
    return PairLogps(
        policy_chosen=policy[:n],
        policy_rejected=policy[n : 2 * n],
        ref_chosen=ref[:n],
        ref_rejected=ref[n : 2 * n],
        chosen_lengths=[len(p["chosen_token_ids"]) for p in pairs],
        rejected_lengths=[len(p["rejected_token_ids"]) for p in pairs],
    )


# -- outputs ----------------------------------------------------------------------------------------
def _write_samples(
    path: Path, rows: list[dict[str, Any]], logps: list[float] | None, ref_logps: list[float] | None
) -> None:
    pol, ref = _regroup(rows, logps), _regroup(rows, ref_logps)
    out = []
    for i, r in enumerate(rows):
        out.append(
            {
                "prompt_id": r["prompt_id"],
                "prompt": r["prompt"],
                "responses": r["responses"],
                "response_token_ids": r["response_token_ids"],
                "finish_reasons": r["finish_reasons"],
                "rewards": r["rewards"],
                "logps": pol[i] if pol is not None else [],
                "ref_logps": ref[i] if ref is not None else [],
            }
        )
    data.write_rows(path, out)


def _baseline_label(baseline: dict[str, Any]) -> str:
    return str(baseline["kind"]) + (f" v{baseline['version']}" if baseline.get("version") else "")


def _plots(
    folder: Path,
    report: dict[str, Any],
    policy_rows: list[dict[str, Any]],
    baseline_rows: list[dict[str, Any]],
    metrics_file: Path,
) -> list[Path]:
    pol, base = report["policy"], report["baseline"]
    base_label = _baseline_label(base)
    points = [
        {
            "label": base_label,
            "group": base_label,
            "kl": base.get("kl", {}).get("k1", 0.0),
            "reward": base["reward"]["mean"],
            "low": base["reward"]["low"],
            "high": base["reward"]["high"],
        },
        {
            "label": f"policy ({pol['objective']})",
            "group": "policy",
            "kl": pol["kl"]["k1"],
            "reward": pol["reward"]["mean"],
            "low": pol["reward"]["low"],
            "high": pol["reward"]["high"],
        },
    ]
    files = [
        plots.reward_vs_kl(points, folder / "reward_vs_kl.png"),
        plots.reward_histograms(
            [x for r in policy_rows for x in r["rewards"]],
            [x for r in baseline_rows for x in r["rewards"]],
            folder / "reward_histograms.png",
            baseline_label=base_label,
        ),
    ]
    records = []
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    curves = plots.training_curves(records, folder / "training_curves.png")
    return files + ([curves] if curves is not None else [])


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    m = report["metrics"]
    keys = (
        "reward_mean",
        "baseline_reward_mean",
        "reward_gain",
        "win_rate",
        "kl",
        "human_accuracy",
        "human_chosen_shift",
        "train_chosen_shift",
    )
    return {"baseline": report["baseline"]["kind"], **{k: m[k] for k in keys if k in m}}


def summary_text(report: dict[str, Any]) -> str:
    """The short terminal summary."""
    m, pol, base = report["metrics"], report["policy"], report["baseline"]
    ci = lambda r: f"{r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"  # noqa: E731
    base_label = _baseline_label(base)
    conf = report.get("sampling", {})
    lines = [
        f"[evaluate] {report['run']}: {report['prompts']} held-out prompts ({report['split']}) x "
        f"{report['samples_per_prompt']} samples, baseline = {base_label}, scorer {report['scorer']}",
        f"  reward       policy {ci(pol['reward'])}   baseline {ci(base['reward'])}   "
        f"gain {m['reward_gain']:+.3f}",
        f"  win rate     {ci(report['win_rate'])} against the baseline",
        f"  KL(pi||ref)  {m['kl']:.3f} nats/sequence ({m['kl_per_token']:.4f}/token; "
        f"k3 {m['kl_k3']:.3f})"
        + (
            ""
            if report.get("kl_from_policy_samples")
            else f"  [samples at temperature {conf.get('temperature')}, top_p "
            f"{conf.get('top_p')}: not pi's own]"
        ),
        f"  length       {m['length_mean']:.1f} tokens (baseline {m['baseline_length_mean']:.1f});"
        f" distinct-2 {m['distinct_2']:.3f} (baseline {m['baseline_distinct_2']:.3f})",
        f"  DID entropy  {m['did_entropy']:.3f} (normalised {m['did_entropy_normalized']:.3f})",
    ]
    if "human_accuracy" in m:
        h = report["human_pairs"]
        lines.append(
            f"  human pairs  implicit-reward accuracy {m['human_accuracy']:.3f} on {h['count']} "
            f"pairs (margin {m['human_margin']:+.4f}); chosen log-prob shift "
            f"{m['human_chosen_shift']:+.3f} nats (reference likelihood agrees "
            f"{m['human_reference_logp_accuracy']:.3f})"
        )
    if "train_accuracy" in m:
        lines.append(
            f"  train pairs  accuracy {m['train_accuracy']:.3f}; chosen log-prob shift "
            f"{m['train_chosen_shift']:+.3f} nats ({m['train_chosen_decreased']:.0%} fell: "
            "likelihood displacement)"
        )
    return "\n".join(lines)
