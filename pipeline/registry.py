"""MLflow model registry: register trained policies, gate them, move the ``champion`` alias.

A promotion, under one registry lock:

1. the registered model is created (tagged ``midpo.managed``) or checked: versions this
   pipeline did not make (no ``midpo.model_hash`` tag) are refused unless
   ``promote.allow_foreign_versions`` is set;
2. a version already holding this model (same ``midpo.model_hash``) whose promotion finished
   (tagged ``midpo.promoted`` once its alias was set and read back) makes it a no-op; one left
   by a killed promotion (registered, or gated without its alias) is gated again now and
   finished;
3. otherwise the train run's logged model (``pipeline/policy_model.py``; logged by train, so
   the version's source run is the train run) is registered as a new version tagged with its
   evaluation metrics, config hash and run ids;
4. the gate compares it with the current champion; ``champion`` moves to it only if it
   passes, else ``challenger`` is set and the reasons are tagged; then ``midpo.promoted``.
   Versions are never deleted or overwritten; deprecated stages are not used.

Concurrency: the lock is an exclusive ``flock`` on a file next to the sqlite store (or under the
run root for a remote server). Promoters that share that file are serialised, so the second
one gates against the first one's result: the champion ends on the better version and no
version is lost. Against a remote server MLflow has no compare-and-set on aliases: promoters on
machines that do not share the lock file (a shared filesystem) are not serialised. After
moving an alias, the promoter reads it back and fails loudly if another writer changed it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import GateConfig, RunConfig
from pipeline.console import console
from pipeline.runstore import StageError

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_MANAGED = "midpo.managed"
TAG_MODEL_HASH = "midpo.model_hash"
TAG_GATE = "midpo.gate"
TAG_GATE_REASONS = "midpo.gate.reasons"
TAG_PROMOTED = "midpo.promoted"  # the alias its gate chose, set once that alias is in place
METRIC_TAG = "midpo.metric."
POLICY_ARTIFACT = "policy"
MODEL_CODE = Path(__file__).with_name("policy_model.py")


class RegistryError(StageError):
    """A promotion that cannot proceed; the message says what to change."""


# -- gate (pure) ---------------------------------------------------------------------------------
@dataclass
class GateDecision:
    passed: bool
    compared_to: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c["reason"] for c in self.checks if not c["ok"]]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons}


def gate_decision(
    metrics: dict[str, Any], baseline_reward: float | None, compared_to: str, gate: GateConfig
) -> GateDecision:
    """Pass when reward >= baseline + min_reward_gain, KL <= max_kl, human accuracy >= floor.

    ``baseline_reward`` is the champion's reward (or, with no champion, the evaluation
    baseline's); checks whose threshold is unset are skipped. A metric the gate needs but the
    evaluation did not produce fails the gate (it is never silently passed).
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, value: Any, threshold: float, ok_when: str) -> None:
        if value is None or (isinstance(value, float) and value != value):
            checks.append(
                {
                    "metric": name,
                    "value": None,
                    "threshold": threshold,
                    "ok": False,
                    "reason": f"{name} is missing from the evaluation report",
                }
            )
            return
        ok = value >= threshold if ok_when == ">=" else value <= threshold
        sign = ok_when if ok else {">=": "<", "<=": ">"}[ok_when]
        checks.append(
            {
                "metric": name,
                "value": float(value),
                "threshold": float(threshold),
                "ok": bool(ok),
                "reason": f"{name} {value:.4g} {sign} {threshold:.4g}",
            }
        )

    if baseline_reward is not None:
        check(
            "reward_mean", metrics.get("reward_mean"), baseline_reward + gate.min_reward_gain, ">="
        )
    if gate.max_kl is not None:
        check("kl", metrics.get("kl"), gate.max_kl, "<=")
    if gate.min_human_accuracy is not None:
        check("human_accuracy", metrics.get("human_accuracy"), gate.min_human_accuracy, ">=")
    return GateDecision(passed=all(c["ok"] for c in checks), compared_to=compared_to, checks=checks)


