"""generate: sample generate.n responses per training prompt from a model folder.

Input: prepare's prompts/train.parquet and its base model (or ``generate.model``, e.g. a previous
round's export). Output: runs/<run>/generate/samples.parquet (one row per prompt: prompt,
prompt token ids, K responses with token ids, finish reasons and sampling log-probs); the
manifest records the backend, model folder and sampling settings.

Resumable: finished chunks of prompts are kept in the stage's scratch folder, so a killed run
picks up where it stopped (per-prompt seeds make the result identical either way).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline import data, tracking
from pipeline.cli import stage_main
from pipeline.config import ConfigError, RunConfig
from pipeline.console import console
from pipeline.generation import (
    check_sampling_model,
    prompts_for,
    sample_resumable,
    samples_summary,
    settings_for,
)
from pipeline.models import load_tokenizer
from pipeline.runstore import RunStore


def sampling_model_dir(cfg: RunConfig, prepare_manifest: dict[str, Any]) -> Path:
    """generate.model if set (a later round's policy), else prepare's base model."""
    return Path(cfg.generate.model or prepare_manifest["model_dir"]).expanduser().resolve()


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    g = cfg.generate
    if cfg.data.pairs_from_data:
        print(
            f"[generate] data.task={cfg.data.task}: pairs come from the dataset (offline "
            "mode); nothing to generate",
            file=console,
        )
        return
    if g.max_tokens + cfg.model.max_prompt_length > cfg.model.max_length:
        raise ConfigError(
            f"generate.max_tokens ({g.max_tokens}) + model.max_prompt_length "
            f"({cfg.model.max_prompt_length}) exceed model.max_length ({cfg.model.max_length})"
        )
    prep = store.require("prepare")
    model_dir = sampling_model_dir(cfg, prep)
    check_sampling_model(model_dir, cfg.model.allow_pickle_weights)
    # Same path, new weights (e.g. a re-exported policy): the fingerprint changes, sample again.
    fingerprint = store.fingerprint(model_dir)

    with store.stage(
        "generate", inputs=["prepare"], force=force, fingerprints={"model": fingerprint}
    ) as st:
        if st.skipped:
            return
        source = store.stage_dir("prepare") / "prompts" / "train.parquet"
        rows = data.read_rows(source)
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        prompts = prompts_for(cfg, tokenizer, rows, str(source))
        settings = settings_for(cfg, g.n)
        # Chunks from a killed run are reused only for exactly this config, input and model.
        samples, speed = sample_resumable(
            cfg,
            model_dir,
            tokenizer,
            rows,
            prompts,
            settings,
            scratch=store.scratch_dir("generate"),
            key=[store.expected_hash("generate"), prep["output_hash"], str(model_dir), fingerprint],
            desc=f"generate ({g.backend})",
        )
        data.write_rows(st.dir / "samples.parquet", samples)

        summary = samples_summary(samples, prompts, speed)
        st.record(
            backend=g.backend,
            model_dir=str(model_dir),
            model_fingerprint=fingerprint,
            sampling=settings.as_dict(),
            summary=summary,
        )
        if store.is_writer:
            with tracking.stage_run(
                cfg,
                "generate",
                params={"backend": g.backend, "model_dir": str(model_dir), **settings.as_dict()},
            ):
                import mlflow

                mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        print(
            f"[generate] {summary['samples']} samples for {len(rows)} prompts "
            f"({summary['truncated_prompts']} prompts truncated), "
            f"{summary['tokens_per_s']:.1f} tok/s -> {st.final_dir}",
            file=console,
        )
    shutil.rmtree(store.scratch_dir("generate"), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    stage_main("generate", run, argv)


if __name__ == "__main__":
    main()
