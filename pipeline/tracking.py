"""MLflow tracking: one parent run per pipeline run, one nested child run per stage, rank 0 only.

The parent run id is kept in the run store (``runs/<run>/mlflow_parent.json``) so every stage,
process and rank of a run reports under the same parent. The embedded default is a sqlite
store and a local artifact root under the run root: nothing to start, nothing on the network.

Runs span their work: entry points call ``mark_started`` when a stage or chain begins, and a
run opened later (when the stage has something to log) starts at that time. The parent run
carries the resolved config as params and the headline results as metrics. Credentials never
reach a file or a log: URIs pass through ``redact_uri``, params through ``redact``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.runstore import atomic_write_json

PARENT_FILE = "mlflow_parent.json"
# Opens the experiment in the MLflow UI's model-training view (not the GenAI one).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# When each stage or chain of this process began: {name: epoch seconds}. In the environment so
# the ranks a launcher starts inherit their stage's start.
_STARTED_ENV = "MIDPO_STARTED"


class TrackingError(RuntimeError):
    pass


# -- secrets -------------------------------------------------------------------------------------
_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|secret|password|passwd|credentials?|api[_\-]?key|private[_\-]?key|"
    r"sig|signature|auth)$|(secret|password|passwd|credential|api[_\-]?key)",
    re.IGNORECASE,
)


def secret_key(key: str) -> bool:
    """A key naming a secret: ``hf_token``, ``password``, ``api_key``; not ``max_tokens`` or
    ``token_chunk_size`` (only the last dotted part counts)."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: user info becomes ``***@``, secret query values ``***``."""
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme or not (parsed.netloc or parsed.query):
        return uri
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if secret_key(k) else part
        for part in parsed.query.split("&")
        if part
        for k in [urllib.parse.unquote_plus(part.split("=", 1)[0])]
    )
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc, query=query))


def redact(key: str, value: Any) -> str:
    """Never log secrets as params: secret-looking keys and credentials inside URIs are masked."""
    if secret_key(key):
        return "***"
    return redact_uri(str(value))


# -- store and experiment ------------------------------------------------------------------------
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
        raise TrackingError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({e})"
        ) from None


_DISK_FULL = ("database or disk is full", "disk i/o error")


def _create_sqlite_store(db: Path) -> None:
    """Create and migrate a new sqlite store beside its path, then rename it into place: a
    process killed during MLflow's table migrations must not leave a half-migrated database
    that fails every later stage ("table _alembic_tmp_... already exists"). A full disk is an
    OSError naming the database (one line at the command line), not SQLAlchemy's traceback."""
    if db.exists():
        return
    import mlflow

    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        if not db.exists():
            os.replace(tmp, db)
    except Exception as e:
        if isinstance(e, OSError) or not any(s in str(e).lower() for s in _DISK_FULL):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(db)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _uri_path(uri: str) -> str:
    """A ``file:`` URI as the path it names (for messages)."""
    parsed = urllib.parse.urlsplit(uri)
    return urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri


def relocate_store(db: Path, artifact_root_uri: str) -> int:
    """Repoint a moved or copied sqlite store at its new artifact root; return how many stored
    values changed (0 when nothing moved).

    The store records absolute ``file:`` URIs (experiments' artifact locations, runs' artifact
    URIs, logged models', model versions' sources and storage locations), so a run store moved
    to another folder or machine would look for its artifacts, and log new ones, at the old
    path. The root it was written with is read from our experiments, whose artifact location is
    ``<root>/<experiment name>`` with the root ending in ``/mlartifacts``. Every text value of
    every table that starts with an old root is rewritten (a generic prefix match, so columns a
    newer MLflow adds are covered too), in one transaction: on an error nothing changes.
    Callers pass only a sqlite store whose artifacts live at ``artifact_root_uri``."""
    new = artifact_root_uri.rstrip("/")
    if not db.is_file():
        return 0

    def old_roots(con: sqlite3.Connection) -> list[str]:
        # No experiments table: not (yet) an MLflow store; nothing to repoint.
        if not con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'"
        ).fetchone():
            return []
        roots = set()
        for name, location in con.execute("SELECT name, artifact_location FROM experiments"):
            suffix = "/" + str(name)
            if isinstance(location, str) and location.endswith(suffix):
                root = location[: -len(suffix)]
                if root.startswith("file:") and root.endswith("/mlartifacts") and root != new:
                    roots.add(root)
        return sorted(roots)

    con = sqlite3.connect(db, timeout=60, isolation_level=None)  # transactions by hand
    try:
        if not old_roots(con):  # the common case, read-only: nothing moved
            return 0
        # Read again under the write lock: a concurrent stage may have relocated meanwhile.
        con.execute("BEGIN IMMEDIATE")
        try:
            roots = old_roots(con)
            changed = 0
            tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
            for (table,) in con.execute(tables).fetchall():
                for column in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')]:
                    for old in roots:
                        # substr, not LIKE: LIKE is case-insensitive and treats _ and % as
                        # wildcards.
                        changed += con.execute(
                            f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                            f'WHERE typeof("{column}") = \'text\' AND ("{column}" = ? OR '
                            f'substr("{column}", 1, ?) = ?)',
                            (new, len(old) + 1, old, len(old) + 1, old + "/"),
                        ).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    if not changed:
        return 0
    olds = ", ".join(_uri_path(r) for r in roots)
    print(
        f"[mlflow] run store moved from {olds}: {changed} locations now point at {_uri_path(new)}",
        file=console,
    )
    return changed


