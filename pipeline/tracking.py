"""MLflow tracking: one parent run per pipeline run, one nested child run per stage, rank 0 only.

The parent run id is kept in the run store (``runs/<run>/mlflow_parent.json``) so every stage,
process and rank of a run reports under the same parent. The embedded default is a sqlite
store and a local artifact root under the run root: nothing to start, nothing on the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.runstore import atomic_write_json

PARENT_FILE = "mlflow_parent.json"


class TrackingError(RuntimeError):
    pass


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(cfg.root) / 'mlflow.db').resolve()}"


def artifact_root(cfg: RunConfig) -> str:
    return (Path(cfg.root) / "mlartifacts").resolve().as_uri()


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (no retry loop, no hang) when an http tracking server is down."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout):
            pass
    except OSError as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e})") from None


def _create_sqlite_store(db: Path) -> None:
    """Create and migrate a new sqlite store beside its path, then rename it into place: a
    process killed during MLflow's table migrations must not leave a half-migrated database
    that fails every later stage ("table _alembic_tmp_... already exists")."""
    if db.exists():
        return
    import mlflow

    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        if not db.exists():
            os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def setup(cfg: RunConfig) -> Any:
    """Point mlflow at the run's tracking store and experiment; return the mlflow module."""
    import mlflow

    uri = tracking_uri(cfg)
    _check_reachable(uri)
    # A server that accepts connections but fails requests: MLflow's defaults (7 retries with
    # exponential backoff, 120 s each) wait many minutes before giving up; give up sooner.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        _create_sqlite_store(Path(uri[len("sqlite:///") :]))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = artifact_root(cfg) + "/" + cfg.tracking.experiment
        with contextlib.suppress(Exception):  # a concurrent stage may have created it
            client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def parent_run_id(cfg: RunConfig) -> str:
    """The pipeline's parent run id, created on first use and kept in the run store."""
    mlflow = setup(cfg)
    path = cfg.run_dir / PARENT_FILE
    uri = tracking_uri(cfg)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("tracking_uri") == uri:
            try:
                mlflow.MlflowClient().get_run(data["run_id"])
                return str(data["run_id"])
            except Exception:
                pass  # deleted or another store: make a new parent
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run = mlflow.MlflowClient().create_run(
        exp.experiment_id, run_name=cfg.name, tags={"midpo.run": cfg.name, "midpo.role": "pipeline"}
    )
    atomic_write_json(path, {"run_id": run.info.run_id, "tracking_uri": uri})
    return str(run.info.run_id)


def child_run_id(cfg: RunConfig, child: RunConfig, run_name: str, tags: dict[str, str]) -> str:
    """An MLflow run under ``cfg``'s pipeline run that becomes ``child``'s parent run: the
    child's stage runs nest under it (an iterate round, a frontier or study point). Kept in the
    child's run store, so a resumed parent finds the same child run again."""
    mlflow = setup(cfg)
    parent = parent_run_id(cfg)
    path = child.run_dir / PARENT_FILE
    client = mlflow.MlflowClient()
    if path.is_file():
        known = json.loads(path.read_text())
        with contextlib.suppress(Exception):  # deleted, or another store: make a new one
            if client.get_run(known["run_id"]).data.tags.get("mlflow.parentRunId") == parent:
                return str(known["run_id"])
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={"mlflow.parentRunId": parent, "midpo.run": cfg.name, **tags},
    )
    atomic_write_json(path, {"run_id": run.info.run_id, "tracking_uri": tracking_uri(cfg)})
    return str(run.info.run_id)


@contextlib.contextmanager
def stage_run(cfg: RunConfig, stage: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """A nested MLflow run for one stage under the pipeline's parent run (call on rank 0 only)."""
    mlflow = setup(cfg)
    parent = parent_run_id(cfg)
    with mlflow.start_run(run_id=parent, log_system_metrics=False):
        with mlflow.start_run(
            run_name=stage, nested=True, tags={"midpo.run": cfg.name, "midpo.stage": stage}
        ) as run:
            if params:
                mlflow.log_params(_flatten(params))
            yield run


_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")


def redact(key: str, value: Any) -> str:
    """Never log secrets as params: secret-looking keys and credentials inside URIs are masked."""
    text = str(value)
    if any(w in key.lower() for w in _SECRET_WORDS):
        return "***"
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme and parsed.password:
        text = text.replace(f":{parsed.password}@", ":***@")
    return text


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = redact(key, v)[:500]
    return out
