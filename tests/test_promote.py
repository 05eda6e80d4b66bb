"""promote: real MLflow registry (sqlite, and a loopback `mlflow server`), gate, aliases, races.

Most tests give promote hand-made upstream outputs (a real tiny model folder as the "trained"
policy, an evaluation report with chosen metrics) so each gate case is exact; the full tiny
pipeline test (prepare -> ... -> promote, real upstream) is in test_pipeline_tiny below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import registry, tracking
from pipeline.config import GateConfig, RunConfig
from pipeline.distributed import free_port
from pipeline.models import make_tiny_model
from pipeline.runstore import RunStore, StageError, atomic_write_json
from tests.conftest import REPO, ConfigFactory, MlflowServer, command_line, run_stage

TEXTS = [
    "a fine film with a warm heart",
    "dull, slow and far too long",
    "the cast is superb",
    "i wanted my money back",
    "funny, moving and bright",
    "a tired plot and flat jokes",
] * 8


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three distinct tiny model folders standing in for trained policies."""
    root = tmp_path_factory.mktemp("policies")
    return [make_tiny_model(root / f"seed{s}", TEXTS, seed=s) for s in range(3)]


def fake_upstream(
    cfg: RunConfig,
    model: Path,
    reward: float,
    kl: float = 0.5,
    human_accuracy: float = 0.6,
    baseline_reward: float = 0.0,
) -> None:
    """train/ (the model folder) and evaluate/ (a report) outputs as those stages write them."""
    store = RunStore(cfg)
    with store.stage("train", force=True) as st:
        shutil.copytree(model, st.dir / "model")
        (st.dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
        st.record(objective=cfg.train.objective, mlflow_run_id="")
    with store.stage("evaluate", inputs=["train"], force=True) as st:
        atomic_write_json(
            st.dir / "report.json",
            {
                "metrics": {
                    "reward_mean": reward,
                    "kl": kl,
                    "human_accuracy": human_accuracy,
                    "baseline_reward_mean": baseline_reward,
                    "win_rate": 0.5,
                },
                "baseline": {"kind": "reference", "version": None},
            },
        )


def client_for(cfg: RunConfig) -> Any:
    return tracking.setup(cfg).MlflowClient()


def versions(cfg: RunConfig) -> list[Any]:
    name = cfg.promote.registered_model
    return sorted(
        client_for(cfg).search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)
    )


def alias_version(cfg: RunConfig, alias: str) -> str | None:
    found = registry.Registry(client_for(cfg), cfg.promote.registered_model).by_alias(alias)
    return None if found is None else str(found.version)


def promotion(cfg: RunConfig) -> dict[str, Any]:
    import json

    return dict(json.loads((cfg.run_dir / "promote" / "promotion.json").read_text()))


# -- gate and aliases ---------------------------------------------------------------------------
def test_gate_passes_then_refuses_a_worse_model(
    tiny_config: ConfigFactory, policies: list[Path]
) -> None:
    good = tiny_config("name=good")
    fake_upstream(good, policies[0], reward=0.5)
    run_stage(good, "promote")
    first = promotion(good)
    assert (first["action"], first["gate"], first["version"]) == ("registered", "passed", "1")
    assert alias_version(good, "champion") == "1"

    worse = tiny_config("name=worse")
    fake_upstream(worse, policies[1], reward=0.3)
    run_stage(worse, "promote")
    second = promotion(worse)
    assert (second["action"], second["gate"], second["version"]) == ("registered", "failed", "2")
    assert second["decision"]["compared_to"].startswith("champion v1")
    assert any("reward_mean 0.3 < 0.5" in r for r in second["decision"]["reasons"])
    assert alias_version(worse, "champion") == "1"
    assert alias_version(worse, "challenger") == "2"

    v = {str(x.version): x.tags for x in versions(worse)}
    assert v["2"]["midpo.gate"] == "failed" and v["1"]["midpo.gate"] == "passed"
    assert float(v["1"]["midpo.metric.reward_mean"]) == 0.5
    for key in (
        "midpo.model_hash",
        "midpo.config_hash",
        "midpo.promote_run_id",
        "midpo.pipeline_run_id",
        "midpo.run",
    ):
        assert v["2"][key]

    # KL budget and human-accuracy floor are gate checks too.
    strict = tiny_config(
        "name=strict", "promote.gate.max_kl=0.1", "promote.gate.min_human_accuracy=0.9"
    )
    fake_upstream(strict, policies[2], reward=0.9, kl=0.5, human_accuracy=0.6)
    run_stage(strict, "promote")
    third = promotion(strict)
    assert third["gate"] == "failed"
    assert sorted(c["metric"] for c in third["decision"]["checks"] if not c["ok"]) == [
        "human_accuracy",
        "kl",
    ]
    assert alias_version(strict, "champion") == "1"


