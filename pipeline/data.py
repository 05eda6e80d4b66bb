"""Data: the built-in human-rated sentiment task and validated user datasets (TRL formats).

Built-in task: movie-review snippets from the vaderSentiment 3.3.2 sdist, each with the mean of
about 20 human ratings on -4..+4 (Hutto & Gilbert, ICWSM 2014; MIT). Prompts are a snippet's
opening words; held-out human preference pairs are two snippets whose mean ratings differ
clearly, the more positive one preferred. Task vader-preference trains on such pairs from the
train split (``training_pairs``), no generation.

User datasets: JSONL, Parquet or a saved HF dataset, in TRL's preference formats (standard
``prompt``/``chosen``/``rejected`` strings; conversational message lists; prompt-only for
generation). Every row is validated; a bad row is reported with file, line and field.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.console import console

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
HUMAN_PAIR_PROMPT = "Write a one-sentence movie review."
UTF8_BOM = b"\xef\xbb\xbf"
_TOO_DEEP = "nested too deeply to read"
# Chat roles a message may have (OpenAI / Hugging Face chat templates).
ROLES = ("system", "user", "assistant", "tool")
# Text is bounded before tokenisation: no token of a real tokenizer is near this many characters,
# so a text this long in characters per max_length token cannot fit anyway.
CHARS_PER_TOKEN_BOUND = 32


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass(frozen=True)
class Snippet:
    id: int
    rating: float  # mean human rating, -4 (most negative) .. +4 (most positive)
    text: str


# -- parquet I/O shared by every stage ---------------------------------------------------------
def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows -> Parquet (readable as a Hugging Face dataset with Dataset.from_parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())


# -- the built-in task ------------------------------------------------------------------------
def vader_sdist_path() -> Path:
    """The vaderSentiment sdist kept by `make setup` in <venv>/share/midpo."""
    candidates = [Path(sys.prefix) / "share" / "midpo" / VADER_SDIST]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"the built-in task needs {VADER_SDIST} (human-rated snippets) in {candidates[0].parent}: "
        "run `make setup`, or `pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 "
        f"-d {candidates[0].parent}`"
    )


def load_vader_snippets(sdist: Path | None = None) -> list[Snippet]:
    sdist = sdist or vader_sdist_path()
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(_INNER_TAR).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(_SNIPPETS).read()  # type: ignore[union-attr]
    where = f"{sdist.name}:{_SNIPPETS}"
    snippets = []
    for line_no, line in enumerate(raw.decode("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{where}:{line_no}: expected 'id<TAB>rating<TAB>text'")
        try:
            snippets.append(Snippet(int(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError as e:
            raise DataError(f"{where}:{line_no}: {e}") from None
    return snippets


def split_snippets(snippets: list[Snippet], seed: int) -> dict[str, list[Snippet]]:
    """Split by snippet (80/10/10) with a fixed seed: no snippet is in two splits."""
    order = sorted(snippets, key=lambda s: s.id)
    random.Random(seed).shuffle(order)
    n = len(order)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": order[:a], "eval": order[a:b], "test": order[b:]}


def opening(text: str, words: int) -> str | None:
    """The first ``words`` words of a snippet, or None when it is too short to continue."""
    tokens = text.replace("''", '"').replace("``", '"').split()
    if len(tokens) < words + 3:
        return None
    return " ".join(tokens[:words])


def vader_prompts(
    split: list[Snippet], instruction: str, words: int, limit: int
) -> list[dict[str, Any]]:
    rows = []
    for s in split:
        start = opening(s.text, words)
        if start is None:
            continue
        rows.append({"prompt_id": f"vader-{s.id}", "prompt": instruction + start})
        if len(rows) == limit:
            break
    return rows


def human_pairs(
    split: list[Snippet], min_gap: float, limit: int, seed: int
) -> list[dict[str, Any]]:
    """Pairs of distinct snippets whose mean human ratings differ by >= min_gap."""
    rng = random.Random(seed + 1)
    pool = list(split)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(50 * max(limit, 1)):
        if len(rows) >= limit or len(pool) < 2:
            break
        a, b = rng.sample(pool, 2)
        if abs(a.rating - b.rating) < min_gap or a.text == b.text:
            continue
        hi, lo = (a, b) if a.rating > b.rating else (b, a)
        key = (hi.id, lo.id)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "pair_id": f"human-{hi.id}-{lo.id}",
                "prompt": HUMAN_PAIR_PROMPT,
                "chosen": hi.text,
                "rejected": lo.text,
                "chosen_rating": hi.rating,
                "rejected_rating": lo.rating,
            }
        )
    return rows


def training_pairs(
    splits: dict[str, list[Snippet]], min_gap: float, limit: int, seed: int
) -> list[dict[str, Any]]:
    """Training pairs for task vader-preference: :func:`human_pairs` of the train split, from
    which a snippet whose text is also in the test split (the held-out pairs' pool; the corpus
    repeats a text under two ids) is left out, so no held-out text is ever trained on."""
    held_out = {s.text for s in splits["test"]}
    pool = [s for s in splits["train"] if s.text not in held_out]
    return [{**row, "prompt_id": row["pair_id"]} for row in human_pairs(pool, min_gap, limit, seed)]


# -- user datasets ----------------------------------------------------------------------------
def load_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from JSONL, JSON, Parquet or a saved HF dataset folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {p} does not exist")
    if p.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(p))
        except FileNotFoundError:
            raise DataError(
                f"dataset {p}: a folder that is not a saved dataset (no dataset_info.json or "
                "state.json from save_to_disk); give a .jsonl, .json or .parquet file instead"
            ) from None
        if hasattr(ds, "keys"):  # a DatasetDict: take the train split
            if "train" not in ds:
                raise DataError(f"{p}: a DatasetDict without a 'train' split ({list(ds.keys())})")
            ds = ds["train"]
        return [(f"{p}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    if p.suffix == ".parquet":
        return [(f"{p}:row {i + 1}", r) for i, r in enumerate(read_rows(p))]
    if p.suffix in (".jsonl", ".json"):
        raw = p.read_bytes().removeprefix(UTF8_BOM)  # editors on Windows write one
        if p.suffix == ".json" and raw.lstrip().startswith(b"["):
            try:
                rows = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p}: invalid JSON ({e})") from None
            except RecursionError:
                raise DataError(f"{p}: invalid JSON ({_TOO_DEEP})") from None
            return [(f"{p}:item {i + 1}", r) for i, r in enumerate(rows)]
        out = []
        for line_no, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{p}:{line_no}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append((where, {"__error__": f"undecodable text (not UTF-8: {e.reason})"}))
                continue
            try:
                out.append((where, json.loads(text)))
            except json.JSONDecodeError as e:
                out.append((where, {"__error__": f"invalid JSON ({e.msg} at column {e.colno})"}))
            except RecursionError:
                out.append((where, {"__error__": f"invalid JSON ({_TOO_DEEP})"}))
        return out
    raise DataError(
        f"dataset {p}: unsupported format (use .jsonl, .json, .parquet or a saved dataset folder)"
    )


@dataclass
class TextLimit:
    """The bound on a text's characters before tokenisation (``CHARS_PER_TOKEN_BOUND`` per
    max_length token): longer prompts are cut to their end or refused (``policy``, as
    generate.long_prompts), longer responses cut to their start; ``clipped`` counts the cuts."""

    max_chars: int
    policy: str = "truncate"
    clipped: int = 0

    @classmethod
    def for_length(cls, max_length: int, policy: str) -> TextLimit:
        return cls(CHARS_PER_TOKEN_BOUND * max_length, policy)

    def prompt(self, text: str, field: str) -> str:
        if len(text) <= self.max_chars:
            return text
        if self.policy == "fail":
            raise DataError(
                f"field '{field}': {len(text)} characters, over the {self.max_chars} that "
                "model.max_length allows; set generate.long_prompts=truncate to keep its end"
            )
        self.clipped += 1
        return text[-self.max_chars :]

    def response(self, text: str) -> str:
        if len(text) <= self.max_chars:
            return text
        self.clipped += 1
        return text[: self.max_chars]


def _check_string(value: str, field: str) -> str:
    if not value.strip():
        raise DataError(f"field '{field}': empty")
    if "\ufffd" in value:
        raise DataError(f"field '{field}': undecodable text (replacement characters)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" in JSON
        raise DataError(
            f"field '{field}': invalid Unicode (lone surrogate at character {e.start})"
        ) from None
    return value


def _message_list(value: list[Any], field: str) -> list[dict[str, str]]:
    """A TRL conversational field: {role, content} messages with known roles."""
    if not value or not all(isinstance(m, dict) and "content" in m for m in value):
        raise DataError(
            f"field '{field}': expected a string or a list of {{role, content}} messages"
        )
    for i, m in enumerate(value):
        if m.get("role") not in ROLES:
            raise DataError(
                f"field '{field}': message {i}: role {str(m.get('role'))[:40]!r} is not one of "
                + ", ".join(repr(r) for r in ROLES)
            )
        if not isinstance(m["content"], str):
            raise DataError(f"field '{field}': message {i}: content is not a string")
        _check_string(m["content"], f"{field}[{i}].content")
    return value


def _text(row: dict[str, Any], field: str, role: str | None = None) -> str:
    """A non-empty string from a string field or a message list (TRL conversational format)."""
    if field not in row or row[field] is None:
        raise DataError(f"field '{field}': missing")
    value = row[field]
    if isinstance(value, list):
        messages = _message_list(value, field)
        if role is not None:
            messages = [m for m in messages if m["role"] == role] or messages
        value = messages[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"field '{field}': expected a string, got {type(value).__name__}")
    return _check_string(value, field)


def split_implicit_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's implicit-prompt format (``chosen``/``rejected`` conversations only, sharing their
    opening messages): the shared prefix becomes the prompt, the rest the responses, as TRL's
    ``extract_prompt`` does. Other rows are returned unchanged."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if row.get("prompt") is not None or not isinstance(chosen, list):
        return row
    if not isinstance(rejected, list) or not all(isinstance(m, dict) for m in chosen + rejected):
        return row  # reported as malformed by the validator
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            "field 'prompt': missing, and 'chosen' and 'rejected' share no opening messages "
            "to take it from"
        )
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _prompt(row: dict[str, Any], limit: TextLimit | None) -> str | list[dict[str, str]]:
    value = row["prompt"]
    if limit is None:
        return value if isinstance(value, list) else _text(row, "prompt")
    if isinstance(value, list):
        return [{**m, "content": limit.prompt(m["content"], "prompt")} for m in value]
    return limit.prompt(_text(row, "prompt"), "prompt")


def validate_rows(
    records: list[tuple[str, dict[str, Any]]],
    kind: str,
    drop_bad: bool,
    source: str,
    limit: TextLimit | None = None,
) -> list[dict[str, Any]]:
    """Validate every row before any work. kind: 'preference' or 'prompts'.

    Returns normalised rows {prompt (str or messages), [chosen, rejected]}; raises DataError
    listing bad rows (first 10) unless ``drop_bad``, in which case it reports the count. With a
    ``limit``, texts are bounded in characters (``TextLimit``) before anything tokenises them.
    """
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    for where, row in records:
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            if "__error__" in row:
                raise DataError(row["__error__"])
            if kind == "preference":
                row = split_implicit_prompt(row)
            _text(row, "prompt", role="user")
            out: dict[str, Any] = {"prompt": _prompt(row, limit)}
            if kind == "preference":
                for side in ("chosen", "rejected"):
                    text = _text(row, side, role="assistant")
                    out[side] = limit.response(text) if limit else text
                if out["chosen"] == out["rejected"]:
                    raise DataError("fields 'chosen' and 'rejected': identical")
            good.append(out)
        except DataError as e:
            bad.append(f"{where}: {e}")
    if bad and not drop_bad:
        more = f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(
            f"{len(bad)} bad row(s) in {source} (set data.drop_bad_rows=true to drop them):\n"
            + "\n".join(bad[:10])
            + more
        )
    if bad:
        print(
            f"[data] dropped {len(bad)} bad row(s) of {len(records)} in {source}; first: {bad[0]}",
            file=console,
        )
    if not good:
        raise DataError(f"{source}: no usable rows ({len(records)} read, {len(bad)} bad)")
    return good


def prompt_display(prompt: str | list[dict[str, str]]) -> str:
    """The text of a prompt (last user message for conversational prompts)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
