"""Data: the built-in human-rated task, and the row-by-row validator for user datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import data
from pipeline.config import RunConfig
from pipeline.runstore import RunStore
from tests.conftest import ConfigFactory, run_stage


def test_vader_snippets_are_the_real_ground_truth() -> None:
    snippets = data.load_vader_snippets()
    assert len(snippets) == 10605
    assert snippets[0].text.startswith("The Rock is destined")
    assert snippets[0].rating == pytest.approx(2.26666666667)
    assert min(s.rating for s in snippets) >= -4 and max(s.rating for s in snippets) <= 4


def test_split_is_by_snippet_and_seeded() -> None:
    snippets = data.load_vader_snippets()
    a, b = data.split_snippets(snippets, 0), data.split_snippets(snippets, 0)
    assert [s.id for s in a["test"]] == [s.id for s in b["test"]]
    ids = [{s.id for s in a[k]} for k in ("train", "eval", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == len(snippets)
    assert [s.id for s in data.split_snippets(snippets, 1)["test"]] != [s.id for s in a["test"]]


def test_prepare_outputs(tiny_prepared: RunConfig) -> None:
    store = RunStore(tiny_prepared)
    m = store.require("prepare")
    assert Path(m["model_dir"]).is_dir()
    d = store.stage_dir("prepare")
    train = data.read_rows(d / "prompts" / "train.parquet")
    assert len(train) == tiny_prepared.data.num_train_prompts
    row = train[0]
    assert row["prompt"].startswith(tiny_prepared.data.instruction)
    assert "<|im_start|>assistant" in row["prompt_text"] and row["prompt"] in row["prompt_text"]
    test_ids = {r["prompt_id"] for r in data.read_rows(d / "prompts" / "test.parquet")}
    assert not test_ids & {r["prompt_id"] for r in train}
    pairs = data.read_rows(d / "human_pairs.parquet")
    assert len(pairs) == tiny_prepared.data.num_human_pairs
    for p in pairs:
        assert p["chosen_rating"] - p["rejected_rating"] >= tiny_prepared.data.human_pair_min_gap
    # rerunning is a no-op
    run_stage(tiny_prepared, "prepare")
    assert store.require("prepare")["finished"] == m["finished"]


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


GOOD = json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."})


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "p", "chosen": "a"', "invalid JSON"),
        (json.dumps({"prompt": "p", "chosen": "a"}), "field 'rejected': missing"),
        (json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}), "field 'chosen': empty"),
        (
            json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}),
            "field 'chosen': expected a string, got int",
        ),
        (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}), "identical"),
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "undecodable text"),
        (json.dumps({"chosen": "a", "rejected": "b"}), "field 'prompt': missing"),
    ],
)
def test_bad_row_named_with_file_line_field(tmp_path: Path, line: str, expected: str) -> None:
    path = _jsonl(tmp_path / "prefs.jsonl", [GOOD, line, GOOD])
    with pytest.raises(data.DataError) as e:
        data.validate_rows(data.load_records(path), "preference", False, str(path))
    assert f"{path}:2: " in str(e.value) and expected in str(e.value), str(e.value)
    kept = data.validate_rows(data.load_records(path), "preference", True, str(path))
    assert len(kept) == 2


def test_conversational_and_parquet_formats(tmp_path: Path) -> None:
    conv = {
        "prompt": [{"role": "user", "content": "Rate it"}],
        "chosen": [{"role": "assistant", "content": "Great"}],
        "rejected": [{"role": "assistant", "content": "Bad"}],
    }
    path = _jsonl(tmp_path / "c.jsonl", [json.dumps(conv)])
    rows = data.validate_rows(data.load_records(path), "preference", False, str(path))
    assert rows[0]["chosen"] == "Great" and rows[0]["prompt"] == conv["prompt"]
    pq = tmp_path / "p.parquet"
    data.write_rows(pq, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert (
        data.validate_rows(data.load_records(pq), "preference", False, str(pq))[0]["chosen"] == "b"
    )


def test_user_preference_task_end_to_end(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {
                "prompt": f"Question {i}?",
                "chosen": f"Good answer {i}.",
                "rejected": f"Bad answer {i}.",
            }
        )
        for i in range(20)
    ]
    path = _jsonl(tmp_path / "prefs.jsonl", lines + ['{"prompt": "x"}'])
    cfg = tiny_config("data.task=preference", f"data.path={path}")
    with pytest.raises(data.DataError, match=r"prefs.jsonl:21: field 'chosen': missing"):
        run_stage(cfg, "prepare")
    assert not RunStore(cfg).stage_dir("prepare").exists()  # failed before doing work
    cfg = tiny_config("data.task=preference", f"data.path={path}", "data.drop_bad_rows=true")
    run_stage(cfg, "prepare")
    d = RunStore(cfg).stage_dir("prepare")
    assert len(data.read_rows(d / "preference.parquet")) == 16
    assert len(data.read_rows(d / "human_pairs.parquet")) == 2