def model_folder_hash(train_manifest: dict[str, Any], folder: str = "model") -> str:
    """Content hash of the trained model folder from the train manifest's per-file sha256."""
    files = {
        k: v["sha256"]
        for k, v in train_manifest.get("outputs", {}).items()
        if k.startswith(folder + "/")
    }
    if not files:
        raise RegistryError(
            f"the train manifest lists no files under {folder}/: rerun `make train`"
        )
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


# -- lock ----------------------------------------------------------------------------------------
def lock_path(tracking_uri: str, root: Path, registered_model: str) -> Path:
    """The lock file: beside a sqlite store, else under the run root (share it on clusters)."""
    if tracking_uri.startswith("sqlite:///"):
        base = Path(tracking_uri[len("sqlite:///") :]).parent
    else:
        base = root
    base.mkdir(parents=True, exist_ok=True)
    return base / f".registry-{registered_model}.lock"


@contextlib.contextmanager
def registry_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive lock on ``path``; RegistryError after ``timeout_s`` (no hang)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"registry lock {path} still held after {timeout_s:.0f} s by "
                        f"{_lock_holder(path)}; raise promote.lock_timeout_s or check that "
                        "process"
                    ) from None
                if not announced:
                    print(
                        f"[promote] waiting for the registry lock {path} "
                        f"(held by {_lock_holder(path)})",
                        file=console,
                        flush=True,
                    )
                    announced = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


# -- registry ------------------------------------------------------------------------------------
def _not_found(e: Exception) -> bool:
    return (
        getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower()
    )


class Registry:
    """One registered model, seen through an MlflowClient."""

    def __init__(self, client: Any, name: str, allow_foreign: bool = False) -> None:
        self.client = client
        self.name = name
        self.allow_foreign = allow_foreign

    def exists(self) -> bool:
        try:
            self.client.get_registered_model(self.name)
            return True
        except Exception as e:
            if _not_found(e):
                return False
            raise

    def ensure(self) -> None:
        """Create the registered model, or refuse one holding versions we did not make."""
        if not self.exists():
            try:
                self.client.create_registered_model(
                    self.name,
                    tags={TAG_MANAGED: "true"},
                    description="Policies trained and promoted by the midpo pipeline.",
                )
                return
            except Exception as e:
                if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
        if self.allow_foreign:
            return
        model = self.client.get_registered_model(self.name)
        foreign = [v.version for v in self.versions() if TAG_MODEL_HASH not in (v.tags or {})]
        if TAG_MANAGED not in (model.tags or {}) or foreign:
            what = (
                f"versions {', '.join(map(str, sorted(foreign, key=int)))} were"
                if foreign
                else "it was"
            )
            raise RegistryError(
                f"registered model {self.name!r} exists but {what} not made by midpo "
                f"(no {TAG_MODEL_HASH} / {TAG_MANAGED} tag). Choose another "
                "promote.registered_model, or set promote.allow_foreign_versions=true to add "
                "versions beside them (they are never modified)"
            )

    def versions(self) -> list[Any]:
        return list(self.client.search_model_versions(f"name='{self.name}'"))

    def find_by_hash(self, model_hash: str) -> Any | None:
        found = self.client.search_model_versions(
            f"name='{self.name}' and tags.`{TAG_MODEL_HASH}`='{model_hash}'"
        )
        return min(found, key=lambda v: int(v.version)) if found else None

    def by_alias(self, alias: str) -> Any | None:
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except Exception as e:
            if _not_found(e) or "alias" in str(e).lower():
                return None
            raise

    @staticmethod
    def metrics_of(version: Any) -> dict[str, float]:
        out = {}
        for k, v in (version.tags or {}).items():
            if k.startswith(METRIC_TAG):
                try:
                    out[k[len(METRIC_TAG) :]] = float(v)
                except ValueError:
                    continue
        return out


