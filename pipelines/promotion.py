"""Moving aliases in the Model Registry: the champion gate, a registry-wide lock, and the history of moves.

The gate lets a version take an alias only when
- it passed the training health checks and its FID is within register.max_fid_ratio of real-vs-real;
- the holder was scored on the same data, in the same feature space, with the same N (else the scores say
  nothing about each other);
- it beats the holder beyond noise: its 95% interval lies entirely on the better side of the holder's value,
  and its point value improves on it by at least register.min_improvement.
`--force` (gan promote) is the explicit way past all of it.
"""

from __future__ import annotations

import getpass
import json
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gancore.metrics import SET_METRICS
from pipelines.config import RegisterParams
from pipelines.errors import UserError

CHALLENGER, CHAMPION = "challenger", "champion"
COMPARABLE_TAGS = ("dataset_hash", "featurenet_sha256", "eval_n")
LOCK_SUFFIX = "--promotion-lock"
LOCK_STALE_SECONDS = 600  # a holder that died mid-registration frees the lock after this long
MOVE_TAG = "alias_move."


def mover() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


@contextmanager
def promotion_lock(client: MlflowClient, name: str, timeout: float = 300.0) -> Iterator[None]:
    """Registry-wide mutual exclusion for read-compare-move: creating a registered model is atomic on every
    MLflow store (names are unique), so whoever creates `<name>--promotion-lock` holds it until deleting it."""
    lock, deadline, token = f"{name}{LOCK_SUFFIX}", time.monotonic() + timeout, uuid.uuid4().hex
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": mover(), "since": str(time.time()), "token": token},
                                           description="held while a version is registered or an alias moves")
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).tags
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # its holder let go between our two calls: compete for it again
        if held.get("token") == token:
            break  # our create succeeded; its answer was lost, and the client's retry was refused
        if time.time() - float(held.get("since", 0)) > LOCK_STALE_SECONDS:
            release(client, lock)  # its holder died: free it, then compete for it again
        elif time.monotonic() > deadline:
            raise UserError(f"the registry lock {lock} has been held by {held.get('holder')} for over"
                            f" {timeout:.0f}s; wait for that registration, or delete {lock} if none is running")
        time.sleep(0.2 + random.random() / 2)
    try:
        yield
    finally:
        release(client, lock)


def release(client: MlflowClient, lock: str) -> None:
    """Delete the lock; one already gone is released (MLflow's client retries a delete whose answer a busy server
    lost, and two waiters can both free a stale lock)."""
    try:
        client.delete_registered_model(lock)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


@dataclass(frozen=True)
class Standing:
    """A version as the gate sees it: its tags and its run's metrics."""

    version: str
    tags: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, client: MlflowClient, name: str, version: str) -> Standing:
        model_version = client.get_model_version(name, version)
        return cls(str(model_version.version), model_version.tags, client.get_run(model_version.run_id).data.metrics)

    def score(self, metric: str) -> float:
        if metric not in self.metrics:
            raise UserError(f"version {self.version} has no {metric!r} metric to compare; register it again")
        return self.metrics[metric]

    def worst_bound(self, metric: str) -> float:
        """The end of the 95% interval on the worse side (the value itself when none was logged)."""
        side = "ci95_high" if SET_METRICS[metric].lower_is_better else "ci95_low"
        return self.metrics.get(f"{metric}_{side}", self.score(metric))


def floor_problem(candidate: Standing, settings: RegisterParams) -> str | None:
    """Why the version may hold no alias at all, or None."""
    if candidate.tags.get("health") != "passed":
        return "its training did not pass the health checks"
    fid, real = candidate.metrics.get("fid"), candidate.metrics.get("real_vs_real_fid")
    if fid is not None and real and fid > settings.max_fid_ratio * real:
        return (f"its FID {fid:.4g} is above register.max_fid_ratio x real-vs-real"
                f" ({settings.max_fid_ratio:g} x {real:.4g})")
    return None


def gate_problem(candidate: Standing, holder: Standing, settings: RegisterParams) -> str | None:
    """Why the candidate does not take the holder's alias, or None."""
    differ = [key for key in COMPARABLE_TAGS if candidate.tags.get(key) != holder.tags.get(key)]
    if differ:
        return (f"it is not comparable with version {holder.version}: {', '.join(differ)} differ (another dataset,"
                f" feature space or N)")
    metric = settings.gate_metric
    value, bound, held = candidate.score(metric), candidate.worst_bound(metric), holder.score(metric)
    improvement = held - value if SET_METRICS[metric].lower_is_better else value - held
    if not SET_METRICS[metric].better(bound, held) or improvement < settings.min_improvement:
        return (f"it does not beat version {holder.version} beyond noise ({metric} {value:.4g}, 95% interval"
                f" reaching {bound:.4g}, against {held:.4g}; register.min_improvement {settings.min_improvement:g})")
    return None


def alias_holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def move_alias(client: MlflowClient, name: str, alias: str, version: str, reason: str) -> str | None:
    """Point `alias` at `version` and append the move to the model's history; the previous holder."""
    previous = alias_holder(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    record = {"alias": alias, "version": version, "previous": previous, "reason": reason, "by": mover(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client.set_registered_model_tag(name, f"{MOVE_TAG}{len(history(client, name)) + 1:06d}", json.dumps(record))
    return previous


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every recorded alias move of the model, oldest first."""
    tags = client.get_registered_model(name).tags
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(MOVE_TAG)]


def promote(client: MlflowClient, name: str, version: str, settings: RegisterParams, reason: str,
            alias: str = CHAMPION, force: bool = False) -> tuple[bool, str]:
    """Move `alias` to `version` when the gate allows it (or `force`); (moved, what happened). Call it under
    promotion_lock."""
    current = alias_holder(client, name, alias)
    if current == version:
        return False, f"{alias} already is version {version}"
    candidate = Standing.of(client, name, version)
    if not force:
        problem = floor_problem(candidate, settings)
        if problem is None and current is not None:
            problem = gate_problem(candidate, Standing.of(client, name, current), settings)
        if problem is not None:
            return False, f"version {version} does not take {alias}: {problem}; {alias} unchanged (--force overrides)"
    move_alias(client, name, alias, version, f"{reason} (forced)" if force else reason)
    metric = settings.gate_metric
    was = f" (was version {current})" if current is not None else ""
    return True, f"{alias} -> version {version} ({metric} {candidate.score(metric):.4f}){was}"


def rollback(client: MlflowClient, name: str, alias: str = CHAMPION) -> str:
    """Give `alias` back to the version that held it before its latest move. Call it under promotion_lock."""
    moves = [move for move in history(client, name) if move["alias"] == alias]
    if not moves or moves[-1]["previous"] is None:
        raise UserError(f"{alias} of {name} has no earlier holder to roll back to (see `gan history`)")
    last = moves[-1]
    move_alias(client, name, alias, last["previous"], f"rollback of version {last['version']}")
    return f"{alias} -> version {last['previous']} (rolled back from version {last['version']})"
