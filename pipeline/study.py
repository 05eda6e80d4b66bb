"""The study's parts (``stages/study.py`` runs them; docs/study.md is what they publish).

Every objective of ``study.objectives`` at its preset defaults, on the same model, data and
budget, in two tracks:

- offline: trained on pairs of human-rated snippets (``data.task=vader-preference``), measured
  on the held-out human pairs without generation (``heldout_metrics``);
- online: the controlled-sentiment task (``study.online`` overrides), measured by the evaluate
  stage (``online_metrics``).

Each point (track, objective, seed) ends in one small JSON under ``study.publish_dir``
(``point_record``); the report (``write_report``) is regenerated from those files alone: the
tables, the figures and what the numbers do and do not support, computed, never written by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from pipeline import plots
from pipeline.config import (
    STAGES,
    STUDY_OBJECTIVES,
    ConfigError,
    RunConfig,
    StudyConfig,
    build_objective,
    config_hash,
    derive_config,
    stage_config,
)
from pipeline.evaluation import (
    bootstrap_mean,
    differential_information_entropy,
    likelihood_accuracy,
)
from pipeline.runstore import atomic_write_bytes, json_safe

SCHEMA = 1
TRACK_TAGS = {"offline": "off", "online": "on"}
# Stages each track's points run themselves (score only where it scores differently: TIS-DPO).
SHARED_STAGES = {"offline": ("prepare", "score"), "online": ("prepare", "generate", "score")}
POINT_STAGES = {"offline": ("score", "train"), "online": ("score", "train", "evaluate")}
# The budget configs/study.yaml is sized for (measured; docs/study.md's header repeats it).
DEFAULT_BUDGET = "about 35-45 minutes on an idle 2-core CPU machine"


@dataclass(frozen=True)
class Point:
    """One point of the study: a track, an objective and a training seed."""

    track: str
    objective: str
    seed: int

    @property
    def key(self) -> str:
        """The point file's name (without .json) in the publish folder."""
        return f"{self.track}-{self.objective}-s{self.seed}"

    def run_name(self, base: str) -> str:
        return f"{base}-{TRACK_TAGS[self.track]}-{self.objective}-s{self.seed}"


# -- points and their configs ---------------------------------------------------------------------
def select_objectives(study: StudyConfig, text: str | None) -> list[str]:
    """``--points`` / ``STUDY_POINTS`` ("dpo simpo learnable") or, when empty, study.objectives;
    checked like study.objectives."""
    if not text or not text.split():
        return list(study.objectives)
    try:
        return StudyConfig.model_validate({"objectives": text.split()}).objectives
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"--points / STUDY_POINTS: {msg}") from None


def points(study: StudyConfig, track: str, objectives: Sequence[str]) -> list[Point]:
    """The track's points, seed by seed (a study cut short has every objective of its first
    seeds, not every seed of its first objectives)."""
    seeds = study.online_seeds if track == "online" and study.online_seeds else study.seeds
    return [Point(track, o, s) for s in seeds for o in objectives]


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"task": x}} -> {"data.task": x}: a nested override changes only the keys it
    names, never a whole section (an empty mapping is a value)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def track_config(cfg: RunConfig, track: str) -> RunConfig:
    """The base run of a track: the study config itself (offline), or the run ``<name>-on``
    with ``study.online`` applied (online)."""
    if track == "offline":
        if not cfg.data.pairs_from_data:
            raise ConfigError(
                f"{cfg.source}: the study's offline track trains on pairs from the data: set "
                f"data.task=vader-preference (or preference), not {cfg.data.task!r}, or "
                "study.tracks=[online]"
            )
        return cfg
    try:
        online = derive_config(cfg, f"{cfg.name}-on", _dotted(cfg.study.online))
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: study.online: {e}") from None
    if online.data.pairs_from_data:
        raise ConfigError(
            f"{cfg.source}: study.online: the online track samples its own pairs: set "
            f"data.task to vader-sentiment (or prompts) there, not {online.data.task!r}"
        )
    return online


