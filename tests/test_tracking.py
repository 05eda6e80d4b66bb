"""MLflow tracking as users see it: params, secrets, experiments, full disks, and the tiny
pipeline against a real `mlflow server` (experiment kind, run durations, parent params and
metrics, registry lineage, dataset inputs)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.config import STAGES, RunConfig
from pipeline.runstore import RunStore
from stages import pipeline as pipeline_chain
from tests.conftest import TINY, ConfigFactory, MlflowServer, command_line
from tests.test_resource_faults import Mount, tmpfs  # noqa: F401  (the tmpfs fixture)


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_only_secret_like_keys_are_masked() -> None:
    params = tracking._flatten(
        {
            "generate": {"max_tokens": 48},
            "train": {"token_chunk_size": 1024},
            "model": {"max_prompt_length": 32},
            "hf_token": "hf_abc",
            "auth": {"api_key": "k", "password": "p", "client_secret": "s"},
        }
    )
    assert params["generate.max_tokens"] == "48"
    assert params["train.token_chunk_size"] == "1024"
    assert params["model.max_prompt_length"] == "32"
    for key in ("hf_token", "auth.api_key", "auth.password", "auth.client_secret"):
        assert params[key] == "***", key


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:s3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://s3cret@host/path", "https://***@host/path"),
        (
            "https://host/api?token=s3cret&x=1&X-Amz-Signature=s3cret",
            "https://host/api?token=***&x=1&X-Amz-Signature=***",
        ),
        ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_uris_lose_their_credentials(uri: str, expected: str) -> None:
    assert tracking.redact_uri(uri) == expected
    assert tracking.redact("tracking.uri", uri) == expected


def test_parent_run_logs_the_config_as_values(tiny_config: ConfigFactory) -> None:
    cfg = tiny_config("generate.max_tokens=12")
    client = tracking.setup(cfg).MlflowClient()
    params = client.get_run(tracking.parent_run_id(cfg)).data.params
    assert params["generate.max_tokens"] == "12"
    assert params["train.token_chunk_size"] == str(cfg.train.token_chunk_size)
    assert "***" not in params.values()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_changing_the_experiment_starts_a_new_parent_run(tiny_config: ConfigFactory) -> None:
    """tracking.experiment changed for an existing run: a clean new parent run in the new
    experiment (MLflow refused to resume the old one there)."""
    first = tiny_config("tracking.experiment=one")
    with tracking.stage_run(first, "prepare"):
        pass
    old = tracking.parent_run_id(first)
    second = tiny_config("tracking.experiment=two")
    with tracking.stage_run(second, "prepare") as run:
        pass
    client = tracking.setup(second).MlflowClient()
    new = tracking.parent_run_id(second)
    assert new != old
    two = client.get_experiment_by_name("two").experiment_id
    assert client.get_run(new).info.experiment_id == two
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == new
    assert client.get_run(old).info.experiment_id != two  # the old run stays where it was


def test_full_disk_while_creating_the_tracking_store(
    tmpfs: Mount,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk = tmpfs("disk", "64k")  # a new MLflow sqlite store needs several hundred KiB

    def run(cfg: RunConfig, store: RunStore, force: bool) -> None:
        tracking.setup(cfg)

    with pytest.raises(SystemExit) as exit_:
        stage_main("promote", run, ["--config", str(TINY), f"root={disk / 'runs'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"midpo promote: error: no space left on device writing {disk / 'runs' / 'mlflow.db'}:"
    ), err
    assert not any("Traceback" in line for line in err)
    assert not (disk / "runs" / "mlflow.db").exists()


# -- the tiny pipeline against a real `mlflow server` ---------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.wait_healthy()
        yield srv.url
    finally:
        srv.stop()


def _seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_tiny_pipeline_as_seen_in_mlflow(tiny_config: ConfigFactory, server: str) -> None:
    import mlflow

    cfg = tiny_config(f"tracking.uri={server}", "tracking.experiment=seen")
    stage_main("pipeline", pipeline_chain.run, _argv(cfg))
    client = mlflow.MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("seen")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    store = RunStore(cfg)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("midpo.role") == "pipeline")
    stage_runs = {r.data.tags["midpo.stage"]: r for r in runs if "midpo.stage" in r.data.tags}
    assert set(stage_runs) == set(STAGES)

    # Each stage run spans its work: it starts no later than the stage's output began (the
    # manifest's seconds are truncated) and ends after its work, before the manifest.
    for stage, run in stage_runs.items():
        manifest = store.complete_manifest(stage)
        assert manifest is not None
        began = _seconds(manifest["started"])
        assert run.info.start_time / 1000 <= began + 1.0, stage
        assert run.info.end_time / 1000 >= _seconds(manifest["finished"]) - 1.0, stage
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "***" not in run.data.params.values(), stage
    # The parent spans the chain, holds the resolved config and the headline results.
    assert parent.info.start_time <= stage_runs["prepare"].info.start_time
    assert parent.info.end_time >= stage_runs["promote"].info.end_time
    assert parent.data.params["generate.max_tokens"] == str(cfg.generate.max_tokens)
    assert parent.data.params["train.objective"] == cfg.train.objective
    assert "***" not in parent.data.params.values()
    report = json.loads((store.stage_dir("evaluate") / "report.json").read_text())["metrics"]
    for key in ("reward_gain", "win_rate", "kl", "human_accuracy"):
        assert parent.data.metrics[key] == pytest.approx(report[key]), key

    # Lineage: the registered version comes from the train run's logged model; evaluate's
    # metrics are linked to that model.
    train_run = stage_runs["train"]
    name = cfg.promote.registered_model
    version = client.get_model_version(name, "1")
    assert version.run_id == train_run.info.run_id
    model_id = store.complete_manifest("train")["mlflow_model_id"]
    assert version.source == f"models:/{model_id}"
    model = client.get_logged_model(model_id)
    assert model.source_run_id == train_run.info.run_id
    # (MLflow tags the logged model with its versions: the UI's "Registered" link)
    linked_versions = json.loads(model.tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked_versions] == [(name, "1")]
    linked = {m.key for m in model.metrics or []}
    assert {"reward_mean", "win_rate"} <= linked
    assert {a.path for a in client.list_artifacts(train_run.info.run_id)} >= {
        "metrics.jsonl",
        "config.yaml",
        "ds_config.json",
    }
    assert "samples.json" in {
        a.path for a in client.list_artifacts(stage_runs["evaluate"].info.run_id)
    }

    # Datasets: prepare's prompts and pairs, score's input and pairs, with digests.
    def inputs(run: Any) -> dict[str, str]:
        found = client.get_run(run.info.run_id).inputs.dataset_inputs
        return {d.dataset.name: d.dataset.digest for d in found}

    assert {"prompts/train", "prompts/eval", "prompts/test", "human_pairs"} <= set(
        inputs(stage_runs["prepare"])
    )
    assert {"samples", "pairs"} <= set(inputs(stage_runs["score"]))
    assert all(inputs(stage_runs["score"]).values())


def _argv(cfg: RunConfig) -> list[str]:
    return command_line(
        cfg, f"tracking.uri={cfg.tracking.uri}", f"tracking.experiment={cfg.tracking.experiment}"
    )


def test_stage_run_starts_when_the_stage_began(
    tiny_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run opened when the stage has something to log still starts at the stage's start."""
    monkeypatch.delenv("MIDPO_STARTED", raising=False)
    cfg = tiny_config()
    tracking.mark_started("score")
    began = json.loads(os.environ["MIDPO_STARTED"])["score"]
    with tracking.stage_run(cfg, "score") as run:
        pass
    import mlflow

    assert mlflow.get_run(run.info.run_id).info.start_time == int(began * 1000)


