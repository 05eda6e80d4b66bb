"""PNG plots for evaluation reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reward_vs_kl(
    points: Sequence[Mapping[str, Any]], path: Path, title: str = "Reward vs KL"
) -> Path:
    """Scatter of reward against KL(pi || ref); points: {label, kl, reward, [group], [low, high]}.

    Points sharing a ``group`` (e.g. an objective swept over beta) get one colour and are joined
    in KL order, as in the DPO paper's controlled-sentiment frontier.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(str(p.get("group", p["label"])), []).append(p)
    for group, pts in groups.items():
        pts = sorted(pts, key=lambda p: p["kl"])
        xs = [p["kl"] for p in pts]
        ys = [p["reward"] for p in pts]
        err = None
        if all("low" in p and "high" in p for p in pts):
            err = [
                [y - p["low"] for y, p in zip(ys, pts, strict=True)],
                [p["high"] - y for y, p in zip(ys, pts, strict=True)],
            ]
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            marker="o",
            capsize=3,
            label=group,
            linestyle="-" if len(pts) > 1 else "none",
        )
        for p in pts:
            if str(p["label"]) != group:  # a group's own name is in the legend already
                ax.annotate(
                    str(p["label"]),
                    (p["kl"], p["reward"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats, from samples)")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reward_histograms(
    policy: Sequence[float], baseline: Sequence[float], path: Path, baseline_label: str = "baseline"
) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lo = min(min(policy), min(baseline))
    hi = max(max(policy), max(baseline))
    bins = 20 if hi > lo else 1
    ax.hist(
        baseline, bins=bins, range=(lo, hi) if hi > lo else None, alpha=0.55, label=baseline_label
    )
    ax.hist(policy, bins=bins, range=(lo, hi) if hi > lo else None, alpha=0.55, label="policy")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title("Reward distribution on held-out prompts")
    ax.legend()
    return _save(fig, path)


def training_curves(
    records: Sequence[Mapping[str, Any]], path: Path, max_series: int = 6
) -> Path | None:
    """One panel per numeric series of the train stage's metrics.jsonl (loss first)."""
    if not records:
        return None
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if (
                k not in keys
                and k != "step"
                and isinstance(v, int | float)
                and not isinstance(v, bool)
            ):
                keys.append(k)
    preferred = [
        k
        for k in (
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
        )
        if k in keys
    ]
    rest = [
        k
        for k in keys
        if k not in preferred and any(w in k for w in ("loss", "margin", "accurac", "kl"))
    ]
    series = (preferred + rest)[:max_series]
    if not series:
        return None
    cols = min(3, len(series))
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, series, strict=False):
        pts = [
            (r.get("step", i), r[key])
            for i, r in enumerate(records)
            if isinstance(r.get(key), int | float)
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle("Training curves")
    return _save(fig, path)


def intervals_by_group(
    items: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
    ylabel: str,
    reference: float | None = None,
) -> Path:
    """Values with intervals side by side per group (e.g. one accuracy per seed for each
    objective); items: {group, label, value, low, high}. ``reference``: a dashed level line."""
    groups: list[str] = []
    for it in items:
        if str(it["group"]) not in groups:
            groups.append(str(it["group"]))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(groups) + 2), 4.4))
    for gi, group in enumerate(groups):
        members = [it for it in items if str(it["group"]) == group]
        for mi, it in enumerate(members):
            x = gi + (mi - (len(members) - 1) / 2) * 0.15  # seeds side by side
            ax.errorbar(
                [x],
                [it["value"]],
                yerr=[[it["value"] - it["low"]], [it["high"] - it["value"]]],
                marker="o",
                capsize=3,
                color=f"C{gi % 10}",
            )
            ax.annotate(str(it["label"]), (x, it["high"]), ha="center", va="bottom", fontsize=6)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def line_panels(
    panels: Sequence[tuple[str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
    path: Path,
    title: str,
    zero_line: Sequence[bool] = (),
) -> Path:
    """Side-by-side panels of labelled curves: (panel title, y label, {label: (xs, ys)});
    ``zero_line[i]`` draws y = 0 on panel i (a difference curve)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for i, (ax, (name, ylabel, curves)) in enumerate(zip(axes.flat, panels, strict=True)):
        for label, (xs, ys) in curves.items():
            ax.plot(list(xs), list(ys), label=label, linewidth=1.2)
        if i < len(zero_line) and zero_line[i]:
            ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
