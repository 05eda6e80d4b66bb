"""evaluate: the trained policy against a baseline on held-out prompts, and against human pairs.

Inputs: prepare's held-out prompts (``evaluate.split``) and human pairs, score's training pairs,
train's model/ and metrics.jsonl. The baseline is the reference (``evaluate.baseline=reference``)
or the registry's current ``champion`` (falls back to the reference while there is none).

Both models sample ``evaluate.n`` responses per prompt with the generate backend and the same
per-prompt seeds; the run's scorer rewards them. Sequence log-probs under the policy and the
reference (transformers, ``pipeline.reference``) give KL(pi || ref) from samples, the DID entropy,
implicit-reward agreement with the human pairs and likelihood displacement. Metrics are pure
functions in ``pipeline/evaluation.py``.

Outputs in runs/<run>/evaluate/: report.json, summary.txt, policy_samples.parquet,
baseline_samples.parquet, plots/*.png; all logged to MLflow under the pipeline's parent run.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data, plots, registry, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig, config_hash, objective_kwargs
from pipeline.evaluation import ModelSamples, PairLogps, build_report
from pipeline.generation import (
    SamplingSettings,
    Throughput,
    generate_rows,
    make_sampler,
    model_fingerprint,
    prepare_prompts,
    release_vllm_engine,
    vllm_engine,
)
from pipeline.models import check_model_folder, load_tokenizer
from pipeline.reference import TransformersLogprobs
from pipeline.runstore import RunStore, StageError, atomic_write_json
from pipeline.scoring import (
    JudgeScorer,
    RewardModelScorer,
    ScoringError,
    call_reward_function,
    describe_errors,
    load_reward_function,
    text_pairs,
)


def resolve_baseline(cfg: RunConfig, reference_dir: Path) -> dict[str, Any]:
    """{kind, version, model_dir}: the reference, or the registry's champion when asked."""
    reference = {"kind": "reference", "version": None, "model_dir": str(reference_dir)}
    if cfg.evaluate.baseline == "reference":
        return reference
    mlflow = tracking.setup(cfg)
    client = mlflow.MlflowClient()
    name = cfg.promote.registered_model
    reg = registry.Registry(client, name)
    champion = reg.by_alias(registry.CHAMPION) if reg.exists() else None
    if champion is None:
        print(
            f"[evaluate] registered model {name!r} has no champion yet: the baseline is the "
            "reference",
            file=sys.stderr,
        )
        return {**reference, "note": f"no champion in {name!r}; fell back to the reference"}
    version = str(champion.version)
    folder = registry.download_version(
        client, name, version, Path(cfg.cache_dir) / "registry" / f"{name}-v{version}"
    )
    return {
        "kind": "champion",
        "version": version,
        "model_dir": str(folder),
        "registered_model": name,
    }


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    ev, g = cfg.evaluate, cfg.generate
    prep = store.require("prepare")
    store.require("score")
    train = store.require("train")
    policy_dir = check_model_folder(store.stage_dir("train") / "model")
    reference_dir = check_model_folder(Path(train.get("reference_model_dir") or prep["model_dir"]))
    baseline = resolve_baseline(cfg, reference_dir)
    current = store.complete_manifest("evaluate")
    if current is not None and current.get("baseline", {}).get("version") != baseline["version"]:
        force = True  # the champion moved since: a new baseline

    with store.stage("evaluate", inputs=["prepare", "score", "train"], force=force) as st:
        if st.skipped:
            return
        tokenizer = load_tokenizer(reference_dir, trust_remote_code=cfg.model.trust_remote_code)
        for other in {str(policy_dir), baseline["model_dir"]} - {str(reference_dir)}:
            if load_tokenizer(other).get_vocab() != tokenizer.get_vocab():
                raise StageError(
                    f"{other} has a different vocabulary from the reference "
                    f"{reference_dir}: their token ids cannot be compared"
                )

        # -- held-out prompts, sampled from both models with the same per-prompt seeds --------
        source = store.stage_dir("prepare") / "prompts" / f"{ev.split}.parquet"
        rows = data.read_rows(source)[: ev.num_prompts]
        if not rows:
            raise StageError(f"{source} has no prompts to evaluate on")
        prompts = prepare_prompts(
            tokenizer,
            [str(r["prompt_id"]) for r in rows],
            [r["prompt"] for r in rows],
            [r["prompt_text"] for r in rows],
            cfg.model.max_prompt_length,
            g.long_prompts,
            str(source),
        )
        settings = SamplingSettings(
            n=ev.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed
        )
        # Policy samples: scratch (kept across a kill, removed on success). Baseline samples
        # depend only on the baseline model and these settings: a shared cache, so runs that
        # differ only in training (the frontier's points) sample the reference once.
        policy_rows = _sample(
            cfg,
            store,
            policy_dir,
            "policy",
            rows,
            prompts,
            tokenizer,
            settings,
            store.scratch_dir("evaluate"),
        )
        baseline_rows = _sample(
            cfg,
            store,
            Path(baseline["model_dir"]),
            "baseline",
            rows,
            prompts,
            tokenizer,
            settings,
            Path(cfg.cache_dir) / "evaluate-samples",
        )
        release_vllm_engine()
        scorer = _score(cfg, policy_rows, baseline_rows)

        # -- sequence log-probs under the policy, the reference (and the champion) ------------
        human = _human_pairs(cfg, store, tokenizer)
        train_pairs = data.read_rows(store.stage_dir("score") / "pairs.parquet")[
            : ev.num_train_pairs
        ]
        policy_seqs = _sample_sequences(policy_rows)
        pair_seqs = _pair_sequences(human) + _pair_sequences(train_pairs)
        base_seqs = _sample_sequences(baseline_rows) if baseline["kind"] != "reference" else []
        on_policy = _logps(cfg, policy_dir, policy_seqs + pair_seqs, "policy log-probs")
        on_ref = _logps(cfg, reference_dir, policy_seqs + base_seqs, "reference log-probs")
        on_ref += _logps(cfg, reference_dir, pair_seqs, "reference log-probs (pairs)", cache=True)
        base_logps = base_ref = None
        if base_seqs:
            base_logps = _logps(cfg, Path(baseline["model_dir"]), base_seqs, "baseline log-probs")
            base_ref = on_ref[len(policy_seqs) : len(policy_seqs) + len(base_seqs)]
            del on_ref[len(policy_seqs) : len(policy_seqs) + len(base_seqs)]

        n_pol, n_human = len(policy_seqs), 2 * len(human)
        beta = _implicit_beta(cfg)
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
            model_dir=str(policy_dir),
            objective=cfg.train.objective,
            model_hash=registry.model_folder_hash(train),
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

        _write_samples(
            st.dir / "policy_samples.parquet", policy_rows, on_policy[:n_pol], on_ref[:n_pol]
        )
        _write_samples(st.dir / "baseline_samples.parquet", baseline_rows, base_logps, base_ref)
        plot_files = _plots(
            st.dir / "plots",
            report,
            policy_rows,
            baseline_rows,
            store.stage_dir("train") / "metrics.jsonl",
        )
        text = summary_text(report)
        (st.dir / "summary.txt").write_text(text + "\n")
        data_file = st.dir / "report.json"
        data_file.write_text(
            json.dumps(_finite(report), indent=2, sort_keys=True, default=str) + "\n"
        )

        with tracking.stage_run(
            cfg,
            "evaluate",
            params={
                "split": ev.split,
                "prompts": len(rows),
                "n": ev.n,
                "baseline": baseline["kind"],
                "baseline_version": baseline["version"],
                "scorer": scorer,
                "backend": g.backend,
                "policy_dir": str(policy_dir),
                "reference_dir": str(reference_dir),
            },
        ) as mlrun:
            import mlflow

            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in report["metrics"].items()
                    if isinstance(v, int | float) and math.isfinite(v)
                }
            )
            for f in plot_files:
                mlflow.log_artifact(str(f), artifact_path="plots")
            mlflow.log_artifact(str(data_file))
            mlflow.log_artifact(str(st.dir / "summary.txt"))
            st.record(mlflow_run_id=mlrun.info.run_id)
        st.record(
            baseline={k: baseline[k] for k in ("kind", "version", "model_dir")},
            metrics=report["metrics"],
            policy_dir=str(policy_dir),
            reference_dir=str(reference_dir),
        )
        print(text, file=sys.stderr)
    shutil.rmtree(store.scratch_dir("evaluate"), ignore_errors=True)


