"""score: reward every sampled response, build preference pairs, precompute reference log-probs.

Inputs: generate's samples.parquet (or, for data.task=preference, prepare's preference.parquet
taken straight to pairs: offline mode), the reference model (score.reference_model, default
prepare's base model). Outputs in runs/<run>/score/: scored.parquet (every response with its
reward and why it was left out, if it was), pairs.parquet (chosen/rejected token ids, rewards,
per-token reference log-probs, TIS-DPO token weights when the objective needs them, source),
summary.png; the manifest records counts, drop reasons, the scorer, policy and reference folders.
The work itself is ``pipeline.pairing``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import data, pairing, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.runstore import RunStore
from pipeline.scoring import config_model_dir, reward_module_file, write_summary_plot


def input_fingerprints(cfg: RunConfig, store: RunStore) -> dict[str, str]:
    """Content fingerprints of score's inputs outside the run store: the reward function's
    module file, a reward model or judge folder, DICE's replay dataset."""
    s = cfg.score
    paths = {
        "score.scorer.function": reward_module_file(s.scorer.function)
        if s.scorer.kind == "function"
        else None,
        "score.scorer.model": s.scorer.model if s.scorer.kind != "function" else None,
        "score.dice.replay_path": s.dice.replay_path if s.dice.enabled else None,
    }
    return {
        key: store.fingerprint(value)
        for key, value in paths.items()
        if value and Path(value).expanduser().exists()
    }


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    s = cfg.score
    offline = cfg.data.pairs_from_data
    prep = store.require("prepare")
    gen = None if offline else store.require("generate")
    reference_dir = config_model_dir(
        s.reference_model or prep["model_dir"],
        "score.reference_model",
        allow_pickle=cfg.model.allow_pickle_weights,
    )
    models = pairing.ScoreModels(
        policy=Path(gen["model_dir"]) if gen else reference_dir,
        reference=reference_dir,
        base=Path(prep["model_dir"]),
    )
    # Same reference path, new weights: the fingerprint changes and the stage reruns.
    fingerprints = {"reference": store.fingerprint(reference_dir), **input_fingerprints(cfg, store)}
    inputs = ["prepare"] if offline else ["prepare", "generate"]
    source = (
        store.stage_dir("prepare") / "preference.parquet"
        if offline
        else store.stage_dir("generate") / "samples.parquet"
    )

    with store.stage("score", inputs=inputs, force=force, fingerprints=fingerprints) as st:
        if st.skipped:
            return
        tokenizer = pairing.shared_tokenizer(cfg, models)
        result = pairing.score_pairs(cfg, tokenizer, models, source)

        pairs = result.pair_rows()
        data.write_rows(st.dir / "pairs.parquet", pairs)
        data.write_rows(st.dir / "scored.parquet", result.scored_rows)
        summary = pairing.summary(result.scored_rows, pairs, result.drops, result.alpha)
        write_summary_plot(st.dir / "summary.png", result.scored_rows, pairs)
        st.record(
            counts={**result.counts, "pairs": len(pairs)},
            drops=result.drops,
            summary=summary,
            scorer=result.scorer,
            reference_model_dir=str(models.reference),
            policy_model_dir=str(models.policy),
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
                    "reference_model_dir": str(models.reference),
                    "policy_model_dir": str(models.policy),
                },
            ):
                import mlflow

                mlflow.log_metrics({k: float(v) for k, v in summary.items() if math.isfinite(v)})
                mlflow.log_artifact(str(st.dir / "summary.png"))
                tracking.log_dataset(source, source.stem, context="score input")
                tracking.log_dataset(st.dir / "pairs.parquet", "pairs", context="training")
        print(
            f"[score] {len(pairs)} pairs ({result.scorer}); drops {result.drops or 'none'} "
            f"-> {st.final_dir}",
            file=console,
        )


def main(argv: list[str] | None = None) -> None:
    stage_main("score", run, argv)


if __name__ == "__main__":
    main()