def setup(cfg: RunConfig) -> Any:
    """Point mlflow at the run's tracking store and experiment; return the mlflow module."""
    import mlflow

    uri = tracking_uri(cfg)
    _check_reachable(uri)
    # A server that accepts connections but fails requests: MLflow's defaults (7 retries with
    # exponential backoff, 120 s each) wait many minutes before giving up; give up sooner.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    if redact_uri(uri) != uri:  # MLflow prints "View run at: <uri>", credentials and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        _create_sqlite_store(db)
        # The run's own store (beside its artifacts): if the run root was moved or copied,
        # point it at the artifacts where they are now, before anything is read or logged.
        if db.resolve() == (Path(cfg.root) / "mlflow.db").resolve():
            relocate_store(db, artifact_root(cfg))
    # mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ: keep the
    # environment as the user set it, or the next run in this process (another config, a test)
    # and every subprocess it starts would resolve this run's store instead of their own.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = artifact_root(cfg) + "/" + cfg.tracking.experiment
        with contextlib.suppress(Exception):  # a concurrent stage may have created it
            client.create_experiment(
                cfg.tracking.experiment, artifact_location=location, tags=EXPERIMENT_KIND
            )
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
    elif not set(EXPERIMENT_KIND) & set(exp.tags or {}):  # made before the tag; a user's stays
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


# -- when things started -------------------------------------------------------------------------
def _marks() -> dict[str, float]:
    try:
        return dict(json.loads(os.environ.get(_STARTED_ENV, "{}")))
    except ValueError:
        return {}


def mark_started(name: str) -> None:
    """Record that stage or chain ``name`` begins now (its MLflow run will start here). A rank
    process keeps the start its launcher recorded."""
    marks = _marks()
    if name in marks and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return
    os.environ[_STARTED_ENV] = json.dumps({**marks, name: time.time()})


def _started_ms(name: str | None = None) -> int:
    """When stage ``name`` began, in ms (its mark is used once: a later run of the same stage
    in this process marks again), or with None the earliest mark (the chain's); else now."""
    marks = _marks()
    started = marks.pop(name, None) if name else min(marks.values(), default=None)
    os.environ[_STARTED_ENV] = json.dumps(marks)
    return int(1000 * (started if started is not None else time.time()))


# -- runs ----------------------------------------------------------------------------------------
def _known_run(client: Any, path: Path, uri: str, experiment: Any) -> str | None:
    """The run id kept in ``path`` if it is in this store and experiment and still exists.

    Run ids are UUIDs: one found in this store is that run, whatever URI the file recorded (a
    run store moved or copied elsewhere keeps its parent and child runs); the file is then
    updated to the store it is in now."""
    if not path.is_file():
        return None
    known = json.loads(path.read_text())
    try:
        run = client.get_run(known["run_id"])
    except Exception:
        return None  # deleted or another store: make a new one
    if run.info.experiment_id != experiment.experiment_id:
        # tracking.experiment changed for an existing run: a clean new run in the new
        # experiment; the old one stays in its own.
        print(
            f"[tracking] tracking.experiment is now {experiment.name!r}: run {known['run_id']} "
            f"stays in {known.get('experiment', 'the previous experiment')!r}; starting a new one",
            file=console,
        )
        return None
    if known.get("tracking_uri") != redact_uri(uri):
        atomic_write_json(path, {**known, "tracking_uri": redact_uri(uri)})
    return str(known["run_id"])


def _keep_run_id(path: Path, run_id: str, cfg: RunConfig) -> None:
    atomic_write_json(
        path,
        {
            "run_id": run_id,
            "tracking_uri": redact_uri(tracking_uri(cfg)),
            "experiment": cfg.tracking.experiment,
        },
    )


def _log_config(client: Any, run_id: str, cfg: RunConfig) -> None:
    """The resolved config as params (flattened keys), secrets masked."""
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=params[i : i + 100])


