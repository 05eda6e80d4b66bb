"""study: every objective on the same model, data and budget, offline and online (issue 17).

    python -m stages.study [--config configs/study.yaml] [--points "dpo simpo learnable"]
                           [--report] [--force] [key=value ...]         (or make study)

Two tracks (``study.tracks``), each a base run that runs its shared stages once and one point
run per objective and seed (an MLflow child of the study's run), started from copies of the
base run's outputs (``pipeline.frontier.share_outputs``; score only where it scores alike):

- offline: base run ``<name>`` (data.task=vader-preference) runs prepare and score (reference
  log-probs of the training pairs); each point ``<name>-off-<objective>-s<seed>`` runs train and
  a light evaluation on the held-out human pairs (no generation);
- online: base run ``<name>-on`` (``study.online`` overrides: the controlled-sentiment task) runs
  prepare, generate and score; each point ``<name>-on-<objective>-s<seed>`` runs train and the
  evaluate stage.

Each point ends in ``<study.publish_dir>/<track>-<objective>-s<seed>.json``; a point whose file
matches its config is not run again, and every stage is skipped when up to date, so a killed
study resumes at the point it was on. Then the report ``<publish_dir>/../study.md`` and its
figures are regenerated from the point files alone (``--report`` does only that) and logged to
MLflow under the study's run. ``--points`` (or ``STUDY_POINTS``) picks objectives.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import study, tracking
from pipeline.cli import stage_main
from pipeline.config import RunConfig
from pipeline.console import console
from pipeline.frontier import share_outputs
from pipeline.runstore import RunStore
from stages.chain import run_stages

DEFAULT_CONFIG = "configs/study.yaml"


def run_point(
    cfg: RunConfig, base: RunConfig, point: study.Point, force: bool, command: str
) -> dict[str, Any]:
    """One point: its stages (skipped when up to date), its measurements, its file."""
    base_store = RunStore(base)
    model_dir = Path(base_store.require("prepare")["model_dir"])
    pcfg = study.point_config(cfg, base, point)
    store = RunStore(pcfg)
    share_outputs(base_store, store, study.SHARED_STAGES[point.track])
    tracking.child_run_id(
        cfg,
        pcfg,
        pcfg.name,
        {"midpo.role": "study-point", "midpo.objective": point.objective},
    )
    run_stages(pcfg, study.POINT_STAGES[point.track], force)
    extra: dict[str, Any] = {}
    started = time.time()
    reference_dir = Path(store.require("train").get("reference_model_dir") or model_dir)
    if point.track == "offline":
        metrics = study.offline_metrics(
            pcfg, store.stage_dir("prepare"), store.stage_dir("train") / "model", reference_dir
        )
        extra["heldout_seconds"] = time.time() - started
    else:
        evaluation = json.loads((store.stage_dir("evaluate") / "report.json").read_text())
        metrics = study.online_metrics(evaluation)
    spread = study.token_weight_spread(store.stage_dir("score") / "pairs.parquet")
    if spread is not None:
        extra["token_weights"] = spread
    own = {s: store.complete_manifest(s) for s in study.POINT_STAGES[point.track]}
    seconds = study.stage_seconds(own, pcfg.name)
    if point.track == "offline":
        seconds["heldout_evaluation"] = extra["heldout_seconds"]
    shared = {s: base_store.complete_manifest(s) for s in study.SHARED_STAGES[point.track]}
    record = study.point_record(
        point,
        pcfg,
        metrics=metrics,
        training=study.training_summary(store.stage_dir("train") / "metrics.jsonl"),
        seconds=seconds,
        shared_seconds=study.stage_seconds(shared, base.name),
        command=command,
        reference_dir=reference_dir,
        extra=extra,
    )
    tracking.log_parent_metrics(pcfg, study.flat_metrics(record))  # on the point's own run
    return record


def run_track(cfg: RunConfig, track: str, objectives: list[str], force: bool, command: str) -> None:
    base = study.track_config(cfg, track)
    folder = Path(cfg.study.publish_dir)
    todo = study.points(cfg.study, track, objectives)
    if base is not cfg:  # the online base run nests under the study's run too
        tracking.child_run_id(cfg, base, base.name, {"midpo.role": "study-track"})
    run_stages(base, study.SHARED_STAGES[track], force)
    for i, point in enumerate(todo, 1):
        pcfg = study.point_config(cfg, base, point)
        path = folder / f"{point.key}.json"
        if not force and study.finished(path, study.point_key(pcfg, track)):
            print(f"[study] {point.key}: done ({path}); skipping", file=console)
            continue
        print(f"\n=== study {track} point {i}/{len(todo)}: {pcfg.name} ===", file=console)
        started = time.time()
        record = run_point(cfg, base, point, force, command)
        study.write_point(folder, point, record)
        print(f"=== {pcfg.name}: {time.time() - started:.0f} s -> {path} ===", file=console)


def report(cfg: RunConfig, log: bool) -> None:
    """study.md and its figures from the point files; with ``log``, into MLflow as well."""
    folder = Path(cfg.study.publish_dir)
    records = study.load_points(folder)
    files = study.write_report(folder, records)
    print(
        f"\n[study] {len(records)} points -> {files[0]}\n" + study.table_text(records), file=console
    )
    if not log:
        return
    with tracking.stage_run(cfg, "study", params={"points": len(records)}):
        import mlflow

        for f in files:
            mlflow.log_artifact(str(f))
        for path in sorted(folder.glob("*.json")):
            mlflow.log_artifact(str(path), artifact_path="points")
        rows = [
            {"track": r["track"], "objective": r["objective"], "seed": r["seed"]}
            | study.flat_metrics(r)
            for r in records
        ]
        keys = sorted({k for r in rows for k in r})
        mlflow.log_table({k: [r.get(k) for r in rows] for k in keys}, "study_table.json")


def run(
    cfg: RunConfig,
    store: RunStore,
    force: bool = False,
    objectives: str | None = None,
    report_only: bool = False,
    command: str = "python -m stages.study",
) -> None:
    del store  # each track has its own base run
    if report_only:
        report(cfg, log=False)
        return
    chosen = study.select_objectives(cfg.study, objectives)
    for track in cfg.study.tracks:  # checked before anything runs
        study.track_config(cfg, track)
    started = time.time()
    for track in cfg.study.tracks:
        run_track(cfg, track, chosen, force, command)
    report(cfg, log=True)
    print(f"[study] done in {time.time() - started:.0f} s", file=console)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--points", default=os.environ.get("STUDY_POINTS"))
    pre.add_argument("--report", action="store_true")
    known, rest = pre.parse_known_args(args)
    has_config = any(a == "--config" or a.startswith("--config=") for a in rest)
    if not has_config and not os.environ.get("MIDPO_CONFIG"):
        rest = ["--config", DEFAULT_CONFIG, *rest]
    command = shlex.join(["python", "-m", "stages.study", *args])
    if known.points and "--points" not in args:
        command = f"STUDY_POINTS={shlex.quote(known.points)} {command}"
    stage_main(
        "study",
        lambda cfg, store, force: run(
            cfg, store, force, known.points, known.report, command=command
        ),
        rest,
    )


if __name__ == "__main__":
    main()
