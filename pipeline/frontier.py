"""The reward-KL frontier's points and outputs: parse ``--points``, a point's row from its
evaluate report, and the figure, JSON, CSV and table of all points (``stages/frontier.py`` runs
them); ``share_outputs`` starts a point run (a frontier or study point) from its base run's
outputs."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import plots
from pipeline.config import ConfigError
from pipeline.runstore import RunStore, atomic_write_bytes, atomic_write_json


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


def share_outputs(base: RunStore, point: RunStore, stages: Sequence[str]) -> None:
    """Copy the base run's outputs of ``stages`` into a point run (atomically, once). A stage is
    shared only where the point's config for it is the base's: score, for one, differs where
    the objective reads token weights (TIS-DPO), and such a point runs its own."""
    for stage in stages:
        src = base.require(stage)
        if point.expected_hash(stage) != src["config_hash"]:
            continue  # this point's stage differs: it runs its own
        have = point.complete_manifest(stage)
        if have is not None and have.get("output_hash") == src["output_hash"]:
            continue
        dest = point.stage_dir(stage)
        tmp = dest.with_name(f".{stage}.copy-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base.stage_dir(stage), tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


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