def test_rerun_is_a_no_op_and_champion_loads_back(
    tiny_config: ConfigFactory, policies: list[Path]
) -> None:
    import mlflow
    import pandas as pd

    cfg = tiny_config("name=once")
    fake_upstream(cfg, policies[0], reward=0.5)
    run_stage(cfg, "promote")
    run_stage(cfg, "promote")  # up to date: skipped by the run store
    run_stage(cfg, "promote", force=True)  # forced: the registry already holds this model
    assert promotion(cfg)["action"] == "unchanged"
    # Same model from another run: still no new version.
    again = tiny_config("name=same-model")
    fake_upstream(again, policies[0], reward=0.7)
    run_stage(again, "promote")
    assert promotion(again)["action"] == "unchanged"
    assert [str(v.version) for v in versions(cfg)] == ["1"]

    tracking.setup(cfg)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.promote.registered_model}@champion")
    out = model.predict(
        pd.DataFrame({"prompt": ["a film about", "the best"]}), params={"max_new_tokens": 4}
    )
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_foreign_registered_model_is_refused(
    tiny_config: ConfigFactory, policies: list[Path]
) -> None:
    cfg = tiny_config("name=foreign", "promote.registered_model=someone-elses")
    client_for(cfg).create_registered_model("someone-elses")
    fake_upstream(cfg, policies[0], reward=0.5)
    with pytest.raises(StageError, match="not made by midpo.*allow_foreign_versions"):
        run_stage(cfg, "promote")
    assert versions(cfg) == []
    allowed = tiny_config(
        "name=foreign",
        "promote.registered_model=someone-elses",
        "promote.allow_foreign_versions=true",
    )
    run_stage(allowed, "promote")
    assert promotion(allowed)["gate"] == "passed"


def test_missing_or_stale_upstream(tiny_config: ConfigFactory, policies: list[Path]) -> None:
    cfg = tiny_config("name=missing")
    with pytest.raises(StageError, match="stage 'train' has no complete output.*make train"):
        run_stage(cfg, "promote")
    fake_upstream(cfg, policies[0], reward=0.5)
    store = RunStore(cfg)
    with store.stage("train", force=True) as st:  # retrained after the evaluation
        shutil.copytree(policies[1], st.dir / "model")
    with pytest.raises(StageError, match="older trained model.*make evaluate"):
        run_stage(cfg, "promote")


def test_gate_decision_is_pure() -> None:
    gate = GateConfig(min_reward_gain=0.1, max_kl=2.0)
    ok = registry.gate_decision({"reward_mean": 0.6, "kl": 1.0}, 0.5, "x", gate)
    assert ok.passed and ok.reasons == []
    low = registry.gate_decision({"reward_mean": 0.55, "kl": 1.0}, 0.5, "x", gate)
    assert not low.passed and low.reasons == ["reward_mean 0.55 < 0.6"]
    missing = registry.gate_decision({"reward_mean": 0.9}, None, "x", gate)
    assert not missing.passed and missing.reasons == ["kl is missing from the evaluation report"]