# -- steps --------------------------------------------------------------------------------------
def _sample(
    cfg: RunConfig,
    store: RunStore,
    model_dir: Path,
    role: str,
    rows: list[dict[str, Any]],
    prompts: Any,
    tokenizer: Any,
    settings: SamplingSettings,
    scratch: Path,
) -> list[dict[str, Any]]:
    """Sample every prompt with the generate backend; finished chunks in ``scratch`` survive a
    kill and are reused for exactly these settings, model (path and contents) and prompts."""
    g = cfg.generate
    key = config_hash(
        [
            store.expected_hash("evaluate"),
            str(model_dir),
            model_fingerprint(model_dir),
            [r["prompt_id"] for r in rows],
        ]
    )
    folder = scratch / key
    folder.mkdir(parents=True, exist_ok=True)
    path = lambda c: folder / f"chunk-{c:05d}.parquet"  # noqa: E731

    def load_chunk(c: int) -> list[dict[str, Any]] | None:
        return data.read_rows(path(c)) if path(c).is_file() else None

    def save_chunk(c: int, chunk: list[dict[str, Any]]) -> None:
        tmp = path(c).with_suffix(f".tmp-{os.getpid()}")  # the baseline cache is shared
        try:
            data.write_rows(tmp, chunk)
            tmp.replace(path(c))
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves nothing behind

    from tqdm import tqdm

    n_chunks = (len(rows) + g.chunk_size - 1) // g.chunk_size
    if any(load_chunk(c) is None for c in range(n_chunks)):  # else: all kept from a killed run
        sampler = make_sampler(
            g.backend,
            model_dir,
            dtype=g.dtype,
            device=g.device,
            seed=g.seed,
            tensor_parallel_size=g.tensor_parallel_size,
            data_parallel_size=g.data_parallel_size,
            max_model_len=g.max_model_len,
            gpu_memory_utilization=g.gpu_memory_utilization,
            kv_cache_gib=g.kv_cache_gib,
            trust_remote_code=cfg.model.trust_remote_code,
            allow_pickle=cfg.model.allow_pickle_weights,
        )
        speed = Throughput()
        bar = tqdm(total=len(rows), unit="prompt", desc=f"sample {role} ({g.backend})")
        for done, tokens in generate_rows(
            sampler,
            tokenizer,
            rows,
            prompts,
            settings,
            g.batch_size,
            g.chunk_size,
            load_chunk,
            save_chunk,
        ):
            bar.update(done)
            bar.set_postfix(tok_s=f"{speed.add(tokens):.1f}")
        bar.close()
        del sampler
        gc.collect()
    return [r for c in range(n_chunks) for r in (load_chunk(c) or [])]


