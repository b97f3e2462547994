"""The error every serving step raises for a client's request: an HTTP status, a stable code (docs/errors.md)
and a message for a person. The HTTP layer turns it into its JSON body."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.field = status, code, message, headers, field
