"""train: MI-DPO on the score stage's pairs, on DeepSpeed, one process per device.

    python -m stages.train [--config FILE] [--force] [key=value ...]      (or make train)

Run plainly, it checks everything that can be checked up front (upstream output, data, the
DeepSpeed config against the run config, that no other process holds the devices), resolves
``train.*: auto`` for the hardware (ZeRO stage, checkpointing, attention, layout; one line on
stderr, recorded in the manifest and the MLflow params), then starts itself on every rank through
the DeepSpeed launcher (``pipeline.distributed`` documents NPROC, NNODES, NODE_RANK, MASTER_ADDR,
MASTER_PORT, HOSTFILE) and exits with the launcher's code. Each rank then trains; rank 0 owns
the run store, MLflow and the export. Killed and rerun, it resumes from the last checkpoint
(``--force`` starts over).

Outputs in runs/<run>/train/: model/ (Hugging Face folder), metrics.jsonl (one line per
optimizer step), export_check.json; the manifest records objective, steps, final loss, the
MLflow run id, ZeRO partitioning and truncation counts.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline import distributed, registry, training
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.runstore import RunStore, atomic_write_bytes, atomic_write_json

INPUTS = ["score"]


def launch(cfg: RunConfig, store: RunStore, force: bool) -> None:
    """Check, then start every rank of this node; exit with the launcher's code on failure."""
    if not force and store.up_to_date("train", INPUTS):
        store.report_skip("train")
        return
    plan = distributed.launch_plan(cfg.train.nproc)
    # bad input fails here, before any rank; so do devices another process holds
    checked = training.make_plan(cfg, store, plan.world_size, local_world_size=plan.nproc)
    training.check_devices_free(training.device_memory_readings())
    print(checked.launch.line, file=console)
    # The ranks read the validated config from a file (the stage may have been called in-process
    # by the pipeline, with overrides that are not on any command line).
    scratch = store.scratch_dir("train")
    config_file = scratch / f"launch-{plan.node_rank or 0}.yaml"
    atomic_write_bytes(config_file, yaml.safe_dump(cfg.model_dump(mode="json")).encode())
    args = ["--config", str(config_file)] + (["--force"] if force else [])
    code = distributed.launch("stages.train", args, plan)
    if code != 0:
        print(
            f"midpo train: error: training failed ({distributed.exit_reason(code)}); "
            "see the ranks' output",
            file=console,
        )
        raise SystemExit(code)
    if not plan.node_rank and store.complete_manifest("train") is not None:
        training.drop_resumable_checkpoints(scratch)  # the model is exported and checked


def train_rank(cfg: RunConfig, store: RunStore, force: bool) -> None:
    """One rank: join the group, train, and (rank 0) write the stage output and MLflow run."""
    from pipeline import tracking

    ranks = distributed.init_process_group(cfg.train.dist_timeout_minutes)
    clean = False
    try:
        with contextlib.ExitStack() as stack:
            st = (
                stack.enter_context(store.stage("train", inputs=INPUTS, force=force))
                if ranks.is_main
                else None
            )
            if distributed.broadcast_object(st.skipped if st is not None else None):
                clean = True
                return
            mlflow_run, log = None, None
            if st is not None:
                mlflow_run = stack.enter_context(
                    tracking.stage_run(
                        cfg,
                        "train",
                        params={
                            "train": cfg.train.model_dump(mode="json"),
                            "world_size": ranks.world_size,
                            "nodes": ranks.world_size // ranks.local_world_size,
                        },
                    )
                )
                log = _mlflow_logger()
            output_dir = st.dir / "model" if st is not None else None
            # rank 0 resolves the hardware choices (train.*: auto); every rank trains with them
            plan = None
            if ranks.is_main:
                plan = training.make_plan(
                    cfg, store, ranks.world_size, log=log, output_dir=output_dir,
                    local_world_size=ranks.local_world_size,
                )  # fmt: skip
            choice = distributed.broadcast_object(plan.launch if plan is not None else None)
            if plan is None:
                plan = training.make_plan(cfg, store, ranks.world_size, choice=choice)
            if mlflow_run is not None:
                import mlflow

                mlflow.log_params(
                    {f"train.launch.{k}": v for k, v in plan.launch.as_dict().items()}
                )
            if ranks.is_main:
                training.prepare_checkpoint_dir(plan.checkpoint_dir, fresh=force)
            distributed.barrier()
            trainer = training.Trainer(plan, ranks)
            trainer.build()
            partition = distributed.gather_objects(trainer.partition())
            result = trainer.fit()
            if st is not None:
                shutil.copyfile(result.metrics_path, st.dir / "metrics.jsonl")
                atomic_write_json(st.dir / "export_check.json", result.export_check)
                run_id = mlflow_run.info.run_id if mlflow_run is not None else None
                st.record(**training.summary(plan, result, partition, ranks, run_id))
                if mlflow_run is not None:
                    _log_train_outputs(st.dir, cfg, plan.ds_config)
                    # Logged here, so a registered version's source run is this train run.
                    model = registry.log_policy_model(st.dir / "model")
                    st.record(mlflow_model_id=model.model_id)
                print(
                    f"[train] {result.steps} steps, final loss {result.final_loss:.4f}, "
                    f"{result.tokens_per_s:.0f} tokens/s -> {st.final_dir / 'model'}",
                    file=console,
                )
        clean = True
    except training.TrainingError as e:
        if not ranks.is_main:  # every rank raises the same error; rank 0 reports it
            raise SystemExit(2) from e
        raise
    finally:
        distributed.teardown(clean)


def _log_train_outputs(out: Path, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    """The run config, the resolved DeepSpeed config and the per-step metrics file."""
    import mlflow

    from pipeline import tracking

    mlflow.log_artifact(str(out / "metrics.jsonl"))
    mlflow.log_dict(tracking.redacted(cfg.model_dump(mode="json")), "config.yaml")
    mlflow.log_dict(ds_config, "ds_config.json")


def _mlflow_logger() -> Any:
    import mlflow

    def log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k.replace(":", "_"): v for k, v in metrics.items()}, step=step)

    return log


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    if distributed.under_launcher():
        train_rank(cfg, store, force)
    else:
        launch(cfg, store, force)


def main(argv: list[str] | None = None) -> None:
    stage_main("train", run, argv)


if __name__ == "__main__":
    main()
