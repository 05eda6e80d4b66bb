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
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline import data, tracking
from pipeline.cli import stage_main
from pipeline.config import ConfigError, RunConfig, config_hash
from pipeline.generation import (
    SamplingSettings,
    Throughput,
    check_sampling_model,
    generate_rows,
    make_sampler,
    model_fingerprint,
    prepare_prompts,
)
from pipeline.models import load_tokenizer
from pipeline.runstore import RunStore


def sampling_model_dir(cfg: RunConfig, prepare_manifest: dict[str, Any]) -> Path:
    """generate.model if set (a later round's policy), else prepare's base model."""
    return Path(cfg.generate.model or prepare_manifest["model_dir"]).expanduser().resolve()


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    g = cfg.generate
    if cfg.data.task == "preference":
        print(
            "[generate] data.task=preference: pairs come from the dataset (offline mode); "
            "nothing to generate",
            file=sys.stderr,
        )
        return
    if g.max_tokens + cfg.model.max_prompt_length > cfg.model.max_length:
        raise ConfigError(
            f"generate.max_tokens ({g.max_tokens}) + model.max_prompt_length "
            f"({cfg.model.max_prompt_length}) exceed model.max_length ({cfg.model.max_length})"
        )
    prep = store.require("prepare")
    model_dir = sampling_model_dir(cfg, prep)
    check_sampling_model(model_dir)
    fingerprint = model_fingerprint(model_dir)
    current = store.complete_manifest("generate")
    if current is not None and current.get("model_fingerprint") != fingerprint:
        force = True  # same path, new weights (e.g. a re-exported policy): sample again

    with store.stage("generate", inputs=["prepare"], force=force) as st:
        if st.skipped:
            return
        source = store.stage_dir("prepare") / "prompts" / "train.parquet"
        rows = data.read_rows(source)
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
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
            n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed
        )
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

        # Chunks from a killed run are reused only for exactly this config, input and model.
        scratch = store.scratch_dir("generate") / config_hash(
            [store.expected_hash("generate"), prep["output_hash"], str(model_dir), fingerprint]
        )
        chunk_path = lambda c: scratch / f"chunk-{c:05d}.parquet"  # noqa: E731

        def load_chunk(c: int) -> list[dict[str, Any]] | None:
            return data.read_rows(chunk_path(c)) if chunk_path(c).is_file() else None

        def save_chunk(c: int, chunk: list[dict[str, Any]]) -> None:
            tmp = chunk_path(c).with_suffix(".tmp")
            data.write_rows(tmp, chunk)
            tmp.replace(chunk_path(c))

        from tqdm import tqdm

        speed = Throughput()
        bar = tqdm(total=len(rows), unit="prompt", desc=f"generate ({g.backend})")
        for done_prompts, tokens in generate_rows(
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
            bar.update(done_prompts)
            bar.set_postfix(tok_s=f"{speed.add(tokens):.1f}")
        bar.close()
        samples = [
            r
            for c in range((len(rows) + g.chunk_size - 1) // g.chunk_size)
            for r in (load_chunk(c) or [])
        ]
        assert len(samples) == len(rows), "a generated chunk went missing from scratch"
        data.write_rows(st.dir / "samples.parquet", samples)

        lengths = [len(t) for r in samples for t in r["response_token_ids"]]
        reasons = Counter(f for r in samples for f in r["finish_reasons"])
        summary = {
            "prompts": len(rows),
            "samples": len(lengths),
            "truncated_prompts": sum(prompts.truncated),
            "generated_tokens": sum(lengths),
            "mean_response_tokens": sum(lengths) / max(len(lengths), 1),
            "finish_stop": reasons.get("stop", 0),
            "finish_length": reasons.get("length", 0),
            "tokens_per_s": speed.rate,
        }
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
            file=sys.stderr,
        )
    shutil.rmtree(store.scratch_dir("generate"), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    stage_main("generate", run, argv)


if __name__ == "__main__":
    main()