def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's inferred defaults pin torchvision, which breaks here)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "transformers", "tokenizers", "safetensors"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_policy_model(model_dir: Path) -> Any:
    """Log the HF folder as a pyfunc model in the active MLflow run; returns its ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("top_p", "double", 1.0),
            ]
        ),
    )
    with warnings.catch_warnings():
        # MLflow nags for predict() type hints and an input example: the signature covers both.
        warnings.filterwarnings(
            "ignore", message=".*(type hint|input example).*", category=UserWarning
        )
        return mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(MODEL_CODE),
            artifacts={POLICY_ARTIFACT: str(model_dir)},
            pip_requirements=pip_requirements(),
            signature=signature,
        )


def _tag_value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def promote(
    registry: Registry,
    *,
    model_hash: str,
    metrics: dict[str, Any],
    baseline: dict[str, Any],
    tags: dict[str, str],
    gate: GateConfig,
    log_model: Callable[[], Any],
) -> dict[str, Any]:
    """Register (unless already there), gate and alias one policy. Call under the registry lock.

    ``baseline``: the evaluation's baseline (``kind`` reference/champion, ``version``,
    ``reward_mean``); when it was the current champion, the gate uses that paired reward.
    ``log_model`` logs the model in the active run and returns its ModelInfo (called only when a
    new version is needed). Returns the promotion record.
    """
    client = registry.client
    registry.ensure()
    existing = registry.find_by_hash(model_hash)
    if existing is not None and promotion_finished(registry, existing):
        aliases = sorted(getattr(existing, "aliases", []) or [])
        return {
            "action": "unchanged",
            "registered_model": registry.name,
            "version": str(existing.version),
            "aliases": aliases,
            "gate": (existing.tags or {}).get(TAG_GATE),
            "reasons": (existing.tags or {}).get(TAG_GATE_REASONS, ""),
            "message": f"version {existing.version} already holds this model "
            f"({TAG_MODEL_HASH}={model_hash}); nothing registered, aliases untouched",
        }

    champion = registry.by_alias(CHAMPION)
    baseline_reward, compared_to = _gate_baseline(registry, champion, baseline)
    decision = gate_decision(metrics, baseline_reward, compared_to, gate)

    if existing is not None:
        # A promotion killed between registering and setting its alias: finish it on that
        # version (gated again: the champion may have moved since).
        version, action, source = str(existing.version), "completed", str(existing.source)
    else:
        info = log_model()
        version_tags = {
            TAG_MODEL_HASH: model_hash,
            **tags,
            **{
                METRIC_TAG + k: _tag_value(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and v == v
            },
        }
        mv = client.create_model_version(
            registry.name,
            source=info.model_uri,
            run_id=getattr(info, "run_id", None),
            tags=version_tags,
            model_id=getattr(info, "model_id", None),
            description=f"midpo run {tags.get('midpo.run', '?')}",
        )
        version, action, source = str(mv.version), "registered", str(info.model_uri)
    # Decision tags go on before any alias points at the version.
    client.set_model_version_tag(
        registry.name, version, TAG_GATE, "passed" if decision.passed else "failed"
    )
    client.set_model_version_tag(
        registry.name,
        version,
        TAG_GATE_REASONS,
        "; ".join(c["reason"] for c in decision.checks)[:5000],
    )
    client.set_model_version_tag(registry.name, version, "midpo.gate.compared_to", compared_to)
    alias = CHAMPION if decision.passed else CHALLENGER
    client.set_registered_model_alias(registry.name, alias, version)
    now = registry.by_alias(alias)
    if now is None or str(now.version) != version:
        raise RegistryError(
            f"alias {alias!r} of {registry.name!r} was moved by another writer during this "
            f"promotion (it points at {getattr(now, 'version', None)}, expected {version}); "
            "promoters against a remote server must share the registry lock"
        )
    client.set_model_version_tag(registry.name, version, TAG_PROMOTED, alias)
    return {
        "action": action,
        "registered_model": registry.name,
        "version": version,
        "aliases": [alias],
        "gate": "passed" if decision.passed else "failed",
        "decision": decision.as_dict(),
        "previous_champion": str(champion.version) if champion is not None else None,
        "model_uri": f"models:/{registry.name}@{alias}",
        "source": source,
    }


def promotion_finished(registry: Registry, version: Any) -> bool:
    """Whether ``version``'s promotion ran to its end: tagged ``midpo.promoted`` (versions gated
    before that tag existed count when the alias their gate chose still points at them)."""
    tags = version.tags or {}
    if TAG_PROMOTED in tags:
        return True
    if TAG_GATE not in tags:
        return False
    alias = CHAMPION if tags[TAG_GATE] == "passed" else CHALLENGER
    return alias in (getattr(version, "aliases", None) or [])


def agrees_with(registry: Registry, record: dict[str, Any]) -> bool:
    """Whether the registry still holds what a promotion record says it did: the version,
    with this model's hash, its promotion finished."""
    try:
        version = registry.client.get_model_version(registry.name, str(record["version"]))
    except Exception as e:
        if _not_found(e):
            return False
        raise
    return (version.tags or {}).get(TAG_MODEL_HASH) == record.get("model_hash") and (
        promotion_finished(registry, version)
    )