# -- concurrency --------------------------------------------------------------------------------
def test_two_concurrent_promotions(tiny_config: ConfigFactory, policies: list[Path]) -> None:
    """Two promote processes at once: one champion, on the better model, and no lost version."""
    better, worse = tiny_config("name=race-better"), tiny_config("name=race-worse")
    fake_upstream(better, policies[0], reward=0.8)
    fake_upstream(worse, policies[1], reward=0.4)
    client_for(better)  # create the sqlite store first (table creation is not concurrent-safe)
    lock = registry.lock_path(
        tracking.tracking_uri(better), Path(better.root), better.promote.registered_model
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    # Hold the lock until both processes queue on it, then let them race for it.
    with registry.registry_lock(lock, 60):
        for cfg in (worse, better):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "stages.promote",
                        *command_line(cfg, f"name={cfg.name}"),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + 120
        waiting: set[int] = set()
        while len(waiting) < 2 and time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"promote exited early: {p.stdout.read() if p.stdout else ''}")
            waiting = {i for i, p in enumerate(procs) if _waits_on_lock(p)}
            time.sleep(0.2)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    all_versions = versions(better)
    assert len(all_versions) == 2
    champion = alias_version(better, "champion")
    assert champion is not None
    by_version = {str(v.version): v.tags for v in all_versions}
    assert float(by_version[champion]["midpo.metric.reward_mean"]) == 0.8


def _waits_on_lock(proc: subprocess.Popen[str]) -> bool:
    # The promoter prints this line (unbuffered) when it starts waiting; peek without blocking.
    import select

    assert proc.stdout is not None
    buf = getattr(proc, "_seen", "")
    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        buf += line
    proc._seen = buf  # type: ignore[attr-defined]
    return "waiting for the registry lock" in buf


