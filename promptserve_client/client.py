"""`Client`: the service's routes as typed methods, retrying when the service says it is overloaded."""

from __future__ import annotations

import logging
import mimetypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
Image = Path | str | tuple[str, bytes]  # a file path, or (filename, encoded bytes)


class PromptserveError(Exception):
    """An error answer from the service: its HTTP status and the `code` and `detail` of its body."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail

    @classmethod
    def of(cls, response: httpx.Response) -> PromptserveError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return cls(response.status_code, "http_error", response.text[:500] or response.reason_phrase)
        return cls(response.status_code, str(body.get("code", "http_error")), str(body.get("detail", body)))


@dataclass(frozen=True)
class TaskSummary:
    name: str
    method: str
    version: int
    num_classes: int


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float


@dataclass(frozen=True)
class TaskAnswer:
    task: str
    version: int
    predictions: list[Prediction]


@dataclass(frozen=True)
class ImageAnswer:
    filename: str
    answers: list[TaskAnswer]


class Client:
    """The promptserve API at `url`. A 503 is retried up to `max_retries` times, each after the answer's
    `Retry-After` (at most `max_retry_wait` seconds); any other error answer raises `PromptserveError`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, max_retry_wait: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.max_retries, self.max_retry_wait, self.sleep = max_retries, max_retry_wait, sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        """Readiness: backbone, number of tasks, tasks that failed to restore."""
        return self._request("GET", "/readyz").json()

    def tasks(self) -> list[TaskSummary]:
        return [TaskSummary(**t) for t in self._request("GET", "/v1/tasks").json()["tasks"]]

    def task(self, name: str) -> dict[str, Any]:
        """A task's active version: method, classes, bundle size, backbone, metrics."""
        return self._request("GET", f"/v1/tasks/{name}").json()

    def upload(self, task: str, bundle: bytes | Path | str) -> dict[str, Any]:
        """Publish a bundle (bytes or a file path) as the task's new active version; returns the task."""
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        return self._request("POST", f"/v1/tasks/{task}/versions", content=data,
                             headers={"Content-Type": "application/octet-stream"}).json()

    def delete(self, task: str) -> None:
        self._request("DELETE", f"/v1/tasks/{task}")

    def versions(self, task: str) -> dict[str, Any]:
        """The task's stored versions (oldest first, each with sha256, size, method, aliases), active one, aliases."""
        return self._request("GET", f"/v1/tasks/{task}/versions").json()

    def activate(self, task: str, version: int | str) -> dict[str, Any]:
        """Make a stored version (a number or an alias) the active one: rollback or roll forward."""
        return self._request("POST", f"/v1/tasks/{task}/versions/{version}/activate").json()

    def classify(self, images: Sequence[Image], tasks: Sequence[str], top_k: int = 5) -> list[ImageAnswer]:
        """Top-k predictions of each task for each image, in the order given."""
        files = [("images", _image_part(image)) for image in images]
        params = [("tasks", t) for t in tasks] + [("top_k", str(top_k))]
        results = self._request("POST", "/v1/classify", params=params, files=files).json()["results"]
        return [ImageAnswer(r["filename"], [
            TaskAnswer(a["task"], a["version"], [Prediction(**p) for p in a["predictions"]]) for a in r["answers"]])
            for r in results]

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == self.max_retries:
                break
            wait = retry_after(response, self.max_retry_wait)
            log.info("%s %s: 503, retry %d/%d in %.1f s", method, path, attempt + 1, self.max_retries, wait)
            self.sleep(wait)
        if response.is_error:
            raise PromptserveError.of(response)
        return response


def retry_after(response: httpx.Response, cap: float, default: float = 1.0) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), within [0, cap]."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = default
    return min(max(seconds, 0.0), cap)


def _image_part(image: Image) -> tuple[str, bytes, str]:
    name, data = image if isinstance(image, tuple) else (Path(image).name, Path(image).read_bytes())
    return name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"
