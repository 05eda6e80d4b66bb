"""frontier: reward against KL(pi || ref) for several objectives at several strengths.

    python -m stages.frontier [--config FILE] [--points "dpo:0.05,0.1,0.5 simpo:1,2.5"]
                              [--force] [key=value ...]                     (or make frontier)

The DPO paper's controlled-sentiment figure, across our objectives. The base run (``name``)
runs prepare, generate and score once; every point is a run ``<name>-<objective>-b<beta>`` (an MLflow
child of the base run) that starts from copies of those outputs (score only where the point
scores alike: token weights are the one part of scoring an objective changes), and runs train
and evaluate against the reference with ``train.objective`` and ``train.beta`` overridden. The
reference's own samples are sampled once (evaluate's shared sample cache). Every stage is
skipped when up to date, so a killed frontier resumes at the point it was on.

Outputs in runs/<name>/frontier/: frontier.png (all objectives in one figure), frontier.json
and frontier.csv (one row per point), logged to MLflow under the base run's parent run.
See docs/frontier.md for the budget and how to scale it on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.config import ConfigError, RunConfig, derive_config
from pipeline.console import console
from pipeline.frontier import parse_points, point_row, share_outputs, table_text, write_outputs
from pipeline.runstore import RunStore
from stages.chain import run_stages

# About an hour on a 2-core CPU with the demo config (docs/frontier.md): DPO, SimPO and
# entropy-controlled DPO, each at strengths on either side of its default.
DEFAULT_POINTS: dict[str, list[float]] = {
    "dpo": [0.05, 0.1, 0.5],
    "simpo": [1.0, 2.5],
    "centropy": [0.05, 0.5],
}
SHARED_STAGES = ("prepare", "generate", "score")
POINT_STAGES = ("score", "train", "evaluate")


def point_name(base: str, objective: str, beta: float) -> str:
    return f"{base}-{objective}-b{beta:g}"


def point_config(cfg: RunConfig, objective: str, beta: float) -> RunConfig:
    """The base config with this point's name, objective and beta (validated like a YAML)."""
    if "beta" in cfg.train.objective_args:
        raise ConfigError(
            "the frontier sets train.beta per point: remove train.objective_args.beta"
        )
    name = point_name(cfg.name, objective, beta)
    return derive_config(cfg, name, {"train.objective": objective, "train.beta": beta})


def run_points(cfg: RunConfig, points: dict[str, list[float]], force: bool) -> list[dict[str, Any]]:
    base = RunStore(cfg)
    run_stages(cfg, SHARED_STAGES, force)
    grid = [(obj, beta) for obj, betas in points.items() for beta in betas]
    rows = []
    for i, (objective, beta) in enumerate(grid, 1):
        pcfg = point_config(cfg, objective, beta)
        store = RunStore(pcfg)
        print(f"\n=== frontier point {i}/{len(grid)}: {pcfg.name} ===", file=console)
        started = time.time()
        share_outputs(base, store, SHARED_STAGES)
        tracking.child_run_id(
            cfg, pcfg, pcfg.name, {"midpo.role": "point", "midpo.objective": objective}
        )
        run_stages(pcfg, POINT_STAGES, force)
        report = json.loads((store.stage_dir("evaluate") / "report.json").read_text())
        rows.append(point_row(objective, beta, pcfg.name, report))
        print(f"=== {pcfg.name}: {time.time() - started:.0f} s ===", file=console)
    return rows


def run(
    cfg: RunConfig,
    store: RunStore,
    force: bool = False,
    points: dict[str, list[float]] | None = None,
) -> None:
    points = points or DEFAULT_POINTS
    started = time.time()
    rows = run_points(cfg, points, force)
    folder = store.root / "frontier"
    files = write_outputs(folder, rows, f"Reward vs KL: {cfg.name} ({cfg.model.base})")
    with tracking.stage_run(
        cfg,
        "frontier",
        params={
            "points": " ".join(f"{k}:{','.join(f'{b:g}' for b in v)}" for k, v in points.items())
        },
    ):
        import mlflow

        for f in files:
            mlflow.log_artifact(str(f))
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "frontier_table.json")
        for r in rows:
            key = f"{r['objective']}_b{r['beta']:g}"
            mlflow.log_metrics({f"reward.{key}": r["reward"], f"kl.{key}": r["kl"] or 0.0})
    print(
        f"\n[frontier] {len(rows)} points in {time.time() - started:.0f} s -> {folder}\n"
        + table_text(rows),
        file=console,
    )


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--points", default=os.environ.get("FRONTIER_POINTS"))
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        points = parse_points(known.points) if known.points else DEFAULT_POINTS
    except ConfigError as e:
        print(f"midpo frontier: error: {e}", file=console)
        raise SystemExit(2) from None
    stage_main("frontier", lambda cfg, store, force: run(cfg, store, force, points), rest)


if __name__ == "__main__":
    main()
