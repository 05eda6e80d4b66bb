"""Data: the built-in human-rated sentiment task and validated user datasets (TRL formats).

Built-in task: movie-review snippets from the vaderSentiment 3.3.2 sdist, each with the mean of
about 20 human ratings on -4..+4 (Hutto & Gilbert, ICWSM 2014; MIT). Prompts are a snippet's
opening words; held-out human preference pairs are two snippets whose mean ratings differ
clearly, the more positive one preferred.

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

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
HUMAN_PAIR_PROMPT = "Write a one-sentence movie review."


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


# -- user datasets ----------------------------------------------------------------------------
def load_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from JSONL, JSON, Parquet or a saved HF dataset folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {p} does not exist")
    if p.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys"):  # a DatasetDict: take the train split
            if "train" not in ds:
                raise DataError(f"{p}: a DatasetDict without a 'train' split ({list(ds.keys())})")
            ds = ds["train"]
        return [(f"{p}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    if p.suffix == ".parquet":
        return [(f"{p}:row {i + 1}", r) for i, r in enumerate(read_rows(p))]
    if p.suffix in (".jsonl", ".json"):
        raw = p.read_bytes()
        if p.suffix == ".json" and raw.lstrip().startswith(b"["):
            try:
                rows = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p}: invalid JSON ({e})") from None
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
        return out
    raise DataError(
        f"dataset {p}: unsupported format (use .jsonl, .json, .parquet or a saved dataset folder)"
    )


def _text(row: dict[str, Any], field: str, role: str | None = None) -> str:
    """A non-empty string from a string field or a message list (TRL conversational format)."""
    if field not in row or row[field] is None:
        raise DataError(f"field '{field}': missing")
    value = row[field]
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and "content" in m for m in value):
            raise DataError(
                f"field '{field}': expected a string or a list of {{role, content}} messages"
            )
        if role is not None:
            value = [m for m in value if m.get("role") == role] or value
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"field '{field}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"field '{field}': empty")
    if "\ufffd" in value:
        raise DataError(f"field '{field}': undecodable text (replacement characters)")
    return value


def _messages(row: dict[str, Any]) -> str | list[dict[str, str]]:
    value = row.get("prompt")
    return value if isinstance(value, list) else _text(row, "prompt")


def validate_rows(
    records: list[tuple[str, dict[str, Any]]], kind: str, drop_bad: bool, source: str
) -> list[dict[str, Any]]:
    """Validate every row before any work. kind: 'preference' or 'prompts'.

    Returns normalised rows {prompt (str or messages), [chosen, rejected]}; raises DataError
    listing bad rows (first 10) unless ``drop_bad``, in which case it reports the count.
    """
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    for where, row in records:
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            if "__error__" in row:
                raise DataError(row["__error__"])
            _text(row, "prompt", role="user")
            out: dict[str, Any] = {"prompt": _messages(row)}
            if kind == "preference":
                out["chosen"] = _text(row, "chosen", role="assistant")
                out["rejected"] = _text(row, "rejected", role="assistant")
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
            file=sys.stderr,
        )
    if not good:
        raise DataError(f"{source}: no usable rows")
    return good


def prompt_display(prompt: str | list[dict[str, str]]) -> str:
    """The text of a prompt (last user message for conversational prompts)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