def _score(
    cfg: RunConfig, policy_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]
) -> str:
    """Reward every response with the run's scorer (``score.scorer``); policy and baseline
    responses of a prompt are scored together, so a pairwise judge compares them with each
    other. DICE's implicit reward is a training signal, not a metric: it is not used here."""
    sc = cfg.score.scorer
    joint = [
        {**p, "responses": p["responses"] + b["responses"]}
        for p, b in zip(policy_rows, baseline_rows, strict=True)
    ]
    prompts = [r["prompt"] for r in joint for _ in r["responses"]]
    responses = [t for r in joint for t in r["responses"]]
    errors: dict[int, str] = {}
    if sc.kind == "function":
        name = sc.function
        rewards, errors = call_reward_function(
            load_reward_function(sc.function), prompts, responses, sc.batch_size, desc="reward"
        )
    elif sc.kind == "reward_model":
        assert sc.model is not None  # validated by ScorerConfig
        name = f"reward_model({sc.model})"
        rm = RewardModelScorer(
            Path(sc.model),
            dtype=sc.dtype,
            device=cfg.score.device,
            max_length=sc.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        rewards, errors = call_reward_function(rm, prompts, responses, sc.batch_size)
    else:
        assert sc.model is not None
        name = f"judge({sc.model})"
        g = cfg.generate
        llm = vllm_engine(
            Path(sc.model),
            dtype=sc.dtype,
            seed=g.seed,
            device=g.device,
            tensor_parallel_size=g.tensor_parallel_size,
            data_parallel_size=g.data_parallel_size,
            max_model_len=g.max_model_len,
            gpu_memory_utilization=g.gpu_memory_utilization,
            kv_cache_gib=g.kv_cache_gib,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        judge = JudgeScorer(llm, load_tokenizer(sc.model), sc.judge_template, sc.max_length)
        scores = judge.score_groups([r["prompt"] for r in joint], [r["responses"] for r in joint])
        rewards = np.array([v for group in scores for v in group], dtype=float)
        release_vllm_engine()
    if errors:
        keys = [(r["prompt_id"], k) for r in joint for k in range(len(r["responses"]))]
        raise ScoringError(
            f"{len(errors)} evaluation responses got no valid reward from {name}:\n"
            + describe_errors(errors, lambda i: f"prompt_id {keys[i][0]} response {keys[i][1]}")
        )
    i = 0
    for p, b in zip(policy_rows, baseline_rows, strict=True):
        k_p, k_b = len(p["responses"]), len(b["responses"])
        p["rewards"] = [float(x) for x in rewards[i : i + k_p]]
        b["rewards"] = [float(x) for x in rewards[i + k_p : i + k_p + k_b]]
        i += k_p + k_b
    return name


def _human_pairs(cfg: RunConfig, store: RunStore, tokenizer: Any) -> list[dict[str, Any]]:
    source = store.stage_dir("prepare") / "human_pairs.parquet"
    if not source.is_file():
        return []
    rows = data.read_rows(source)[: cfg.evaluate.num_human_pairs]
    for i, r in enumerate(rows):
        r.setdefault("prompt_id", f"human-{i}")
    pairs, _ = text_pairs(rows, tokenizer, cfg, "human", str(source))
    return pairs


def _sample_sequences(rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    return [
        (list(r["prompt_token_ids"]), list(ids)) for r in rows for ids in r["response_token_ids"]
    ]


def _pair_sequences(pairs: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    return [(list(p["prompt_token_ids"]), list(p["chosen_token_ids"])) for p in pairs] + [
        (list(p["prompt_token_ids"]), list(p["rejected_token_ids"])) for p in pairs
    ]


def _logps(
    cfg: RunConfig,
    model_dir: Path,
    seqs: list[tuple[list[int], list[int]]],
    desc: str,
    cache: bool = False,
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
        key = config_hash([str(model_dir), model_fingerprint(model_dir), ev.dtype, seqs])
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


def _implicit_beta(cfg: RunConfig) -> float:
    """The objective's beta scales its implicit reward beta * log(pi/ref)."""
    from pipeline.objectives import make_objective

    return float(make_objective(cfg.train.objective, **objective_kwargs(cfg.train)).beta)


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


def _plots(
    folder: Path,
    report: dict[str, Any],
    policy_rows: list[dict[str, Any]],
    baseline_rows: list[dict[str, Any]],
    metrics_file: Path,
) -> list[Path]:
    pol, base = report["policy"], report["baseline"]
    base_label = base["kind"] + (f" v{base['version']}" if base.get("version") else "")
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
    base_label = base["kind"] + (f" v{base['version']}" if base.get("version") else "")
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


def _finite(v: Any) -> Any:
    """NaN/inf -> None, so report.json is strict JSON."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
