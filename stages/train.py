"""train: MI-DPO on the score stage's pairs, on DeepSpeed ZeRO-3, one process per device.

    python -m stages.train [--config FILE] [--force] [key=value ...]      (or make train)

Run plainly, it checks everything that can be checked up front (upstream output, data, the
DeepSpeed config against the run config), then starts itself on every rank through the
DeepSpeed launcher (``pipeline.distributed`` documents NPROC, NNODES, NODE_RANK, MASTER_ADDR,
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
import sys
from typing import Any

import yaml

from pipeline import distributed, training
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.runstore import RunStore, atomic_write_bytes, atomic_write_json


def up_to_date(store: RunStore) -> bool:
    """The same test ``store.stage`` makes, without opening the stage (no ranks started)."""
    current = store.complete_manifest("train")
    return (
        current is not None
        and current.get("config_hash") == store.expected_hash("train")
        and current.get("input_hashes") == {"score": store.require("score")["output_hash"]}
    )


def launch(cfg: RunConfig, store: RunStore, force: bool) -> None:
    """Check, then start every rank of this node; exit with the launcher's code on failure."""
    if not force and up_to_date(store):
        print(
            f"[train] up to date in {store.stage_dir('train')} (config and inputs unchanged); "
            "skipping. Use --force to rerun.",
            file=sys.stderr,
        )
        return
    plan = distributed.launch_plan(cfg.train.nproc)
    training.make_plan(cfg, store, plan.world_size)  # bad input fails here, before any rank
    # The ranks read the validated config from a file (the stage may have been called in-process
    # by the pipeline, with overrides that are not on any command line).
    scratch = store.scratch_dir("train")
    config_file = scratch / f"launch-{plan.node_rank or 0}.yaml"
    atomic_write_bytes(config_file, yaml.safe_dump(cfg.model_dump(mode="json")).encode())
    args = ["--config", str(config_file)] + (["--force"] if force else [])
    code = distributed.launch("stages.train", args, plan)
    if code != 0:
        print(
            f"midpo train: error: training failed ({_exit_reason(code)}); see above",
            file=sys.stderr,
        )
        raise SystemExit(code)


def _exit_reason(code: int) -> str:
    """The launcher's exit code in words: a rank killed by a signal shows as 256 - signal (the
    launcher exits with the rank's negative return code) or as 128 + signal (a shell)."""
    import signal

    for number in (256 - code, code - 128):
        if 0 < number < signal.NSIG and code > 128:
            try:
                name = signal.Signals(number).name
            except ValueError:  # a real-time signal: no name of its own
                name = f"signal {number}"
            hint = " (out of memory, or killed)" if name == "SIGKILL" else ""
            return f"a rank was killed by {name}{hint}; launcher exit code {code}"
    return f"launcher exit code {code}"


def train_rank(cfg: RunConfig, store: RunStore, force: bool) -> None:
    """One rank: join the group, train, and (rank 0) write the stage output and MLflow run."""
    from pipeline import tracking

    ranks = distributed.init_process_group(cfg.train.dist_timeout_minutes)
    clean = False
    try:
        with contextlib.ExitStack() as stack:
            st = (
                stack.enter_context(store.stage("train", inputs=["score"], force=force))
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
            plan = training.make_plan(
                cfg,
                store,
                ranks.world_size,
                log=log,
                output_dir=st.dir / "model" if st is not None else None,
            )
            if force and ranks.is_main:
                shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)
            if ranks.is_main:  # checkpoints of other configs or data can never be resumed
                for stale in plan.checkpoint_dir.parent.glob("ckpt-*"):
                    if stale != plan.checkpoint_dir:
                        shutil.rmtree(stale, ignore_errors=True)
                plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            trainer = training.Trainer(plan, ranks)
            trainer.build()
            partition = distributed.gather_objects(trainer.partition())
            result = trainer.fit()
            if st is not None:
                shutil.copyfile(result.metrics_path, st.dir / "metrics.jsonl")
                atomic_write_json(st.dir / "export_check.json", result.export_check)
                st.record(**_summary(cfg, plan, result, partition, ranks, mlflow_run))
                print(
                    f"[train] {result.steps} steps, final loss {result.final_loss:.4f}, "
                    f"{result.tokens_per_s:.0f} tokens/s -> {st.final_dir / 'model'}",
                    file=sys.stderr,
                )
        clean = True
    except training.TrainingError as e:
        if not ranks.is_main:  # every rank raises the same error; rank 0 reports it
            raise SystemExit(2) from e
        raise
    finally:
        distributed.teardown(clean)


def _mlflow_logger() -> Any:
    import mlflow

    def log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k.replace(":", "_"): v for k, v in metrics.items()}, step=step)

    return log


def _summary(
    cfg: RunConfig,
    plan: training.TrainPlan,
    result: training.TrainResult,
    partition: list[dict[str, Any]],
    ranks: distributed.Ranks,
    mlflow_run: Any,
) -> dict[str, Any]:
    return {
        "objective": cfg.train.objective,
        "objective_hparams": dict(getattr(plan.objective, "hparams", {})),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from,
        "mlflow_run_id": mlflow_run.info.run_id if mlflow_run is not None else None,
        "world_size": ranks.world_size,
        "nodes": ranks.world_size // ranks.local_world_size,
        "precision": cfg.train.precision,
        "reference": plan.reference_mode,
        "policy_init_dir": str(plan.policy_dir),
        "reference_model_dir": str(plan.reference_dir),
        "pairs": len(plan.data),
        "truncation": plan.data.report.as_dict(),
        "zero_partition": partition,
        "ds_config": plan.ds_config,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.seconds,
        "export_max_abs_diff": result.export_check.get("max_abs_diff"),
        "checkpoint_dir": str(plan.checkpoint_dir),
    }


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    if distributed.under_launcher():
        train_rank(cfg, store, force)
    else:
        launch(cfg, store, force)


def main(argv: list[str] | None = None) -> None:
    stage_main("train", run, argv)


if __name__ == "__main__":
    main()
