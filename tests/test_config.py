"""Config: presets load, overrides apply, and every kind of mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_hash, load_config, parse_override, stage_config
from tests.conftest import DEMO, TINY


def test_presets_load() -> None:
    demo = load_config(DEMO)
    tiny = load_config(TINY)
    assert demo.model.base == "smollm2-135m-instruct"
    assert tiny.model.base == "tiny"
    assert demo.train.objective == "dpo"


def test_dotted_overrides_apply() -> None:
    cfg = load_config(
        DEMO,
        [
            "train.objective=simpo",
            "train.beta=2.0",
            "generate.n=8",
            "train.objective_args={gamma_beta_ratio: 0.5}",
        ],
    )
    assert cfg.train.objective == "simpo"
    assert cfg.train.beta == 2.0
    assert cfg.generate.n == 8
    assert cfg.train.objective_args == {"gamma_beta_ratio": 0.5}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.betaa=0.1", "train.betaa: unknown key"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("generate.n=many", "generate.n: Input should be a valid integer"),
        ("generate.n=0", "generate.n: Input should be greater than or equal to 1 (got 0)"),
        ("generate.top_p=1.5", "generate.top_p: Input should be less than or equal to 1"),
        ("generate.backend=tgi", "generate.backend: must be one of 'vllm' or 'transformers'"),
        ("train.beta=-1", "train.beta: Input should be greater than 0 (got -1)"),
        ("train.objective=nosuch", "train.objective='nosuch'"),
        ("model.max_prompt_length=500", "max_prompt_length (500) must be < max_length"),
    ],
)
def test_errors_name_key_value_and_rule(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    msg = str(e.value)
    assert expected in msg, msg
    assert str(TINY) in msg  # the file is named
    assert "\n" not in msg  # one line per problem, one problem here


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_file_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("train.beta")
    with pytest.raises(ConfigError, match="train.beta is not a section"):
        load_config(TINY, ["train.beta=1", "train.beta.x=2"])


def test_stage_hash_covers_only_its_sections() -> None:
    a = load_config(TINY)
    b = load_config(TINY, ["train.learning_rate=0.5"])
    assert config_hash(stage_config(a, "generate")) == config_hash(stage_config(b, "generate"))
    assert config_hash(stage_config(a, "train")) != config_hash(stage_config(b, "train"))


def test_cli_script_accepts_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    from stages.cli import main

    main(["show-config", "--config", str(TINY), "train.objective=simpo", "train.beta=2.5"])
    out = capsys.readouterr().out
    assert "objective: simpo" in out and "beta: 2.5" in out
    with pytest.raises(SystemExit) as e:
        main(["show-config", "--config", str(TINY), "train.nope=1"])
    assert e.value.code == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_input_paths_are_confined_to_allowed_roots(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "pairs.jsonl").write_text("{}\n")
    root = tmp_path / "runs"
    root.mkdir()
    base = [f"root={root}", f"cache_dir={root / '_cache'}", "data.task=preference"]
    # Inside the run root: fine; outside it: refused, naming key, value and where it resolves.
    (root / "pairs.jsonl").write_text("{}\n")
    load_config(TINY, [*base, f"data.path={root / 'pairs.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data.path: '.*elsewhere/pairs.jsonl' resolves to"):
        load_config(TINY, [*base, f"data.path={outside / 'pairs.jsonl'}"])
    # A symlink (or ..) inside the root that leads outside it is followed and refused.
    (root / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"train.init_model: .* outside the allowed roots"):
        load_config(
            TINY, [*base, f"data.path={root / 'pairs.jsonl'}", f"train.init_model={root / 'link'}"]
        )
    with pytest.raises(ConfigError, match="score.scorer.model"):
        load_config(
            TINY,
            [
                *base,
                f"data.path={root / 'pairs.jsonl'}",
                "score.scorer.kind=reward_model",
                f"score.scorer.model={root}/../elsewhere",
            ],
        )
    # Named explicitly: allowed. Hub ids are not paths.
    load_config(TINY, [*base, f"data.path={outside / 'pairs.jsonl'}", f"allowed_roots=[{outside}]"])
    load_config(TINY, [*base, f"data.path={root / 'pairs.jsonl'}", "model.base=org/some-model"])


def test_dice_objective_needs_the_dice_data_loop() -> None:
    with pytest.raises(ConfigError, match="train.objective=dice is DPO .* score.dice.enabled=true"):
        load_config(TINY, ["train.objective=dice"])
    cfg = load_config(TINY, ["train.objective=dice", "score.dice.enabled=true"])
    assert cfg.train.objective == "dice"


def test_score_hash_depends_on_token_weights_not_the_objective_name() -> None:
    def score_hash(*overrides: str) -> str:
        return config_hash(stage_config(load_config(TINY, list(overrides)), "score"))

    dpo = score_hash("train.objective=dpo")
    # Switching the objective reuses pairs and reference log-probs...
    assert score_hash("train.objective=simpo", "train.beta=2.0") == dpo
    assert score_hash("train.objective=tdpo") == dpo
    # ...unless scoring must compute something for it (TIS-DPO's token weights).
    assert score_hash("train.objective=tisdpo") != dpo


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.lerning_rate=0.1",
            "train.lerning_rate: unknown key; did you mean train.learning_rate?",
        ),
        (
            "cluster.stages.train.partitio=gpu",
            "cluster.stages.train.partitio: unknown key; did you mean "
            "cluster.stages.train.partition?",
        ),
        ("tracking.experiment=a/b", "tracking.experiment: String should match pattern"),
        ("promote.registered_model=..", "promote.registered_model: String should match pattern"),
        ("generate.n=" + "9" * 5000, "value is not valid YAML (Exceeds the limit"),
    ],
)
def test_suggestions_names_and_bounded_errors(override: str, expected: str) -> None:
    """An unknown key suggests the nearest valid one (in nested sections too); names are not
    paths; whatever the value, the message stays short."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert expected in str(e.value), str(e.value)
    assert len(str(e.value)) < 1000
