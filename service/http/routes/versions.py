"""Version management routes: list a task's versions, activate one (rollback), and move aliases.

Reads answer from the registry; every change is admin-only, runs in the activation worker, and is
announced to the other replicas by the registry itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Path

from service.http.deps import ADMIN_ERRORS, READ_ERRORS, AdminOnly, AppState, ClassifyAccess, State, TaskName
from service.http.errors import WITH_BODY, error_responses
from service.http.schemas import (
    ALIAS_LINKS,
    TASK_VERSION_LINKS,
    AliasList,
    AliasTarget,
    TaskDetail,
    VersionEntry,
    VersionList,
)
from service.methods import BundleError
from service.registry.base import ALIAS_PATTERN, VERSION_REF_PATTERN
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError

router = APIRouter(tags=["versions"])
VersionRef = Annotated[str, Path(pattern=VERSION_REF_PATTERN, description="a version number or an alias",
                                 examples=["1"])]
AliasName = Annotated[str, Path(pattern=ALIAS_PATTERN, description="alias name, e.g. prod or canary",
                                examples=["canary"])]
T = TypeVar("T")


@router.get("/v1/tasks/{task}/versions", summary="List a task's stored versions, its active one and aliases",
            dependencies=ClassifyAccess, responses=error_responses(*READ_ERRORS, 404, 422, 503))
async def list_versions(task: TaskName, state: State) -> VersionList:
    versions = await anyio.to_thread.run_sync(state.tasks.versions, task)
    aliases = state.tasks.aliases(task)
    active = state.tasks.active_version(task)
    return VersionList(task=task, active=active, aliases=aliases, versions=[
        VersionEntry(version=v.version, sha256=v.sha256, size=v.size, created=v.created, method=v.method,
                     active=v.version == active, aliases=sorted(a for a, n in aliases.items() if n == v.version))
        for v in versions])


@router.post("/v1/tasks/{task}/versions/{ref}/activate", dependencies=AdminOnly,
             summary="Make a stored version (number or alias) the active one: rollback or roll forward",
             responses={200: {"description": "now active", "links": TASK_VERSION_LINKS},
                        **error_responses(*ADMIN_ERRORS, 404, 422, 503)})
async def activate_version(task: TaskName, ref: VersionRef, state: State) -> TaskDetail:
    """The version is prepared before the swap: if it cannot be served, the active one keeps serving."""
    active = await _in_activation_worker(state, _activate, state, task, ref)
    return TaskDetail.of(active)


def _activate(state: AppState, task: str, ref: str) -> ActiveTask:
    return state.tasks.activate(task, state.tasks.registry.resolve(task, ref))


@router.get("/v1/tasks/{task}/aliases", summary="A task's aliases", dependencies=ClassifyAccess,
            responses=error_responses(*READ_ERRORS, 404, 422))
async def list_aliases(task: TaskName, state: State) -> AliasList:
    state.tasks.listed(task)  # 404 for an unknown task
    return AliasList(task=task, aliases=state.tasks.aliases(task))


@router.put("/v1/tasks/{task}/aliases/{alias}", dependencies=AdminOnly,
            summary="Point an alias at a version (a number or another alias)",
            responses={200: {"description": "the task's aliases", "links": ALIAS_LINKS},
                       **error_responses(*ADMIN_ERRORS, *WITH_BODY, 404, 422, 503)})
async def set_alias(task: TaskName, alias: AliasName, target: AliasTarget, state: State) -> AliasList:
    aliases = await _in_activation_worker(state, state.tasks.set_alias, task, alias, str(target.version))
    return AliasList(task=task, aliases=aliases)


@router.delete("/v1/tasks/{task}/aliases/{alias}", dependencies=AdminOnly, summary="Remove an alias",
               responses=error_responses(*ADMIN_ERRORS, 404, 422, 503))
async def delete_alias(task: TaskName, alias: AliasName, state: State) -> AliasList:
    aliases = await _in_activation_worker(state, state.tasks.delete_alias, task, alias)
    return AliasList(task=task, aliases=aliases)


async def _in_activation_worker(state: AppState, func: Callable[..., T], *args: Any) -> T:
    try:
        return await anyio.to_thread.run_sync(func, *args, limiter=state.activation_limiter)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", f"that version cannot be served here: {exc}") from exc
