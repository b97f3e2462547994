"""Query parameters a route does not take are refused with a 422 naming them, not ignored: a misspelt `top_k`, or
`?version=` on a route that pins no version, would otherwise be answered as if it were absent."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.serving.errors import ServiceError

_names: dict[int, frozenset[str]] = {}  # id(route) → the query parameters it and its dependencies declare


def reject_unknown_query(request: Request) -> None:
    """An app-wide dependency: 422 `unknown_query_parameter` for any query parameter the route does not declare."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    allowed = _names.get(id(route))
    if allowed is None:
        allowed = _names[id(route)] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no query parameters"
        raise ServiceError(422, "unknown_query_parameter", f"unknown query parameter(s) {', '.join(unknown)}; "
                           f"this route takes {takes}", field=f"query.{unknown[0]}")


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
