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


def _pairs(n: int, tag: str) -> list[str]:
    return [
        json.dumps({"prompt": f"Q{i}?", "chosen": f"{tag} good {i}.", "rejected": f"Bad {i}."})
        for i in range(n)
    ]


def test_data_edited_in_place_reruns_prepare(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    """Inputs outside the run store are fingerprinted by content: rewriting the data file reruns
    prepare; touching it (new mtime, same bytes) does not."""
    path = _jsonl(tmp_path / "prefs.jsonl", _pairs(20, "First"))
    cfg = tiny_config("data.task=preference", f"data.path={path}")
    store = RunStore(cfg)
    run_stage(cfg, "prepare")
    first = store.require("prepare")
    path.touch()
    run_stage(cfg, "prepare")
    assert store.require("prepare")["finished"] == first["finished"]
    _jsonl(path, _pairs(20, "Second"))
    run_stage(cfg, "prepare")
    rows = data.read_rows(store.stage_dir("prepare") / "preference.parquet")
    assert all(r["chosen"].startswith("Second") for r in rows)
    assert store.require("prepare")["output_hash"] != first["output_hash"]


@pytest.mark.parametrize(
    ("lines", "drop", "expected"),
    [
        (_pairs(1, "Only"), False, r"no preference pairs left to train on: 1 usable row\(s\)"),
        (
            ['{"prompt": "x"}', json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"})],
            True,
            r"no usable rows \(2 read, 2 bad\)",
        ),
    ],
)
def test_zero_usable_pairs_are_refused_at_prepare(
    tiny_config: ConfigFactory, tmp_path: Path, lines: list[str], drop: bool, expected: str
) -> None:
    path = _jsonl(tmp_path / "prefs.jsonl", lines)
    cfg = tiny_config("data.task=preference", f"data.path={path}", f"data.drop_bad_rows={drop}")
    with pytest.raises(data.DataError, match=expected):
        run_stage(cfg, "prepare")
    assert not RunStore(cfg).stage_dir("prepare").exists()


def test_long_texts_are_bounded_before_tokenisation(
    tiny_config: ConfigFactory, tmp_path: Path
) -> None:
    """A 2M-character prompt is cut to its end (generate.long_prompts=truncate) and counted
    before any tokenizer sees it, or refused naming its line (fail)."""
    huge = {"prompt": "word " * 400_000 + "THE END", "chosen": "Yes.", "rejected": "No."}
    path = _jsonl(tmp_path / "prefs.jsonl", [*_pairs(10, "Fine"), json.dumps(huge)])
    cfg = tiny_config("data.task=preference", f"data.path={path}")
    run_stage(cfg, "prepare")
    manifest = RunStore(cfg).require("prepare")
    assert manifest["counts"]["texts_clipped"] == 1
    bound = data.CHARS_PER_TOKEN_BOUND * cfg.model.max_length
    d = RunStore(cfg).stage_dir("prepare")
    prompts = [r["prompt"] for f in d.glob("prompts/*.parquet") for r in data.read_rows(f)]
    assert max(map(len, prompts)) == bound and any(p.endswith("THE END") for p in prompts)

    cfg = tiny_config("data.task=preference", f"data.path={path}", "generate.long_prompts=fail")
    with pytest.raises(data.DataError, match=r"prefs.jsonl:11: field 'prompt': 2000007 char"):
        run_stage(cfg, "prepare")


def test_bad_data_fails_before_the_model_is_converted(
    tiny_config: ConfigFactory, tmp_path: Path
) -> None:
    """With the default model and an empty cache, a data error comes before the conversion."""
    path = _jsonl(tmp_path / "prefs.jsonl", [*_pairs(5, "Fine"), '{"prompt": "x"}'])
    cache = tmp_path / "empty-cache"
    cfg = tiny_config(
        "data.task=preference",
        f"data.path={path}",
        "model.base=smollm2-135m-instruct",
        "model.max_length=256",
        "model.max_prompt_length=128",
        f"cache_dir={cache}",
    )
    with pytest.raises(data.DataError, match=r"prefs.jsonl:6: field 'chosen': missing"):
        run_stage(cfg, "prepare")
    assert not (cache / "models").exists()


def test_bom_implicit_prompt_and_roles(tmp_path: Path) -> None:
    """A UTF-8 BOM on line 1 is accepted; TRL's implicit-prompt rows (chosen/rejected
    conversations sharing their opening) get the shared messages as prompt; an unknown role is
    named with its field, index and the allowed roles, with the prompt explicit or implicit."""
    user = {"role": "user", "content": "Rate the film."}
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "Lovely."}],
        "rejected": [user, {"role": "assistant", "content": "Dull."}],
    }
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(data.UTF8_BOM + (json.dumps(implicit) + "\n").encode() + GOOD.encode())
    rows = data.validate_rows(data.load_records(path), "preference", False, str(path))
    assert rows[0] == {"prompt": [user], "chosen": "Lovely.", "rejected": "Dull."}
    assert rows[1]["prompt"] == "Say hi"

    robot = {"role": "robot", "content": "Beep."}
    allowed = "'system', 'user', 'assistant', 'tool'"
    for row in (
        {"prompt": [user, robot], "chosen": "a", "rejected": "b"},
        {"chosen": [robot, {"role": "assistant", "content": "a"}], "rejected": [robot, user]},
    ):
        path = _jsonl(tmp_path / "roles.jsonl", [GOOD, json.dumps(row)])
        with pytest.raises(data.DataError) as e:
            data.validate_rows(data.load_records(path), "preference", False, str(path))
        index = 1 if "prompt" in row else 0
        assert (
            f"roles.jsonl:2: field 'prompt': message {index}: role 'robot' is not one of "
            f"{allowed}" in str(e.value)
        ), str(e.value)
