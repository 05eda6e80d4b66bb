"""The bad-input corpus (tests/data/bad/): every input the pipeline reads, each with the exact
error it must produce. Plus property-based tests of the data validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import data, models
from pipeline.config import ConfigError, load_config

BAD = Path(__file__).parent / "data" / "bad"
EXPECTED = yaml.safe_load((BAD / "expected.yaml").read_text())


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED["config"].items()))
def test_bad_config(name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(BAD / "config" / name)
    assert expected in str(e.value), str(e.value)
    # Bounded, whatever the input: alias_bomb.yaml once printed 39 MB, huge_value.yaml 100 kB.
    assert len(str(e.value)) < 2000, len(str(e.value))


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED["data"].items()))
def test_bad_data_file(name: str, expected: str) -> None:
    path = BAD / "data" / name
    with pytest.raises(data.DataError) as e:
        data.validate_rows(data.load_records(path), "preference", False, str(path))
    assert expected in str(e.value), str(e.value)
    assert len(str(e.value)) < 2000, len(str(e.value))


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED["model"].items()))
def test_bad_model_folder(name: str, expected: str) -> None:
    with pytest.raises(models.ModelError) as e:
        models.check_model_folder(BAD / "model" / name)
    assert expected in str(e.value), str(e.value)


def test_corpus_is_complete() -> None:
    """Every file in the corpus has an expected error, and every expectation has a file."""
    for kind in ("config", "data", "model"):
        on_disk = {p.name for p in (BAD / kind).iterdir()}
        assert on_disk == set(EXPECTED[kind]), kind


_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=20
)
_value = st.one_of(st.none(), st.integers(), _text, st.lists(_text, max_size=2))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {}, optional={"prompt": _value, "chosen": _value, "rejected": _value}
        ),
        min_size=1,
        max_size=6,
    )
)
def test_validator_accepts_exactly_the_valid_rows(rows: list[dict], tmp_path_factory) -> None:
    """Property: a row is kept iff all three fields are non-empty strings and chosen != rejected;
    with drop_bad_rows off, any bad row fails the whole file and names its line."""
    path = tmp_path_factory.mktemp("prop") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def valid(r: dict) -> bool:
        fields = [r.get(k) for k in ("prompt", "chosen", "rejected")]
        return (
            all(isinstance(f, str) and f.strip() for f in fields) and r["chosen"] != r["rejected"]
        )

    n_valid = sum(map(valid, rows))
    records = data.load_records(path)
    if n_valid == len(rows):
        assert len(data.validate_rows(records, "preference", False, str(path))) == n_valid
        return
    first_bad = next(i for i, r in enumerate(rows) if not valid(r)) + 1
    with pytest.raises(data.DataError, match=rf"{path}:{first_bad}: "):
        data.validate_rows(records, "preference", False, str(path))
    if n_valid:
        assert len(data.validate_rows(records, "preference", True, str(path))) == n_valid
    else:
        with pytest.raises(data.DataError, match="no usable rows"):
            data.validate_rows(records, "preference", True, str(path))