# -- tracking server ----------------------------------------------------------------------------
def test_unreachable_server_fails_fast(
    tiny_config: ConfigFactory, policies: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from stages import promote

    cfg = tiny_config("name=offline")
    fake_upstream(cfg, policies[0], reward=0.5)
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        promote.main(command_line(cfg, "name=offline", f"tracking.uri={url}"))
    assert exit_info.value.code == 2
    assert f"MLflow tracking server {url} is unreachable" in capsys.readouterr().err
    assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `mlflow server` on loopback for this module (about 13 s to healthy)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait_healthy(90)
        yield server.url
    finally:
        server.stop()


def test_promote_against_a_tracking_server(
    tiny_config: ConfigFactory, policies: list[Path], mlflow_server: str
) -> None:
    """Server mode: registry, aliases and artifacts through a loopback `mlflow server`."""
    import mlflow
    import pandas as pd

    good = tiny_config("name=srv-good", f"tracking.uri={mlflow_server}")
    fake_upstream(good, policies[0], reward=0.5)
    run_stage(good, "promote")
    run_stage(good, "promote", force=True)
    assert promotion(good)["action"] == "unchanged"
    assert alias_version(good, "champion") == "1" and len(versions(good)) == 1
    tracking.setup(good)
    model = mlflow.pyfunc.load_model(f"models:/{good.promote.registered_model}@champion")
    out = model.predict(pd.DataFrame({"prompt": ["hello"]}), params={"max_new_tokens": 3})
    assert len(out) == 1


def test_promotion_killed_before_the_gate_is_finished(
    tiny_config: ConfigFactory, policies: list[Path]
) -> None:
    """A version registered without its gate (killed mid-promotion) is gated on the rerun."""
    import mlflow

    cfg = tiny_config("name=interrupted")
    fake_upstream(cfg, policies[0], reward=0.5)
    model_hash = registry.model_folder_hash(RunStore(cfg).require("train"))
    client = client_for(cfg)
    registry.Registry(client, cfg.promote.registered_model).ensure()
    with mlflow.start_run():
        info = registry.log_policy_model(cfg.run_dir / "train" / "model")
    client.create_model_version(
        cfg.promote.registered_model,
        source=info.model_uri,
        tags={registry.TAG_MODEL_HASH: model_hash},
    )
    run_stage(cfg, "promote")
    record = promotion(cfg)
    assert (record["action"], record["version"], record["gate"]) == ("completed", "1", "passed")
    assert alias_version(cfg, "champion") == "1" and len(versions(cfg)) == 1


def test_promotion_killed_after_its_gate_is_finished_and_never_reported_falsely(
    tiny_config: ConfigFactory, policies: list[Path]
) -> None:
    """Killed after the version was tagged gate=passed, before the alias moved: the rerun sets
    the alias. A registry that no longer holds what promotion.json says is promoted again,
    never reported up to date."""
    import mlflow

    cfg = tiny_config("name=killed-late")
    fake_upstream(cfg, policies[0], reward=0.5)
    model_hash = registry.model_folder_hash(RunStore(cfg).require("train"))
    client = client_for(cfg)
    name = cfg.promote.registered_model
    registry.Registry(client, name).ensure()
    with mlflow.start_run():
        info = registry.log_policy_model(cfg.run_dir / "train" / "model")
    client.create_model_version(
        name,
        source=info.model_uri,
        tags={registry.TAG_MODEL_HASH: model_hash, registry.TAG_GATE: "passed"},
    )
    assert alias_version(cfg, "champion") is None
    run_stage(cfg, "promote")
    record = promotion(cfg)
    assert (record["action"], record["version"], record["gate"]) == ("completed", "1", "passed")
    assert alias_version(cfg, "champion") == "1"

    client.delete_model_version(name, "1")  # the registry no longer agrees with promotion.json
    run_stage(cfg, "promote")  # not forced
    record = promotion(cfg)
    assert (record["action"], record["version"]) == ("registered", "2")
    assert alias_version(cfg, "champion") == "2"


def test_credentials_in_the_tracking_uri_are_never_written(
    tiny_config: ConfigFactory,
    policies: list[Path],
    mlflow_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    secret = "s3cret-pw"
    uri = mlflow_server.replace("http://", f"http://midpo:{secret}@")
    cfg = tiny_config("name=srv-secret", f"tracking.uri={uri}")
    fake_upstream(cfg, policies[0], reward=0.5)
    run_stage(cfg, "promote")
    record = promotion(cfg)
    assert record["tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    written = {
        "mlflow_parent.json": (cfg.run_dir / "mlflow_parent.json").read_text(),
        "promotion.json": (cfg.run_dir / "promote" / "promotion.json").read_text(),
        "manifest": (cfg.run_dir / "promote" / "manifest.json").read_text(),
    }
    client = client_for(cfg)
    artifact = client.download_artifacts(record["promote_run_id"], "promotion.json")
    written["promotion.json artifact"] = Path(artifact).read_text()
    params = client.get_run(record["promote_run_id"]).data.params
    parent = client.get_run(json.loads(written["mlflow_parent.json"])["run_id"]).data.params
    written["params"] = json.dumps({**params, **parent})
    out = capsys.readouterr()
    written["terminal"] = out.out + out.err
    for where, text in written.items():
        assert secret not in text, where
    assert parent["tracking.uri"] == record["tracking_uri"]


def test_transformers_flavour_when_asked(tiny_config: ConfigFactory, policies: list[Path]) -> None:
    import mlflow

    cfg = tiny_config("name=hf-flavour", "promote.log_transformers_flavour=true")
    fake_upstream(cfg, policies[1], reward=0.5)
    run_stage(cfg, "promote")
    uri = promotion(cfg)["transformers_model_uri"]
    tracking.setup(cfg)
    components = mlflow.transformers.load_model(uri, return_type="components")
    assert {"model", "tokenizer"} <= set(components)
    plain = tiny_config("name=no-hf-flavour")
    fake_upstream(plain, policies[2], reward=0.5)
    run_stage(plain, "promote")
    assert "transformers_model_uri" not in promotion(plain)