def point_config(cfg: RunConfig, base: RunConfig, point: Point) -> RunConfig:
    """A point's run: ``base`` (its track's base run) with the objective at its preset defaults
    (train.beta unset; ``study.objective_args`` over them) and ``train.seed``."""
    args = dict(cfg.study.objective_args.get(point.objective, {}))
    return derive_config(
        base,
        point.run_name(cfg.name),
        {
            "train.objective": point.objective,
            "train.beta": None,
            "train.objective_args": args,
            "train.seed": point.seed,
        },
    )


def point_key(pcfg: RunConfig, track: str) -> str:
    """What a point's result depends on: its stages' config sections (the same hashes the run
    store keys outputs by). A point file with another key is stale and is computed again."""
    stages = [s for s in STAGES if s != "promote" and (track == "online" or s != "generate")]
    return config_hash({s: stage_config(pcfg, s) for s in stages})


def finished(path: Path, key: str) -> bool:
    """``path`` holds this point's result for exactly this config."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("schema") == SCHEMA and record.get("key") == key


# -- measurements -----------------------------------------------------------------------------------
def heldout_metrics(
    policy: Sequence[float],
    reference: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    bootstrap_samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Held-out human pairs: ``policy`` and ``reference`` are sequence log-probs, every chosen
    response first, then every rejected one (n pairs -> 2n values each).

    Implicit-reward accuracy: the fraction of pairs whose log-ratio log(pi/ref) is higher for
    the chosen response (ties one half; any beta > 0 ranks the same), with a bootstrap
    interval over pairs. Shifts: mean log pi - log ref of each side, in nats (both negative:
    likelihood displacement). DID entropy: each pair is a prompt's two responses, q over them
    proportional to pi/ref (evaluation.differential_information_entropy; normalised by log 2).
    """
    pol, ref = np.asarray(policy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    n = len(chosen_lengths)
    if pol.shape != (2 * n,) or ref.shape != (2 * n,) or n == 0:
        raise ValueError(f"heldout_metrics: need 2 x {n} log-probs per model, got {pol.shape}")
    shift_w, shift_l = pol[:n] - ref[:n], pol[n:] - ref[n:]
    margin = shift_w - shift_l
    correct = (margin > 0) + 0.5 * (margin == 0)
    accuracy = bootstrap_mean(correct, bootstrap_samples, confidence, seed)
    did, did_norm = differential_information_entropy(
        np.stack([pol[:n], pol[n:]], axis=1).tolist(),
        np.stack([ref[:n], ref[n:]], axis=1).tolist(),
    )
    return {
        "heldout_pairs": n,
        "heldout_accuracy": accuracy.mean,
        "heldout_accuracy_low": accuracy.low,
        "heldout_accuracy_high": accuracy.high,
        "heldout_margin_nats": float(margin.mean()),
        "chosen_shift": float(shift_w.mean()),
        "rejected_shift": float(shift_l.mean()),
        "chosen_decreased": float((shift_w < 0).mean()),
        "likelihood_displacement": bool(shift_w.mean() < 0 and shift_l.mean() < 0),
        "did_entropy": did,
        "did_entropy_normalized": did_norm,
        "policy_logp_accuracy": likelihood_accuracy(
            pol[:n].tolist(), pol[n:].tolist(), chosen_lengths, rejected_lengths
        ),
        "reference_logp_accuracy": likelihood_accuracy(
            ref[:n].tolist(), ref[n:].tolist(), chosen_lengths, rejected_lengths
        ),
    }


def offline_metrics(
    cfg: RunConfig, prepare_dir: Path, policy_dir: Path, reference_dir: Path
) -> dict[str, Any]:
    """The offline track's evaluation: the held-out human pairs (up to
    evaluate.num_human_pairs) under the trained policy and the reference, no generation. The
    reference's log-probs are cached (the same for every point)."""
    from pipeline.evaluation_steps import human_pairs, sequence_logps
    from pipeline.models import load_tokenizer
    from pipeline.runstore import StageError

    tokenizer = load_tokenizer(reference_dir, trust_remote_code=cfg.model.trust_remote_code)
    pairs = human_pairs(cfg, prepare_dir, tokenizer)
    if not pairs:
        raise StageError(f"{prepare_dir}/human_pairs.parquet: no held-out human pairs")
    seqs = [
        (list(p["prompt_token_ids"]), list(p[f"{side}_token_ids"]))
        for side in ("chosen", "rejected")
        for p in pairs
    ]
    policy = sequence_logps(cfg, policy_dir, seqs, "policy log-probs (held-out pairs)")
    reference = sequence_logps(
        cfg, reference_dir, seqs, "reference log-probs (held-out pairs)", cache=True
    )
    ev = cfg.evaluate
    return heldout_metrics(
        policy,
        reference,
        [len(p["chosen_token_ids"]) for p in pairs],
        [len(p["rejected_token_ids"]) for p in pairs],
        ev.bootstrap_samples,
        ev.confidence,
        cfg.seed,
    )


# The evaluate stage's metrics the online track keeps (report.json's "metrics").
ONLINE_KEYS = (
    "reward_mean",
    "reward_ci_low",
    "reward_ci_high",
    "baseline_reward_mean",
    "reward_gain",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "kl",
    "kl_k3",
    "kl_per_token",
    "human_accuracy",
    "human_chosen_shift",
    "human_rejected_shift",
    "train_chosen_shift",
    "length_mean",
    "distinct_2",
    "did_entropy",
    "did_entropy_normalized",
)


def online_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The online track's numbers from an evaluate stage's report.json."""
    m = report["metrics"]
    return {k: m.get(k) for k in ONLINE_KEYS}


def training_summary(metrics_file: Path) -> dict[str, Any]:
    """From train's metrics.jsonl: steps, final and best loss, the per-step loss, and the
    learnable prior quantities (``prior/<term>/<name>``, as the step's loss saw them) at the
    first and the last step."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    if not records:
        raise ValueError(f"{metrics_file}: no steps")
    losses = [float(r["loss"]) for r in records]
    best = int(np.argmin(losses))
    parameters = {
        k: {"start": float(records[0][k]), "end": float(records[-1][k])}
        for k in records[0]
        if k.startswith("prior/") and not k.endswith(("/chosen", "/rejected"))
    }
    return {
        "steps": len(records),
        "final_loss": losses[-1],
        "best_loss": losses[best],
        "best_step": int(records[best]["step"]),
        "loss": losses,
        "prior_parameters": parameters,
    }


def token_weight_spread(pairs_file: Path) -> dict[str, float] | None:
    """Mean and standard deviation of TIS-DPO's token weights in pairs.parquet (None without
    them): a spread of 0 means every token weighs alike, and TIS-DPO trains as DPO does."""
    from pipeline.data import read_rows

    rows = read_rows(pairs_file)
    if not rows or "chosen_weights" not in rows[0]:
        return None
    values = np.asarray(
        [w for r in rows for side in ("chosen", "rejected") for w in r[f"{side}_weights"]],
        dtype=np.float64,
    )
    return {"mean": float(values.mean()), "std": float(values.std())}


def stage_seconds(manifests: Mapping[str, Mapping[str, Any] | None], run: str) -> dict[str, float]:
    """Seconds of each stage this run ran itself (a stage copied from the base run has the base
    run's name in its manifest and is not counted)."""
    out: dict[str, float] = {}
    for stage, m in manifests.items():
        if m is None or m.get("run") != run:
            continue
        start = _dt.datetime.fromisoformat(m["started"])
        end = _dt.datetime.fromisoformat(m["finished"])
        out[stage] = (end - start).total_seconds()
    return out


def machine() -> dict[str, Any]:
    """Where a point ran: CPU model, cores, torch version, device."""
    import torch

    cpu = platform.processor() or platform.machine()
    with_info = Path("/proc/cpuinfo")
    if with_info.is_file():
        for line in with_info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "device": device}


def point_record(
    point: Point,
    pcfg: RunConfig,
    *,
    metrics: Mapping[str, Any],
    training: Mapping[str, Any],
    seconds: Mapping[str, float],
    shared_seconds: Mapping[str, float],
    command: str,
    reference_dir: Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A point's JSON: its metrics, training summary, the exact resolved config (sections it
    depends on and the objective's hyper-parameters as built against ``reference_dir``, the
    model it trained against), times, date, machine, command."""
    sections = ["model", "data", "score", "train", "evaluate"]
    if point.track == "online":
        sections.insert(2, "generate")
    tree = pcfg.model_dump(mode="json")
    return json_safe(
        {
            "schema": SCHEMA,
            "key": point_key(pcfg, point.track),
            "track": point.track,
            "objective": point.objective,
            "seed": point.seed,
            "run": pcfg.name,
            "metrics": dict(metrics),
            "training": dict(training),
            **dict(extra or {}),
            "wall_time_s": sum(seconds.values()),
            "stage_seconds": dict(seconds),
            "shared_stage_seconds": dict(shared_seconds),
            "config": {
                "objective_hparams": build_objective(pcfg.train, reference_dir).hparams,
                **{s: tree[s] for s in sections},
                "seed": tree["seed"],
            },
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": command,
        }
    )


def write_point(folder: Path, point: Point, record: Mapping[str, Any]) -> Path:
    path = folder / f"{point.key}.json"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=1, default=str) + "\n").encode())
    return path


# -- the report -------------------------------------------------------------------------------------
def load_points(folder: Path) -> list[dict[str, Any]]:
    """Every point file in ``folder`` (a bad one is an error naming it)."""
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path}: not a study point file ({e})") from None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise ConfigError(f"{path}: not a study point file (schema {SCHEMA} expected)")
        out.append(record)
    return out


def _order(objective: str) -> tuple[int, str]:
    known = list(STUDY_OBJECTIVES)
    return (known.index(objective) if objective in known else len(known), objective)


def _by_objective(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (_order(r["objective"]), r["seed"])):
        groups.setdefault(r["objective"], []).append(r)
    return groups


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


# (value, interval's low end, high end): the metrics each track reports with an interval
ACCURACY = ("heldout_accuracy", "heldout_accuracy_low", "heldout_accuracy_high")
REWARD = ("reward_mean", "reward_ci_low", "reward_ci_high")


def _interval(metrics: Mapping[str, Any], keys: tuple[str, str, str]) -> str:
    """ "value [low, high]" of one point's metric."""
    value, low, high = (_f(metrics[k]) for k in keys)
    return f"{value} [{low}, {high}]"


def _per_seed(points: Sequence[Mapping[str, Any]], keys: tuple[str, str, str]) -> str:
    return "; ".join(f"s{r['seed']}: {_interval(r['metrics'], keys)}" for r in points)


def _mean(values: Sequence[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any], low: str, high: str) -> bool:
    """Do two points' intervals (metrics ``low``..``high``) overlap?"""
    ma, mb = a["metrics"], b["metrics"]
    return bool(ma[low] <= mb[high] and mb[low] <= ma[high])


def _seed_pairs(
    groups: Mapping[str, Sequence[Mapping[str, Any]]], objective: str, other: str
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    theirs = {r["seed"]: r for r in groups.get(other, [])}
    return [(r, theirs[r["seed"]]) for r in groups.get(objective, []) if r["seed"] in theirs]


def loss_gap(learnable: Mapping[str, Any], dpo: Mapping[str, Any]) -> dict[str, Any] | None:
    """Learnable minus DPO training loss at the same steps (same seed: the same batches), the
    mean over the last quarter of steps, and the share of steps where learnable is lower."""
    a, b = learnable["training"]["loss"], dpo["training"]["loss"]
    n = min(len(a), len(b))
    if n == 0:
        return None
    diff = np.asarray(a[:n], dtype=np.float64) - np.asarray(b[:n], dtype=np.float64)
    quarter = diff[-max(1, n // 4) :]
    return {
        "seed": learnable["seed"],
        "steps": n,
        "difference": diff.tolist(),
        "last_quarter_mean": float(quarter.mean()),
        "lower_share": float((diff < 0).mean()),
        "lower_everywhere": bool((diff < 0).all()),
    }


def never_trained(record: Mapping[str, Any]) -> bool:
    """The loss was log 2 (a zero margin) at every step: no gradient reached the policy."""
    losses = record["training"]["loss"]
    return bool(losses) and all(abs(x - math.log(2)) < 1e-9 for x in losses)


def offline_findings(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """What the offline numbers support and what they do not, computed from them."""
    lines: list[str] = []
    above = [o for o, rs in groups.items() if all(r["metrics"][ACCURACY[1]] > 0.5 for r in rs)]
    not_above = [o for o in groups if o not in above]
    if above:
        lines.append(
            f"Held-out accuracy above chance (0.5 outside the interval) on every seed: "
            f"{', '.join(above)}."
        )
    if not_above:
        lines.append(
            f"Not distinguishable from chance on at least one seed: {', '.join(not_above)}."
        )
    if "dpo" in groups:
        same, differ = [], []
        for o in groups:
            if o == "dpo":
                continue
            pairs = _seed_pairs(groups, o, "dpo")
            if not pairs:
                continue
            if all(_overlap(a, b, ACCURACY[1], ACCURACY[2]) for a, b in pairs):
                same.append(o)
            else:
                sign = [
                    "higher" if a["metrics"][ACCURACY[0]] > b["metrics"][ACCURACY[0]] else "lower"
                    for a, b in pairs
                    if not _overlap(a, b, ACCURACY[1], ACCURACY[2])
                ]
                differ.append(f"{o} ({'/'.join(sorted(set(sign)))} on {len(sign)} seed(s))")
        if same:
            lines.append(
                "Held-out accuracy intervals overlap DPO's on every seed (the data do not "
                f"separate them from DPO): {', '.join(same)}."
            )
        if differ:
            lines.append(
                f"Held-out accuracy interval apart from DPO's on some seed: {', '.join(differ)}."
            )
    widths = [
        r["metrics"][ACCURACY[2]] - r["metrics"][ACCURACY[1]]
        for rs in groups.values()
        for r in rs
        if not never_trained(r)
    ]
    if widths:
        lines.append(
            f"Interval widths are {min(widths):.3f}–{max(widths):.3f}: smaller accuracy "
            "differences than that are not resolved at this budget."
        )
    displaced = [
        o for o, rs in groups.items() if all(r["metrics"]["likelihood_displacement"] for r in rs)
    ]
    if displaced:
        lines.append(
            "Likelihood displacement (held-out chosen and rejected log-probs both fell) on "
            f"every seed: {', '.join(displaced)}."
        )
    rising = [o for o, rs in groups.items() if all(r["metrics"]["chosen_shift"] > 0 for r in rs)]
    if rising:
        lines.append(f"Held-out chosen log-prob rose on every seed: {', '.join(rising)}.")
    gaps = [g for a, b in _seed_pairs(groups, "learnable", "dpo") if (g := loss_gap(a, b))]
    if gaps:
        below = [g for g in gaps if g["last_quarter_mean"] < 0]
        everywhere = all(g["lower_everywhere"] for g in gaps)
        lines.append(
            f"Learnable prior vs DPO, training loss at the same steps ({len(gaps)} seed(s)): "
            f"lower over the last quarter of steps on {len(below)} of {len(gaps)} seed(s) "
            f"(mean difference {', '.join(format(g['last_quarter_mean'], '+.4f') for g in gaps)}); "
            + (
                "below DPO's at every step on every seed."
                if everywhere
                else "not below DPO's at every step on every seed."
            )
            + " A lower training loss is the paper's claim about the joint optimum; it says "
            "nothing by itself about held-out accuracy (compare the table)."
        )
    stuck = [f"{o} (seed {r['seed']})" for o, rs in groups.items() for r in rs if never_trained(r)]
    if stuck:
        lines.append(
            f"Never trained: {', '.join(stuck)}: the loss was log 2 at every step, so no "
            "gradient reached the policy (its held-out numbers are the reference's)."
        )
    for r in groups.get("tisdpo", []):
        spread = r.get("token_weights")
        if spread is not None and spread["std"] == 0:
            lines.append(
                f"TIS-DPO (seed {r['seed']}): every token weight is {spread['mean']:.3f} (its "
                "contrastive models are the base model itself here), so it trained as DPO "
                "with its margin scaled by that weight."
            )
    return lines


def online_findings(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    lines: list[str] = []
    gained = [
        o
        for o, rs in groups.items()
        if all(r["metrics"][REWARD[1]] > r["metrics"]["baseline_reward_mean"] for r in rs)
    ]
    if gained:
        lines.append(
            f"Reward above the reference's mean (interval's low end) on every seed: "
            f"{', '.join(gained)}."
        )
    flat = [o for o in groups if o not in gained]
    if flat:
        lines.append(f"Reward not clearly above the reference on some seed: {', '.join(flat)}.")
    if "dpo" in groups:
        same = [
            o
            for o in groups
            if o != "dpo"
            and (pairs := _seed_pairs(groups, o, "dpo"))
            and all(_overlap(a, b, REWARD[1], REWARD[2]) for a, b in pairs)
        ]
        if same:
            lines.append(
                f"Reward intervals overlap DPO's on every seed: {', '.join(same)} (the "
                "reward alone does not separate them; compare KL: higher reward at a higher "
                "KL is a different trade-off, not a better objective)."
            )
    stuck = [f"{o} (seed {r['seed']})" for o, rs in groups.items() for r in rs if never_trained(r)]
    if stuck:
        lines.append(
            f"Never trained: {', '.join(stuck)}: the loss was log 2 at every step, so the "
            "policy is the reference (its KL is sampling noise around 0)."
        )
    kls = {o: _mean([r["metrics"]["kl"] for r in rs]) for o, rs in groups.items()}
    known = {o: k for o, k in kls.items() if k is not None}
    if len(known) > 1:
        lo, hi = min(known, key=known.__getitem__), max(known, key=known.__getitem__)
        lines.append(
            f"KL(π‖π_ref) ranges from {known[lo]:.2f} ({lo}) to {known[hi]:.2f} ({hi}) nats per "
            "sequence: the objectives, each at its own default strength, did not spend the "
            "same KL budget, so rewards are compared at different KL."
        )
    return lines


def _offline_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    rows = [
        "| objective | seeds | held-out accuracy (mean) | per seed [interval] | chosen shift "
        "| rejected shift | displaced | DID entropy (norm.) | final loss | best loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o, rs in groups.items():
        m = [r["metrics"] for r in rs]
        rows.append(
            f"| {o} | {len(rs)} | {_f(_mean([x['heldout_accuracy'] for x in m]))} "
            f"| {_per_seed(rs, ACCURACY)} "
            f"| {_f(_mean([x['chosen_shift'] for x in m]), '+.2f')} "
            f"| {_f(_mean([x['rejected_shift'] for x in m]), '+.2f')} "
            f"| {sum(bool(x['likelihood_displacement']) for x in m)}/{len(m)} "
            f"| {_f(_mean([x['did_entropy_normalized'] for x in m]))} "
            f"| {_f(_mean([r['training']['final_loss'] for r in rs]), '.4f')} "
            f"| {_f(_mean([r['training']['best_loss'] for r in rs]), '.4f')} "
            f"| {_f(_mean([r['wall_time_s'] for r in rs]), '.0f')} |"
        )
    return rows


def _online_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    rows = [
        "| objective | seeds | reward (mean) | per seed [interval] | KL | win rate "
        "| human-pair accuracy | length | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o, rs in groups.items():
        m = [r["metrics"] for r in rs]
        rows.append(
            f"| {o} | {len(rs)} | {_f(_mean([x['reward_mean'] for x in m]))} "
            f"| {_per_seed(rs, REWARD)} "
            f"| {_f(_mean([x['kl'] for x in m]), '.2f')} "
            f"| {_f(_mean([x['win_rate'] for x in m]))} "
            f"| {_f(_mean([x['human_accuracy'] for x in m]))} "
            f"| {_f(_mean([x['length_mean'] for x in m]), '.1f')} "
            f"| {_f(_mean([r['wall_time_s'] for r in rs]), '.0f')} |"
        )
    reference = _mean([r["metrics"]["baseline_reward_mean"] for rs in groups.values() for r in rs])
    rows.append(f"\nReference (the base model) mean reward: {_f(reference)}.")
    return rows


def _figures(
    folder: Path,
    offline: Mapping[str, Sequence[Mapping[str, Any]]],
    online: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[Path]:
    files = []
    if offline:
        files.append(
            plots.intervals_by_group(
                [
                    {
                        "group": o,
                        "label": f"s{r['seed']}",
                        "value": r["metrics"]["heldout_accuracy"],
                        "low": r["metrics"]["heldout_accuracy_low"],
                        "high": r["metrics"]["heldout_accuracy_high"],
                    }
                    for o, rs in offline.items()
                    for r in rs
                ],
                folder / "offline_accuracy.png",
                "Held-out human pairs: implicit-reward accuracy (bootstrap interval per seed)",
                "accuracy",
                reference=0.5,
            )
        )
        curves = {}
        for o, rs in offline.items():
            n = min(len(r["training"]["loss"]) for r in rs)
            mean = np.mean([r["training"]["loss"][:n] for r in rs], axis=0)
            curves[o] = (list(range(1, n + 1)), mean.tolist())
        gaps = {
            f"seed {g['seed']}": (list(range(1, g["steps"] + 1)), g["difference"])
            for a, b in _seed_pairs(offline, "learnable", "dpo")
            if (g := loss_gap(a, b))
        }
        panels: list[tuple[str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]] = [
            ("training loss (mean over seeds)", "loss", curves)
        ]
        if gaps:
            panels.append(("learnable minus DPO, same seed", "loss difference", gaps))
        files.append(
            plots.line_panels(
                panels, folder / "offline_loss.png", "Offline track", zero_line=(False, True)
            )
        )
    if online:
        pts: list[dict[str, Any]] = [
            {
                "label": f"s{r['seed']}",
                "group": o,
                "kl": r["metrics"]["kl"],
                "reward": r["metrics"]["reward_mean"],
                "low": r["metrics"]["reward_ci_low"],
                "high": r["metrics"]["reward_ci_high"],
            }
            for o, rs in online.items()
            for r in rs
            if r["metrics"]["kl"] is not None
        ]
        reference = _mean(
            [r["metrics"]["baseline_reward_mean"] for rs in online.values() for r in rs]
        )
        pts.append({"label": "reference", "group": "reference", "kl": 0.0, "reward": reference})
        files.append(
            plots.reward_vs_kl(
                pts, folder / "online_reward_kl.png", title="Online track: reward vs KL"
            )
        )
    return files


def write_report(folder: Path, records: Sequence[Mapping[str, Any]]) -> list[Path]:
    """``folder``/../study.md and the figures in ``folder``, from the point files alone.
    Returns the report and the figures."""
    if not records:
        raise ConfigError(f"{folder}: no study point files to report on; run the study first")
    offline = _by_objective([r for r in records if r["track"] == "offline"])
    online = _by_objective([r for r in records if r["track"] == "online"])
    figures = _figures(folder, offline, online)
    dates = sorted(r["date"] for r in records)
    machines = sorted({json.dumps(r["machine"], sort_keys=True) for r in records})
    commands = sorted({r["command"] for r in records})
    shared = {
        (r["track"], k): v
        for r in records
        for k, v in (r.get("shared_stage_seconds") or {}).items()
    }
    total = sum(r["wall_time_s"] for r in records) + sum(shared.values())
    rel = folder.name
    lines = [
        "# The study: every prior, and the learnable prior, on one model, data and budget",
        "",
        "Generated by `python -m stages.study --report` (`make study-report`) from the point "
        f"files in [{rel}/]({rel}/); do not edit by hand. `make study` runs the study "
        "(stages/study.py, preset configs/study.yaml) and regenerates this page.",
        "",
        f"- **Dates**: {dates[0]} to {dates[-1]}",
        f"- **Machine(s)**: {'; '.join(_machine_text(json.loads(m)) for m in machines)}",
        f"- **Command(s)**: {'; '.join(f'`{c}`' for c in commands)}",
        f"- **Points**: {len(records)}; seeds "
        f"{sorted({r['seed'] for r in records})}; measured time {total / 60:.1f} min "
        "(points plus the shared stages of each track)",
        f"- **Budget**: the default study (configs/study.yaml) is sized for {DEFAULT_BUDGET}.",
    ]
    lines += _budget_lines(offline, online)
    lines += [
        "",
        "Each objective runs at its preset defaults (docs/objectives.md; `train.beta` unset); "
        "the learnable prior starts at DPO. DICE is not a point of its own: in one round its "
        "loss is DPO's, and what makes it DICE is the data loop of `make iterate`. Every "
        "point's exact config (train section and the objective's hyper-parameters as built) is "
        "in its file.",
    ]
    if offline:
        lines += [
            "",
            "## Offline track: human preferences, no generation",
            "",
            "Trained on pairs of human-rated movie-review snippets from the train split (the "
            "more positive one preferred); measured on held-out pairs from the test split, "
            "disjoint by snippet and text. Accuracy: how often log π/π_ref is higher for the "
            "human-preferred snippet (0.5 = untrained), bootstrap interval over pairs. Shifts: "
            "mean log π − log π_ref in nats (both negative = likelihood displacement). DID "
            "entropy: of q ∝ π/π_ref over each pair's two snippets, normalised by log 2.",
            "",
            *_offline_table(offline),
            "",
            f"![held-out accuracy]({rel}/offline_accuracy.png)",
            "",
            f"![training loss]({rel}/offline_loss.png)",
        ]
        learnable = offline.get("learnable", [])
        for r in learnable:
            moved = ", ".join(
                f"{k.rsplit('/', 1)[-1]} {v['start']:.4f} → {v['end']:.4f}"
                for k, v in r["training"]["prior_parameters"].items()
            )
            lines.append(f"\nLearnable prior, seed {r['seed']}: {moved or 'no parameters'}.")
    if online:
        lines += [
            "",
            "## Online track: the controlled-sentiment task",
            "",
            "Each point trains on the shared generate and score stages' pairs and is evaluated "
            "by the evaluate stage against the reference: VADER reward with a bootstrap "
            "interval over prompts, KL(π‖π_ref) per sequence from samples, win rate, "
            "implicit-reward accuracy on the held-out human pairs.",
            "",
            *_online_table(online),
            "",
            f"![reward vs KL]({rel}/online_reward_kl.png)",
        ]
    lines += ["", "## What the data supports, and what it does not", ""]
    findings = [f"Offline: {x}" for x in offline_findings(offline)]
    findings += [f"Online: {x}" for x in online_findings(online)]
    seeds = {len(rs) for g in (offline, online) for rs in g.values()}
    if seeds and max(seeds) < 3:
        findings.append(
            f"At most {max(seeds)} seed(s) per point: the per-seed spread is not a variance "
            "estimate; intervals are over pairs or prompts within one training run."
        )
    lines += [f"- {x}" for x in findings] or ["- (no findings: too few points)"]
    report = folder.parent / "study.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return [report, *figures]


def _machine_text(m: Mapping[str, Any]) -> str:
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"


def _budget_lines(
    offline: Mapping[str, Sequence[Mapping[str, Any]]],
    online: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[str]:
    out = []
    for track, groups in (("offline", offline), ("online", online)):
        first = next((rs[0] for rs in groups.values() if rs), None)
        if first is None:
            continue
        c, t = first["config"], first["training"]
        train = c["train"]
        what = (
            f"{c['data']['num_train_pairs']} training pairs (asked), "
            f"{first['metrics']['heldout_pairs']} held-out pairs"
            if track == "offline"
            else f"{c['data']['num_train_prompts']} training prompts x {c['generate']['n']} "
            f"samples, {c['data']['num_test_prompts']} test prompts x {c['evaluate']['n']}"
        )
        out.append(
            f"- **{track.capitalize()} budget**: model {c['model']['base']}, {what}; "
            f"{t['steps']} optimizer steps of "
            f"{train['per_device_batch_size'] * train['gradient_accumulation_steps']} pairs "
            f"({train['epochs']} epoch(s)), "
            f"learning rate {train['learning_rate']:g}, precision {train['precision']}"
        )
    return out


def table_text(records: Sequence[Mapping[str, Any]]) -> str:
    """A short terminal summary of the points."""
    lines = []
    for r in sorted(records, key=lambda r: (r["track"], _order(r["objective"]), r["seed"])):
        m = r["metrics"]
        main = (
            f"acc {_interval(m, ACCURACY)}"
            if r["track"] == "offline"
            else f"reward {_f(m['reward_mean'])} KL {_f(m['kl'], '.2f')}"
        )
        lines.append(
            f"{r['track']:<8} {r['objective']:<10} s{r['seed']:<3} {main}  "
            f"loss {_f(r['training']['final_loss'], '.4f')}  {r['wall_time_s']:.0f} s"
        )
    return "\n".join(lines)


def flat_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A point's numeric metrics and losses, for MLflow."""
    out = {
        k: float(v)
        for k, v in record["metrics"].items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    out["final_loss"] = float(record["training"]["final_loss"])
    out["best_loss"] = float(record["training"]["best_loss"])
    out["wall_time_s"] = float(record["wall_time_s"])
    return out
