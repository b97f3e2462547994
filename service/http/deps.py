"""What every route depends on: the app's state, auth, and the path parameters shared across route families.

Routes take these as FastAPI dependencies (`State`, `AdminOnly`, `ClassifyAccess`, `TaskName`), so auth and
lookups live here once. With `PROMPTSERVE_CLASSIFY_TOKEN` set, `ClassifyAccess` guards classify and every read
route (tasks, versions, aliases, V2 model metadata and repository index); health routes stay open.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.config import Settings
from service.core.backbone import Backbone
from service.http.errors import WITH_BODY
from service.http.metrics import Metrics
from service.methods import BundleError
from service.registry.base import TASK_NAME_PATTERN
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.pipeline import ClassifyPipeline
from service.serving.preparation import PinBudget, PinRefused, PinWorker
from service.serving.propagation import Propagator
from service.serving.runtime import ClassifyRuntime
from service.serving.tasks import TaskManager
from service.serving.warmup import BackgroundWarmup, ColdStarts
from service.serving.zero_shot import ZeroShotCache


@dataclass
class AppState:
    settings: Settings
    backbone: Backbone
    tasks: TaskManager
    metrics: Metrics
    runtime: ClassifyRuntime
    pipeline: ClassifyPipeline
    # Activations run in a worker thread one at a time, so the event loop stays free and a large task's
    # activation never runs twice over alongside classification.
    activation_limiter: anyio.CapacityLimiter
    pin_worker: PinWorker  # prepares pinned versions, at the lowest CPU priority, never ahead of an upload
    pins: PinBudget  # which pinned requests may have a version prepared
    propagation: Propagator  # keeps this replica in step with the registry
    zero_shot: ZeroShotCache  # request-time label sets (POST /v1/zero-shot)
    cold_starts: ColdStarts  # cold tasks activated for requests, with a bounded wait
    warmup: BackgroundWarmup
    started_at: float = field(default_factory=time.time)

    def not_ready_reason(self, *, require_registry: bool = True, require_tasks: bool = True) -> str | None:
        """Why this replica is not ready: registry unreachable or never synced, or a task that failed to restore."""
        health = self.propagation.health
        reason = health.problem()
        if reason and not require_registry and health.restored:
            reason = None
        failed, waiting = self.tasks.failed_tasks(), self.tasks.waiting
        if reason is None and require_tasks and failed:
            reason = (f"{len(failed)} task(s) failed to restore or have damaged registry entries: "
                      f"{', '.join(sorted(failed)[:10])}")
        if reason is None and require_tasks and waiting:
            reason = f"{len(waiting)} task(s) waiting for the registry: {', '.join(sorted(waiting)[:10])}"
        return reason


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.promptserve
    return state


State = Annotated[AppState, Depends(get_state)]
TaskName = Annotated[str, Path(pattern=TASK_NAME_PATTERN, description="task name", examples=["shapes"])]


async def pinned_task(request: Request, state: AppState, task: str, ref: str) -> ActiveTask:
    """A stored version (number or alias) of a task, the active one untouched: answered at once if it is active or
    prepared; else prepared by the pin worker (never ahead of an upload), within the client's and the task's
    budget (service/serving/preparation.py)."""
    state.tasks.listed(task)  # 404 for a task this replica does not serve
    version = state.tasks.resolve(task, ref)
    ready = state.tasks.ready(task, version)
    if ready is not None:
        return ready
    if version == state.tasks.active_version(task):  # the active version of a cold task: a cold start, not a pin
        return await active_task(state, task)
    client = request.client.host if request.client else "unknown"
    try:
        state.pins.take(client, task, state.pin_worker.queued)
    except PinRefused as exc:
        retry = max(1, math.ceil(exc.retry_after_s))
        raise ServiceError(429, "too_many_pins", f"version {version} of {task!r} is not prepared and {exc}; retry in "
                           f"{retry} s, or pin a prepared version", headers={"Retry-After": str(retry)}) from exc
    try:
        return await state.pin_worker.run(state.tasks.pinned, task, str(version))
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", f"version {ref} of {task!r} cannot be served: {exc}") from exc
    finally:
        state.pins.done(client)


async def active_task(state: AppState, task: str) -> ActiveTask:
    """The task's active version: at once when it is in memory, else after its activation (bounded wait, then
    503 task_warming); 404 for a task this replica does not serve."""
    return await state.cold_starts.get(task)


bearer = HTTPBearer(auto_error=False, description="Bearer token from PROMPTSERVE_ADMIN_TOKEN / _CLASSIFY_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token_matches(credentials: HTTPAuthorizationCredentials | None, *tokens: SecretStr | None) -> bool:
    given = credentials.credentials.encode() if credentials else b""
    return any(t is not None and secrets.compare_digest(given, t.get_secret_value().encode()) for t in tokens)


def _demand(credentials: HTTPAuthorizationCredentials | None, accepted: tuple[SecretStr | None, ...]) -> None:
    if credentials is None:
        raise ServiceError(401, "missing_token", "this endpoint needs 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _token_matches(credentials, *accepted):
        raise ServiceError(403, "bad_token", "the bearer token is not valid for this endpoint")


def require_admin(state: State, credentials: Credentials) -> None:
    if state.settings.admin_token is None:
        raise ServiceError(403, "admin_disabled",
                           "uploads and deletes are disabled: start the service with PROMPTSERVE_ADMIN_TOKEN set")
    _demand(credentials, (state.settings.admin_token,))


def require_classify(state: State, credentials: Credentials) -> None:
    if state.settings.classify_token is not None:
        _demand(credentials, (state.settings.classify_token, state.settings.admin_token))


AdminOnly = [Depends(require_admin)]
# Classify and every read route except health: with a classify token set, task names and contents are not public.
ClassifyAccess = [Depends(require_classify)]
ADMIN_ERRORS = (401, 403)
READ_ERRORS = (401, 403)  # only when a classify token is set
CLASSIFY_ERRORS = (*READ_ERRORS, 404, *WITH_BODY, 415, 422, 503)
