"""frontier: reward against KL(pi || ref) for several objectives at several strengths.

    python -m stages.frontier [--config FILE] [--points "dpo:0.05,0.1,0.5 simpo:1,2.5"]
                              [--force] [key=value ...]                     (or make frontier)

The DPO paper's controlled-sentiment figure, across our objectives. The base run (``name``)
runs prepare and generate once; every point is a run ``<name>-<objective>-b<beta>`` that starts
from copies of those outputs and runs score (its config hash covers the objective), train and
evaluate against the reference with ``train.objective`` and ``train.beta`` overridden. The
reference's own samples are sampled once (evaluate's shared sample cache). Every stage is
skipped when up to date, so a killed frontier resumes at the point it was on.

Outputs in runs/<name>/frontier/: frontier.png (all objectives in one figure), frontier.json
and frontier.csv (one row per point), logged to MLflow under the base run's parent run.
See docs/frontier.md for the budget and how to scale it on a cluster.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import plots, tracking
from pipeline.cli import stage_main
from pipeline.config import ConfigError, RunConfig, objective_kwargs
from pipeline.runstore import RunStore, atomic_write_bytes, atomic_write_json

# About an hour on a 2-core CPU with the demo config (docs/frontier.md): DPO, SimPO and
# entropy-controlled DPO, each at strengths on either side of its default.
DEFAULT_POINTS: dict[str, list[float]] = {
    "dpo": [0.05, 0.1, 0.5],
    "simpo": [1.0, 2.5],
    "centropy": [0.05, 0.5],
}
SHARED_STAGES = ("prepare", "generate")
POINT_STAGES = ("score", "train", "evaluate")


def parse_points(text: str) -> dict[str, list[float]]:
    """'dpo:0.05,0.1 simpo:2' -> {'dpo': [0.05, 0.1], 'simpo': [2.0]}."""
    from pipeline.objectives import available_objectives

    points: dict[str, list[float]] = {}
    for item in text.split():
        name, sep, betas = item.partition(":")
        if not sep or not name or not betas:
            raise ConfigError(f"--points: {item!r} must look like objective:beta[,beta...]")
        if name not in available_objectives():
            raise ConfigError(
                f"--points: unknown objective {name!r}; expected one of "
                f"{', '.join(available_objectives())}"
            )
        try:
            values = [float(b) for b in betas.split(",")]
        except ValueError:
            raise ConfigError(f"--points: {item!r}: strengths must be numbers") from None
        if any(not v > 0 for v in values):
            raise ConfigError(f"--points: {item!r}: strengths (beta) must be > 0")
        points.setdefault(name, []).extend(values)
    if not points:
        raise ConfigError("--points: no points given")
    return points


def point_name(base: str, objective: str, beta: float) -> str:
    return f"{base}-{objective}-b{beta:g}"


def point_config(cfg: RunConfig, objective: str, beta: float) -> RunConfig:
    """The base config with this point's name, objective and beta (validated like a YAML)."""
    point = cfg.model_copy(deep=True)
    point.name = point_name(cfg.name, objective, beta)
    point.train.objective = objective
    point.train.beta = beta
    if "beta" in point.train.objective_args:
        raise ConfigError(
            "the frontier sets train.beta per point: remove train.objective_args.beta"
        )
    from pipeline.objectives import make_objective

    try:
        make_objective(objective, **objective_kwargs(point.train))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"frontier point {point.name}: {e}") from None
    return point


def share_outputs(base: RunStore, point: RunStore) -> None:
    """Copy the base run's prepare/generate outputs into a point run (atomically, once)."""
    for stage in SHARED_STAGES:
        src = base.require(stage)
        have = point.complete_manifest(stage)
        if have is not None and have.get("output_hash") == src["output_hash"]:
            continue
        dest = point.stage_dir(stage)
        tmp = dest.with_name(f".{stage}.copy-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base.stage_dir(stage), tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


def run_points(cfg: RunConfig, points: dict[str, list[float]], force: bool) -> list[dict[str, Any]]:
    import importlib

    base = RunStore(cfg)
    for stage in SHARED_STAGES:
        importlib.import_module(f"stages.{stage}").run(cfg, base, force)
    grid = [(obj, beta) for obj, betas in points.items() for beta in betas]
    rows = []
    for i, (objective, beta) in enumerate(grid, 1):
        pcfg = point_config(cfg, objective, beta)
        store = RunStore(pcfg)
        print(f"\n=== frontier point {i}/{len(grid)}: {pcfg.name} ===", file=sys.stderr)
        started = time.time()
        share_outputs(base, store)
        for stage in POINT_STAGES:
            importlib.import_module(f"stages.{stage}").run(pcfg, RunStore(pcfg), force)
        report = json.loads((store.stage_dir("evaluate") / "report.json").read_text())
        rows.append(point_row(objective, beta, pcfg.name, report))
        print(f"=== {pcfg.name}: {time.time() - started:.0f} s ===", file=sys.stderr)
    return rows


def point_row(objective: str, beta: float, run: str, report: dict[str, Any]) -> dict[str, Any]:
    m = report["metrics"]
    return {
        "objective": objective,
        "beta": beta,
        "run": run,
        "reward": m["reward_mean"],
        "reward_low": m["reward_ci_low"],
        "reward_high": m["reward_ci_high"],
        "kl": m.get("kl"),
        "kl_per_token": m.get("kl_per_token"),
        "win_rate": m["win_rate"],
        "reference_reward": m["baseline_reward_mean"],
        "human_accuracy": m.get("human_accuracy"),
        "length": m["length_mean"],
        "distinct_2": m["distinct_2"],
        "did_entropy": m.get("did_entropy"),
    }


def write_outputs(folder: Path, rows: list[dict[str, Any]], title: str) -> list[Path]:
    """frontier.png / .json / .csv from the point rows."""
    ref = rows[0]["reference_reward"]
    points = [
        {
            "label": f"β={r['beta']:g}",
            "group": r["objective"],
            "kl": r["kl"],
            "reward": r["reward"],
            "low": r["reward_low"],
            "high": r["reward_high"],
        }
        for r in rows
        if r["kl"] is not None
    ]
    points.append({"label": "reference", "group": "reference", "kl": 0.0, "reward": ref})
    folder.mkdir(parents=True, exist_ok=True)
    png = plots.reward_vs_kl(points, folder / "frontier.png", title=title)
    atomic_write_json(folder / "frontier.json", {"points": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "frontier.csv", buf.getvalue().encode())
    return [png, folder / "frontier.json", folder / "frontier.csv"]


def table_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'objective':<10} {'beta':>6} {'reward':>8} {'KL':>8} {'win':>6} {'human':>6}"]
    for r in rows:
        human = "-" if r["human_accuracy"] is None else f"{r['human_accuracy']:.3f}"
        lines.append(
            f"{r['objective']:<10} {r['beta']:>6g} {r['reward']:>8.3f} "
            f"{r['kl']:>8.3f} {r['win_rate']:>6.3f} {human:>6}"
        )
    lines.append(f"reference reward {rows[0]['reference_reward']:.3f}")
    return "\n".join(lines)


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
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--points", default=os.environ.get("FRONTIER_POINTS"))
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        points = parse_points(known.points) if known.points else DEFAULT_POINTS
    except ConfigError as e:
        print(f"midpo frontier: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    stage_main("frontier", lambda cfg, store, force: run(cfg, store, force, points), rest)


if __name__ == "__main__":
    main()
