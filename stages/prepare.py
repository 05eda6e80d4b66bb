"""prepare: materialise the base model (cache) and the task data (run store).

Outputs in runs/<run>/prepare/: prompts/{train,eval,test}.parquet, human_pairs.parquet
(held-out human preferences), preference.parquet (user preference data only); the manifest's
``model_dir`` names the base model folder in the cache.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from pipeline import data, models
from pipeline.cli import stage_main
from pipeline.config import RunConfig
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


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    d = cfg.data
    with store.stage("prepare", force=force) as st:
        if st.skipped:
            return
        snippets = (
            data.load_vader_snippets()
            if (d.task == "vader-sentiment" or cfg.model.base == models.TINY)
            else []
        )
        print(f"[prepare] model {cfg.model.base!r}", file=sys.stderr)
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

        if d.task == "vader-sentiment":
            splits = data.split_snippets(snippets, d.split_seed)
            for name, limit in limits.items():
                rows = data.vader_prompts(splits[name], d.instruction, d.prompt_words, limit)
                data.write_rows(st.dir / "prompts" / f"{name}.parquet", _rendered(tok, rows))
                counts[f"prompts_{name}"] = len(rows)
            pairs = data.human_pairs(
                splits["test"], d.human_pair_min_gap, d.num_human_pairs, d.split_seed
            )
            data.write_rows(st.dir / "human_pairs.parquet", _rendered(tok, pairs))
            counts["human_pairs"] = len(pairs)
        else:
            assert d.path is not None  # validated by DataConfig
            rows = data.validate_rows(data.load_records(d.path), d.task, d.drop_bad_rows, d.path)
            for i, r in enumerate(rows):
                r["prompt_id"] = f"u{i}"
            if d.eval_path:
                held = data.validate_rows(
                    data.load_records(d.eval_path), d.task, d.drop_bad_rows, d.eval_path
                )
                for i, r in enumerate(held):
                    r["prompt_id"] = f"e{i}"
                half = len(held) // 2
                splits = {"train": rows, "eval": held[:half] or held, "test": held[half:] or held}
            else:
                splits = _split(rows, d.split_seed)
            for name, limit in limits.items():
                part = [
                    {"prompt_id": r["prompt_id"], "prompt": r["prompt"]}
                    for r in splits[name][:limit]
                ]
                data.write_rows(st.dir / "prompts" / f"{name}.parquet", _rendered(tok, part))
                counts[f"prompts_{name}"] = len(part)
            if d.task == "preference":
                data.write_rows(st.dir / "preference.parquet", _rendered(tok, splits["train"]))
                held_pairs = [{**r, "pair_id": r["prompt_id"]} for r in splits["test"]]
                data.write_rows(st.dir / "human_pairs.parquet", _rendered(tok, held_pairs))
                counts["preference_pairs"] = len(splits["train"])
                counts["human_pairs"] = len(held_pairs)
        st.record(model_dir=str(model_dir), counts=counts)
        print(f"[prepare] {counts} -> {st.final_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    stage_main("prepare", run, argv)


if __name__ == "__main__":
    main()
