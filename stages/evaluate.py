"""evaluate: the trained policy against a baseline on held-out prompts, and against human pairs.

Inputs: prepare's held-out prompts (``evaluate.split``) and human pairs, score's training pairs,
train's model/ and metrics.jsonl. The baseline is the reference (``evaluate.baseline=reference``)
or the registry's current ``champion`` (falls back to the reference while there is none).

Both models sample ``evaluate.n`` responses per prompt with the generate backend and the same
per-prompt seeds; the run's scorer rewards them. Sequence log-probs under the policy and the
reference (transformers, ``pipeline.reference``) give KL(pi || ref) from samples, the DID
entropy, implicit-reward agreement with the human pairs and likelihood displacement. The steps
are ``pipeline/evaluation_steps.py``; the metrics, pure functions, ``pipeline/evaluation.py``.

Outputs in runs/<run>/evaluate/: report.json, summary.txt, policy_samples.parquet,
baseline_samples.parquet, plots/*.png; all logged to MLflow under the pipeline's parent run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from pipeline import registry, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.evaluation_steps import (
    evaluate_policy,
    samples_table,
    summary_text,
    write_outputs,
)
from pipeline.models import check_model_folder
from pipeline.runstore import RunStore

# The parent run's metrics: the experiment table's columns.
HEADLINE_METRICS = ("reward_gain", "win_rate", "kl", "human_accuracy")


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    ev, g = cfg.evaluate, cfg.generate
    prep = store.require("prepare")
    store.require("score")
    train = store.require("train")
    policy_dir = check_model_folder(store.stage_dir("train") / "model")
    reference_dir = check_model_folder(
        Path(train.get("reference_model_dir") or prep["model_dir"]),
        allow_pickle=cfg.model.allow_pickle_weights,
    )
    baseline = registry.resolve_baseline(cfg, reference_dir)
    # The champion moved since the last evaluation: a new baseline, evaluate again.
    fingerprints = {"baseline_version": str(baseline["version"] or "none")}

    with store.stage(
        "evaluate", inputs=["prepare", "score", "train"], force=force, fingerprints=fingerprints
    ) as st:
        if st.skipped:
            return
        result = evaluate_policy(
            cfg, store, policy_dir, reference_dir, baseline, registry.model_folder_hash(train)
        )
        report = result.report
        plot_files = write_outputs(st.dir, result, store.stage_dir("train") / "metrics.jsonl")

        with tracking.stage_run(
            cfg,
            "evaluate",
            params={
                "split": ev.split,
                "prompts": report["prompts"],
                "n": ev.n,
                "baseline": baseline["kind"],
                "baseline_version": baseline["version"],
                "scorer": report["scorer"],
                "backend": g.backend,
                "policy_dir": str(policy_dir),
                "reference_dir": str(reference_dir),
            },
        ) as mlrun:
            import mlflow

            metrics = {
                k: float(v)
                for k, v in report["metrics"].items()
                if isinstance(v, int | float) and math.isfinite(v)
            }
            # Linked to the model train logged: its page shows how it scored.
            model = tracking.train_model(cfg, train)
            mlflow.log_metrics(metrics, model_id=model.model_id if model is not None else None)
            tracking.log_parent_metrics(
                cfg, {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}
            )
            mlflow.log_table(samples_table(result), "samples.json")
            for f in plot_files:
                mlflow.log_artifact(str(f), artifact_path="plots")
            mlflow.log_artifact(str(st.dir / "report.json"))
            mlflow.log_artifact(str(st.dir / "summary.txt"))
            st.record(mlflow_run_id=mlrun.info.run_id)
        st.record(
            baseline={k: baseline[k] for k in ("kind", "version", "model_dir")},
            metrics=report["metrics"],
            policy_dir=str(policy_dir),
            reference_dir=str(reference_dir),
        )
        print(summary_text(report), file=console)
    shutil.rmtree(store.scratch_dir("evaluate"), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