def test_a_failed_round_fails_every_run_it_nests_under(tiny_config: ConfigFactory) -> None:
    """An iterate round's (or a study point's) stage fails: the chain stops, so the round's
    run and the pipeline run above it are FAILED, not left RUNNING."""
    from pipeline.config import derive_config
    from stages.chain import run_stages

    cfg = tiny_config()
    client = tracking.setup(cfg).MlflowClient()
    main = tracking.parent_run_id(cfg)
    round_cfg = derive_config(cfg, f"{cfg.name}-round1", {})
    round_run = tracking.child_run_id(cfg, round_cfg, "round-1", {"midpo.role": "round"})
    other = tiny_config("name=unrelated")
    unrelated = tracking.parent_run_id(other)
    with pytest.raises(Exception, match="score"):  # train before score: refused
        run_stages(round_cfg, ["train"])
    for run_id in (round_run, main):
        assert client.get_run(run_id).info.status == "FAILED", run_id
    assert client.get_run(unrelated).info.status != "FAILED"


# -- a run store moved to another folder ---------------------------------------------------------
def test_a_moved_run_store_finds_its_artifacts_and_models(
    tiny_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sqlite store records absolute artifact locations: after `runs/` moves, the next
    stage (tracking.setup) repoints them, so artifacts download and registered versions load
    from the new place. A store that did not move is left byte for byte."""
    import hashlib
    import shutil

    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # the cheapest real model to register
        def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[str]:
            return model_input

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = tiny_config(f"root={a}")
    mlflow = tracking.setup(cfg)
    parent = tracking.parent_run_id(cfg)
    with mlflow.start_run() as run:
        mlflow.log_text("kept", "notes/kept.txt")
        info = mlflow.pyfunc.log_model(
            name="echo", python_model=Echo(), pip_requirements=[], registered_model_name="echo"
        )
    digest = hashlib.sha256((a / "mlflow.db").read_bytes()).hexdigest()
    assert tracking.relocate_store(a / "mlflow.db", tracking.artifact_root(cfg)) == 0
    assert hashlib.sha256((a / "mlflow.db").read_bytes()).hexdigest() == digest
    capsys.readouterr()

    shutil.move(a, b)
    moved = tiny_config(f"root={b}")
    mlflow = tracking.setup(moved)
    err = capsys.readouterr().err
    assert f"[mlflow] run store moved from {a / 'mlartifacts'}: " in err, err
    # the experiment, the parent run, the run, the logged model, the version's storage location
    assert f": 5 locations now point at {b / 'mlartifacts'}\n" in err, err

    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith(
        tracking.artifact_root(moved) + "/"
    )
    kept = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="notes/kept.txt", dst_path=str(tmp_path / "dl")
    )
    assert Path(kept).read_text() == "kept"
    logged = client.get_logged_model(info.model_id)
    assert logged.artifact_location.startswith(tracking.artifact_root(moved) + "/")
    model = mlflow.pyfunc.load_model("models:/echo/1")
    assert list(model.predict(["hi"])) == ["hi"]
    assert tracking.relocate_store(b / "mlflow.db", tracking.artifact_root(moved)) == 0
    # the chain goes on in the same parent run, its file now naming the store it is in
    assert tracking.parent_run_id(moved) == parent
    kept_file = json.loads((moved.run_dir / tracking.PARENT_FILE).read_text())
    assert kept_file["tracking_uri"] == tracking.tracking_uri(moved)
    assert not a.exists()  # nothing was written at the old place
