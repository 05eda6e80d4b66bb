"""The MLflow UI over a run store, on 127.0.0.1 only.

    python -m stages.mlflow_ui [--port 5000] [--backend-store-uri URI]      (or make mlflow-ui)

A sqlite store with its artifacts beside it (``runs/mlflow.db`` and ``runs/mlartifacts/``) that
was moved or copied from another folder or machine is first repointed at the artifacts where
they are now (``tracking.relocate_store``); then this process becomes ``mlflow ui``. Any other
store (a server, a sqlite file without ``mlartifacts/`` beside it) is served as it is.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from pipeline import tracking

DEFAULT_STORE = Path("runs") / "mlflow.db"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.mlflow_ui", description=__doc__)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--backend-store-uri", default=f"sqlite:///{DEFAULT_STORE.resolve()}", metavar="URI"
    )
    args = parser.parse_args(argv)
    uri = args.backend_store_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        artifacts = db.parent / "mlartifacts"
        # Only our layout: a store shared by runs elsewhere keeps the locations they wrote.
        if db.is_file() and artifacts.is_dir():
            try:
                tracking.relocate_store(db, artifacts.resolve().as_uri())
            except sqlite3.Error as e:  # not a database, locked for a minute, read-only
                sys.exit(f"mlflow-ui: error: cannot repoint {db} at {artifacts}: {e}")
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(args.port)]
    os.execv(mlflow, [*command, "--backend-store-uri", uri])


if __name__ == "__main__":
    main()
