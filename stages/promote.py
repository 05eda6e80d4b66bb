"""promote: register the trained policy in the MLflow model registry behind a gate.

Registers the pyfunc model the train run logged (or, when that run's tracking store is not
this one, logs ``runs/<run>/train/model/`` now) as a new version of
``promote.registered_model`` tagged with the evaluation metrics, config hashes and run ids, and
moves the ``champion`` alias to it only if the gate passes (reward >= champion's +
``promote.gate.min_reward_gain``, KL <= ``max_kl``, human-pair accuracy >= ``min_human_accuracy``);
otherwise sets ``challenger`` and records why. Promoting a model the registry already holds is a
no-op; a promotion killed half-way is finished by the next run, which never reports success
while the registry disagrees with promotion.json. Output: ``runs/<run>/promote/promotion.json``
(the tracking URI without credentials). See ``pipeline/registry.py`` for the locking
guarantees.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import registry, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig, config_hash
from pipeline.console import console
from pipeline.runstore import RunStore, StageError, atomic_write_json, code_version


def _evaluation(store: RunStore, train_manifest: dict[str, Any]) -> dict[str, Any]:
    """The evaluation report, checked to be about the model train produced last."""
    eval_manifest = store.require("evaluate")
    if eval_manifest.get("input_hashes", {}).get("train") != train_manifest["output_hash"]:
        raise StageError(
            f"the evaluation in {store.stage_dir('evaluate')} is of an older trained model "
            "(train ran again since): run `make evaluate` first"
        )
    path = store.stage_dir("evaluate") / "report.json"
    try:
        report = json.loads(path.read_text())
        report["metrics"]["reward_mean"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StageError(
            f"{path}: unreadable evaluation report ({e}); run `make evaluate` again with FORCE=1"
        ) from None
    report["_manifest"] = eval_manifest
    return dict(report)


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    train_manifest = store.require("train")
    report = _evaluation(store, train_manifest)
    model_dir = store.stage_dir("train") / "model"
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir} has no config.json: run `make train` again")
    model_hash = registry.model_folder_hash(train_manifest)
    # Never "unchanged" while the registry disagrees with promotion.json (a promotion killed
    # after its output was written, a version deleted since): promote again.
    force = force or not _registry_agrees(cfg, store)

    with store.stage("promote", inputs=["train", "evaluate"], force=force) as st:
        if st.skipped:
            return
        p = cfg.promote
        metrics = {k: v for k, v in report["metrics"].items() if isinstance(v, int | float)}
        baseline = {
            "kind": report.get("baseline", {}).get("kind", "reference"),
            "version": report.get("baseline", {}).get("version"),
            "reward_mean": report["metrics"].get("baseline_reward_mean"),
        }
        mlflow = tracking.setup(cfg)
        uri = tracking.tracking_uri(cfg)
        with tracking.stage_run(cfg, "promote", params={"promote": p.model_dump(mode="json")}) as r:
            tags = {
                "midpo.run": cfg.name,
                "midpo.config_hash": config_hash(cfg.model_dump(mode="json")),
                "midpo.train_config_hash": str(train_manifest.get("config_hash")),
                "midpo.objective": cfg.train.objective,
                "midpo.code_version": code_version(),
                "midpo.pipeline_run_id": tracking.parent_run_id(cfg),
                "midpo.promote_run_id": r.info.run_id,
                "midpo.train_run_id": str(train_manifest.get("mlflow_run_id", "")),
                "midpo.evaluate_run_id": str(report["_manifest"].get("mlflow_run_id", "")),
            }
            lock = registry.lock_path(uri, Path(cfg.root), p.registered_model)
            with registry.registry_lock(lock, p.lock_timeout_s):
                record = registry.promote(
                    registry.Registry(
                        mlflow.MlflowClient(), p.registered_model, p.allow_foreign_versions
                    ),
                    model_hash=model_hash,
                    metrics=metrics,
                    baseline=baseline,
                    tags=tags,
                    gate=p.gate,
                    log_model=lambda: (
                        _train_model(cfg, train_manifest) or registry.log_policy_model(model_dir)
                    ),
                )
            record.update(
                model_hash=model_hash,
                run=cfg.name,
                tracking_uri=tracking.redact_uri(uri),
                promote_run_id=r.info.run_id,
            )
            if p.log_transformers_flavour:
                record["transformers_model_uri"] = _log_transformers(mlflow, model_dir)
            mlflow.set_tags(
                {
                    "midpo.promote.action": record["action"],
                    "midpo.promote.version": record["version"],
                    "midpo.promote.gate": str(record.get("gate")),
                }
            )
            mlflow.log_dict(record, "promotion.json")
        atomic_write_json(st.dir / "promotion.json", record)
        st.record(
            action=record["action"],
            registered_model=p.registered_model,
            version=record["version"],
            gate=record.get("gate"),
            model_hash=model_hash,
        )
    print(_summary(record), file=console)


def _train_model(cfg: RunConfig, train_manifest: dict[str, Any]) -> Any | None:
    """The model the train run logged, to register as is (the version's source run is then the
    train run), or None when this tracking store has none (promote logs the folder then)."""
    model = tracking.train_model(cfg, train_manifest)
    if model is None:
        return None
    return SimpleNamespace(
        model_uri=f"models:/{model.model_id}", run_id=model.source_run_id, model_id=model.model_id
    )


def _log_transformers(mlflow: Any, model_dir: Path) -> str:
    """The policy as MLflow's transformers flavour too, in the promote run (loads with
    ``mlflow.transformers.load_model``); returns its model URI."""
    info = mlflow.transformers.log_model(
        transformers_model=str(model_dir),
        name="policy-transformers",
        task="text-generation",
        pip_requirements=registry.pip_requirements(),
    )
    return str(info.model_uri)


def _registry_agrees(cfg: RunConfig, store: RunStore) -> bool:
    """Whether the registry holds what the last promotion.json says (True when there is none)."""
    path = store.stage_dir("promote") / "promotion.json"
    if store.complete_manifest("promote") is None or not path.is_file():
        return True
    record = json.loads(path.read_text())
    client = tracking.setup(cfg).MlflowClient()
    name = str(record.get("registered_model", cfg.promote.registered_model))
    return registry.agrees_with(registry.Registry(client, name), record)


def _summary(record: dict[str, Any]) -> str:
    name, version = record["registered_model"], record["version"]
    if record["action"] == "unchanged":
        return f"[promote] {record['message']}"
    decision = record["decision"]
    if record["gate"] == "passed":
        return (
            f"[promote] {name} v{version} is now 'champion' (gate passed against "
            f"{decision['compared_to']}); load it with models:/{name}@champion"
        )
    return (
        f"[promote] {name} v{version} set as 'challenger': gate failed against "
        f"{decision['compared_to']}: {'; '.join(decision['reasons'])}"
    )


def main(argv: list[str] | None = None) -> None:
    stage_main("promote", run, argv)


if __name__ == "__main__":
    main()
