"""Errors the API turns into JSON bodies: {"detail": message, "code": code} (+ "field" for bundle faults).

Every code the service answers is listed in docs/errors.md.
"""

from __future__ import annotations

import errno
import json
from typing import Any


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.field = status, code, message, headers, field

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.code, self.field)


def error_body(detail: str, code: str, field: str | None = None) -> dict[str, Any]:
    return {"detail": detail, "code": code} | ({"field": field} if field is not None else {})


def error_bytes(detail: str, code: str) -> bytes:
    """The same body for the ASGI-level middleware, which answers before FastAPI is involved."""
    return json.dumps(error_body(detail, code)).encode()


def storage_error(exc: OSError) -> ServiceError:
    """A registry write that failed: 507 when the disk (or quota) is full, else 503; nothing was activated."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(507, "storage_full", f"the registry has no space left ({exc.strerror}); "
                            "the previous version keeps serving")
    return ServiceError(503, "storage_unavailable", f"the registry could not be written ({exc.strerror or exc}); "
                        "the previous version keeps serving", headers={"Retry-After": "5"})
