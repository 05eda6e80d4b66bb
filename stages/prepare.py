"""prepare: materialise the base model (cache) and the task data (run store).

Outputs in runs/<run>/prepare/: prompts/{train,eval,test}.parquet, human_pairs.parquet
(held-out human preferences), preference.parquet (training pairs: user preference data, or
task vader-preference's pairs of train-split snippets); the manifest's
``model_dir`` names the base model folder in the cache.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline import data, models, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.runstore import RunStore


def _rendered(tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        prompt = r["prompt"]
        row = {
            **r,
            "prompt": data.prompt_display(prompt),
            "prompt_text": models.render_prompt(tokenizer, prompt),
        }
        row.setdefault("prompt_id", f"p{i}")
        out.append(row)
    return out


def _split(rows: list[dict[str, Any]], seed: int) -> dict[str, list[dict[str, Any]]]:
    order = list(rows)
    random.Random(seed).shuffle(order)
    a, b = int(0.8 * len(order)), int(0.9 * len(order))
    return {"train": order[:a], "eval": order[a:b], "test": order[b:]}


def input_fingerprints(cfg: RunConfig, store: RunStore) -> dict[str, str]:
    """Content fingerprints of prepare's inputs outside the run store: the data files and a
    base model given as a folder (edited in place, they rerun prepare)."""
    paths = {"data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path}
    if cfg.model.base not in models.BUILTIN_MODELS:
        paths["model.base"] = cfg.model.base
    return {
        key: store.fingerprint(value)
        for key, value in paths.items()
        if value and Path(value).expanduser().exists()
    }


def user_rows(cfg: RunConfig, limit: data.TextLimit) -> dict[str, list[dict[str, Any]]]:
    """The user dataset's validated rows, split into train/eval/test (data.eval_path, if set,
    gives eval and test); an error naming the counts when nothing is left to train on."""
    d = cfg.data
    assert d.path is not None  # validated by DataConfig
    rows = data.validate_rows(data.load_records(d.path), d.task, d.drop_bad_rows, d.path, limit)
    for i, r in enumerate(rows):
        r["prompt_id"] = f"u{i}"
    if d.eval_path:
        held = data.validate_rows(
            data.load_records(d.eval_path), d.task, d.drop_bad_rows, d.eval_path, limit
        )
        for i, r in enumerate(held):
            r["prompt_id"] = f"e{i}"
        half = len(held) // 2
        splits = {"train": rows, "eval": held[:half] or held, "test": held[half:] or held}
    else:
        splits = _split(rows, d.split_seed)
    if not splits["train"]:
        what = "preference pairs" if d.task == "preference" else "prompts"
        raise data.DataError(
            f"{d.path}: no {what} left to train on: {len(rows)} usable row(s), split "
            f"80/10/10 into {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; give "
            "more rows, or held-out rows in data.eval_path so that all of these train"
        )
    return splits


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    d = cfg.data
    fingerprints = input_fingerprints(cfg, store)
    with store.stage("prepare", force=force, fingerprints=fingerprints) as st:
        if st.skipped:
            return
        # User data first: a bad row fails in seconds, before any model is built or converted.
        limit = data.TextLimit.for_length(cfg.model.max_length, cfg.generate.long_prompts)
        builtin = d.task in ("vader-sentiment", "vader-preference")
        splits = user_rows(cfg, limit) if not builtin else {}
        snippets = data.load_vader_snippets() if (builtin or cfg.model.base == models.TINY) else []
        print(f"[prepare] model {cfg.model.base!r}", file=console)
        model_dir = models.resolve_model(
            cfg.model.base,
            Path(cfg.cache_dir),
            texts=lambda: [s.text for s in snippets],
            allow_pickle=cfg.model.allow_pickle_weights,
            seed=cfg.seed,
        )
        tok = models.load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        limits = {
            "train": d.num_train_prompts,
            "eval": d.num_eval_prompts,
            "test": d.num_test_prompts,
        }
        counts: dict[str, int] = {}

        if builtin:
            snippet_splits = data.split_snippets(snippets, d.split_seed)
            for name, limit_n in limits.items():
                rows = data.vader_prompts(
                    snippet_splits[name], d.instruction, d.prompt_words, limit_n
                )
                data.write_rows(st.dir / "prompts" / f"{name}.parquet", _rendered(tok, rows))
                counts[f"prompts_{name}"] = len(rows)
            pairs = data.human_pairs(
                snippet_splits["test"], d.human_pair_min_gap, d.num_human_pairs, d.split_seed
            )
            data.write_rows(st.dir / "human_pairs.parquet", _rendered(tok, pairs))
            counts["human_pairs"] = len(pairs)
            if d.task == "vader-preference":  # train on the train split's own snippet pairs
                train_pairs = data.training_pairs(
                    snippet_splits, d.human_pair_min_gap, d.num_train_pairs, d.split_seed
                )
                data.write_rows(st.dir / "preference.parquet", _rendered(tok, train_pairs))
                counts["preference_pairs"] = len(train_pairs)
        else:
            for name, limit_n in limits.items():
                part = [
                    {"prompt_id": r["prompt_id"], "prompt": r["prompt"]}
                    for r in splits[name][:limit_n]
                ]
                data.write_rows(st.dir / "prompts" / f"{name}.parquet", _rendered(tok, part))
                counts[f"prompts_{name}"] = len(part)
            if d.task == "preference":
                data.write_rows(st.dir / "preference.parquet", _rendered(tok, splits["train"]))
                held_pairs = [{**r, "pair_id": r["prompt_id"]} for r in splits["test"]]
                data.write_rows(st.dir / "human_pairs.parquet", _rendered(tok, held_pairs))
                counts["preference_pairs"] = len(splits["train"])
                counts["human_pairs"] = len(held_pairs)
            counts["texts_clipped"] = limit.clipped
        st.record(model_dir=str(model_dir), counts=counts)
        with tracking.stage_run(
            cfg, "prepare", params={"model": cfg.model.base, "data": d.model_dump(mode="json")}
        ):
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in counts.items()})
            for path in sorted(st.dir.rglob("*.parquet")):  # prompts and pairs, with digests
                name = str(path.relative_to(st.dir).with_suffix(""))
                tracking.log_dataset(path, name, context="prepare")
        print(f"[prepare] {counts} -> {st.final_dir}", file=console)


def main(argv: list[str] | None = None) -> None:
    stage_main("prepare", run, argv)


if __name__ == "__main__":
    main()