def parent_run_id(cfg: RunConfig) -> str:
    """The pipeline's parent run id, created on first use (starting when the chain or stage
    began, with the config as params) and kept in the run store."""
    mlflow = setup(cfg)
    client = mlflow.MlflowClient()
    path = cfg.run_dir / PARENT_FILE
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    known = _known_run(client, path, tracking_uri(cfg), exp)
    if known is not None:
        return known
    run = client.create_run(
        exp.experiment_id,
        run_name=cfg.name,
        start_time=_started_ms(),
        tags={"midpo.run": cfg.name, "midpo.role": "pipeline"},
    )
    _log_config(client, run.info.run_id, cfg)
    _keep_run_id(path, run.info.run_id, cfg)
    return str(run.info.run_id)


def child_run_id(cfg: RunConfig, child: RunConfig, run_name: str, tags: dict[str, str]) -> str:
    """An MLflow run under ``cfg``'s pipeline run that becomes ``child``'s parent run: the
    child's stage runs nest under it (an iterate round, a frontier or study point). Kept in the
    child's run store, so a resumed parent finds the same child run again."""
    mlflow = setup(cfg)
    parent = parent_run_id(cfg)
    path = child.run_dir / PARENT_FILE
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    known = _known_run(client, path, tracking_uri(cfg), experiment)
    if known is not None and client.get_run(known).data.tags.get("mlflow.parentRunId") == parent:
        return known
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={"mlflow.parentRunId": parent, "midpo.run": cfg.name, **tags},
    )
    _log_config(client, run.info.run_id, child)
    _keep_run_id(path, run.info.run_id, cfg)
    return str(run.info.run_id)


@contextlib.contextmanager
def stage_run(cfg: RunConfig, stage: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """A nested MLflow run for one stage under the pipeline's parent run (call on rank 0 only).
    It starts when the stage began (``mark_started``), so its duration is the stage's."""
    mlflow = setup(cfg)
    parent = parent_run_id(cfg)
    client = mlflow.MlflowClient()
    system_metrics = cfg.tracking.system_metrics
    with mlflow.start_run(run_id=parent, log_system_metrics=False):
        created = client.create_run(
            mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id,
            run_name=stage,
            start_time=_started_ms(stage),
            tags={"mlflow.parentRunId": parent, "midpo.run": cfg.name, "midpo.stage": stage},
        )
        with mlflow.start_run(
            run_id=created.info.run_id, nested=True, log_system_metrics=system_metrics
        ) as run:
            if params:
                mlflow.log_params(_flatten(params))
            yield run


def fail_parent(cfg: RunConfig) -> None:
    """Mark the pipeline's parent run FAILED (a chain stopped on an error), if it exists, and
    the runs it nests under: an iterate round's, a frontier or study point's failure stops the
    whole chain, whose own run then failed too."""
    path = cfg.run_dir / PARENT_FILE
    if not path.is_file():
        return
    with contextlib.suppress(Exception):  # the original error matters more than this one
        client = setup(cfg).MlflowClient()
        run_id: str | None = json.loads(path.read_text())["run_id"]
        while run_id:
            client.set_terminated(run_id, "FAILED")
            run_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")


def log_parent_metrics(cfg: RunConfig, metrics: dict[str, float]) -> None:
    """Headline results on the pipeline's parent run (the experiment table's columns)."""
    from mlflow.entities import Metric

    mlflow = setup(cfg)
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        parent_run_id(cfg), metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
    )


def train_model(cfg: RunConfig, train_manifest: dict[str, Any]) -> Any | None:
    """The model train logged in its run (an MLflow LoggedModel), or None when train logged
    none in this tracking store (another store, deleted, or an older run)."""
    model_id = train_manifest.get("mlflow_model_id")
    if not model_id:
        return None
    try:
        return setup(cfg).MlflowClient().get_logged_model(model_id)
    except Exception:
        return None


def redacted(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree fit to log: secret values masked, credentials out of URIs."""
    return {
        k: redacted(v) if isinstance(v, dict) else redact(k, v) if isinstance(v, str) else v
        for k, v in tree.items()
    }


def log_dataset(path: Path, name: str, context: str) -> None:
    """A parquet file as an MLflow dataset input of the active run (name, source, digest)."""
    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    frame = pd.read_parquet(path)
    # Digests hash the rows; list columns (token ids) are not hashable: keep the text columns.
    frame = frame[[c for c in frame.columns if frame[c].map(_hashable).all()]]
    with warnings.catch_warnings():
        # MLflow's own noise: a local path "can be interpreted in multiple ways" (two equal
        # sources), and its digest code calls a pandas API pandas 4 changes.
        warnings.simplefilter("ignore")
        dataset = from_pandas(frame, source=str(path), name=name)
    mlflow.log_input(dataset, context=context)


def _hashable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = redact(key, v)[:500]
    return out