def _gate_baseline(
    registry: Registry, champion: Any | None, baseline: dict[str, Any]
) -> tuple[float | None, str]:
    """The reward the candidate must beat, and a label saying whose it is."""
    base_reward = baseline.get("reward_mean")
    if champion is None:
        return base_reward, f"the evaluation baseline ({baseline.get('kind', 'reference')})"
    v = str(champion.version)
    if baseline.get("kind") == "champion" and str(baseline.get("version")) == v:
        return base_reward, f"champion v{v} (sampled in this evaluation)"
    reward = registry.metrics_of(champion).get("reward_mean")
    if reward is not None:
        return reward, f"champion v{v} (its own evaluation)"
    return base_reward, (
        f"the evaluation baseline ({baseline.get('kind', 'reference')}); "
        f"champion v{v} has no recorded reward"
    )


# -- reading back --------------------------------------------------------------------------------
def download_version(client: Any, name: str, version: str, dest: Path) -> Path:
    """The policy's HF folder from a registered version, downloaded once into ``dest``."""
    import mlflow
    import yaml

    done = dest / ".complete"
    if not done.is_file():
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp)
        )
        done_tmp = tmp / ".complete"
        done_tmp.write_text("ok\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    mlmodel = yaml.safe_load((dest / "MLmodel").read_text())
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"][POLICY_ARTIFACT]["path"]
    except (KeyError, TypeError):
        raise RegistryError(
            f"version {version} of {name!r} is not a midpo policy model (its MLmodel has no "
            f"'{POLICY_ARTIFACT}' artifact)"
        ) from None
    return dest / rel


def resolve_baseline(cfg: RunConfig, reference_dir: Path) -> dict[str, Any]:
    """Evaluation's baseline ``{kind, version, model_dir}``: the reference, or with
    ``evaluate.baseline=champion`` the registry's champion (downloaded once under cache_dir;
    the reference, with a ``note``, while there is none)."""
    reference = {"kind": "reference", "version": None, "model_dir": str(reference_dir)}
    if cfg.evaluate.baseline == "reference":
        return reference
    from pipeline import tracking

    mlflow = tracking.setup(cfg)
    client = mlflow.MlflowClient()
    name = cfg.promote.registered_model
    reg = Registry(client, name)
    champion = reg.by_alias(CHAMPION) if reg.exists() else None
    if champion is None:
        print(
            f"[evaluate] registered model {name!r} has no champion yet: the baseline is the "
            "reference",
            file=console,
        )
        return {**reference, "note": f"no champion in {name!r}; fell back to the reference"}
    version = str(champion.version)
    folder = download_version(
        client, name, version, Path(cfg.cache_dir) / "registry" / f"{name}-v{version}"
    )
    return {
        "kind": "champion",
        "version": version,
        "model_dir": str(folder),
        "registered_model": name,
    }
