"""`Client` and `AsyncClient`: the service's routes as typed methods, retrying when the service says it is
overloaded. Each route is described once (`_Call`: the request and how to read its answer); the two clients only
send it, one blocking and one awaiting."""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_VARIABLE = "PROMPTSERVE_URL"
Image = Path | str | tuple[str, bytes]  # a file path, or (filename, encoded bytes)
T = TypeVar("T")


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
    num_classes: int | None  # None while the task is not in memory on the replica that answered (cold)
    warm: bool = True


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


@dataclass(frozen=True)
class ImagePredictions:
    """One image's predictions against labels sent with the request (`zero_shot`)."""

    filename: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class TaskPage:
    tasks: list[TaskSummary]
    next_cursor: str | None


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    options: dict[str, Any] = field(default_factory=dict)


def _json(response: httpx.Response) -> Any:
    return response.json()


def _nothing(response: httpx.Response) -> None:
    return None


class _Routes:
    """Every route, as `_Call`s; shared by both clients."""

    @staticmethod
    def health() -> _Call[dict[str, Any]]:
        return _Call("GET", "/readyz", _json)

    @staticmethod
    def task_page(cursor: str | None, limit: int | None = None) -> _Call[TaskPage]:
        params = {k: v for k, v in {"cursor": cursor, "limit": limit}.items() if v is not None}
        return _Call("GET", "/v1/tasks", _task_page, {"params": params} if params else {})

    @staticmethod
    def task(name: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/tasks/{name}", _json)

    @staticmethod
    def upload(task: str, bundle: bytes | Path | str) -> _Call[dict[str, Any]]:
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        return _Call("POST", f"/v1/tasks/{task}/versions", _json,
                     {"content": data, "headers": {"Content-Type": "application/octet-stream"}})

    @staticmethod
    def create(task: str, labels: Sequence[str], templates: Sequence[str] | None) -> _Call[dict[str, Any]]:
        body: dict[str, Any] = {"classnames": list(labels)} | ({"templates": list(templates)} if templates else {})
        return _Call("PUT", f"/v1/tasks/{task}", _json, {"json": body})

    @staticmethod
    def delete(task: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/tasks/{task}", _nothing)

    @staticmethod
    def versions(task: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/tasks/{task}/versions", _json)

    @staticmethod
    def activate(task: str, version: int | str) -> _Call[dict[str, Any]]:
        return _Call("POST", f"/v1/tasks/{task}/versions/{version}/activate", _json)

    @staticmethod
    def aliases(task: str) -> _Call[dict[str, int]]:
        return _Call("GET", f"/v1/tasks/{task}/aliases", _aliases)

    @staticmethod
    def set_alias(task: str, alias: str, version: int | str) -> _Call[dict[str, int]]:
        target = int(version) if str(version).isdigit() else version
        return _Call("PUT", f"/v1/tasks/{task}/aliases/{alias}", _aliases, {"json": {"version": target}})

    @staticmethod
    def delete_alias(task: str, alias: str) -> _Call[dict[str, int]]:
        return _Call("DELETE", f"/v1/tasks/{task}/aliases/{alias}", _aliases)

    @staticmethod
    def classify(images: Sequence[Image], tasks: Sequence[str], top_k: int) -> _Call[list[ImageAnswer]]:
        params = [("tasks", t) for t in tasks] + [("top_k", str(top_k))]
        return _Call("POST", "/v1/classify", _image_answers, {"params": params, "files": _files(images)})

    @staticmethod
    def zero_shot(images: Sequence[Image], labels: Sequence[str], templates: Sequence[str] | None,
                  top_k: int | None) -> _Call[list[ImagePredictions]]:
        data = {"labels": list(labels), "templates": list(templates or [])}
        params = {"top_k": str(top_k)} if top_k else {}
        return _Call("POST", "/v1/zero-shot", _image_predictions,
                     {"params": params, "data": data, "files": _files(images)})

    @staticmethod
    def models() -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/models", lambda response: response.json()["data"])

    @staticmethod
    def embed(inputs: Sequence[Image], model: str, modality: str) -> _Call[list[list[float]]]:
        """Texts (modality text), or image files / (name, bytes) sent as data URIs (modality image)."""
        if modality == "text" and not all(isinstance(text, str) for text in inputs):
            raise TypeError("texts to embed must be strings")
        encoded = [str(text) for text in inputs] if modality == "text" else [_data_uri(image) for image in inputs]
        body = {"model": model, "input": encoded, "modality": modality}
        return _Call("POST", "/v1/embeddings", _embeddings, {"json": body})


def _task_page(response: httpx.Response) -> TaskPage:
    body = response.json()
    return TaskPage([TaskSummary(**t) for t in body["tasks"]], body.get("next_cursor"))


def _aliases(response: httpx.Response) -> dict[str, int]:
    return dict(response.json()["aliases"])


def _predictions(items: list[dict[str, Any]]) -> list[Prediction]:
    return [Prediction(**p) for p in items]


def _image_answers(response: httpx.Response) -> list[ImageAnswer]:
    return [ImageAnswer(r["filename"], [TaskAnswer(a["task"], a["version"], _predictions(a["predictions"]))
                                        for a in r["answers"]]) for r in response.json()["results"]]


def _image_predictions(response: httpx.Response) -> list[ImagePredictions]:
    return [ImagePredictions(r["filename"], _predictions(r["predictions"])) for r in response.json()["results"]]


def _embeddings(response: httpx.Response) -> list[list[float]]:
    return [item["embedding"] for item in sorted(response.json()["data"], key=lambda item: item["index"])]


class _Base:
    """What both clients share: where the service is, the retry policy, and the cursor walk of the task list."""

    def __init__(self, url: str | None, token: str | None, max_retries: int, max_retry_wait: float):
        self.url = (url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait

    def _retry_wait(self, call: _Call[Any], response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before trying `call` again, or None when `response` is its answer."""
        if response.status_code != 503 or attempt == self.max_retries:
            return None
        wait = retry_after(response, self.max_retry_wait)
        log.info("%s %s: 503, retry %d/%d in %.1f s", call.method, call.path, attempt + 1, self.max_retries, wait)
        return wait

    @staticmethod
    def _read(call: _Call[T], response: httpx.Response) -> T:
        if response.is_error:
            raise PromptserveError.of(response)
        return call.read(response)


class Client(_Base):
    """The promptserve API at `url` (default: `PROMPTSERVE_URL`, else http://127.0.0.1:8000). A 503 is retried up
    to `max_retries` times, each after the answer's `Retry-After` (at most `max_retry_wait` seconds); any other
    error answer raises `PromptserveError`. `AsyncClient` has the same methods, awaitable."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, max_retry_wait: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(url, token, max_retries, max_retry_wait)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)
        self.sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: _Call[T]) -> T:
        for attempt in range(self.max_retries + 1):
            response = self.http.request(call.method, call.path, **call.options)
            wait = self._retry_wait(call, response, attempt)
            if wait is None:
                break
            self.sleep(wait)
        return self._read(call, response)

    def health(self) -> dict[str, Any]:
        """Readiness: backbone, number of tasks, tasks that failed to restore."""
        return self._send(_Routes.health())

    def tasks(self) -> list[TaskSummary]:
        """Every active task, in name order (following the list's pages)."""
        page = self._send(_Routes.task_page(None))
        tasks = page.tasks
        while page.next_cursor:
            page = self._send(_Routes.task_page(page.next_cursor))
            tasks += page.tasks
        return tasks

    def task(self, name: str) -> dict[str, Any]:
        """A task's active version: method, classes, bundle size, backbone, metrics."""
        return self._send(_Routes.task(name))

    def upload(self, task: str, bundle: bytes | Path | str) -> dict[str, Any]:
        """Publish a bundle (bytes or a file path) as the task's new active version; returns the task."""
        return self._send(_Routes.upload(task, bundle))

    def create(self, task: str, labels: Sequence[str], templates: Sequence[str] | None = None) -> dict[str, Any]:
        """Make a zero-shot task (or its new version) from class names and activate it; returns the task."""
        return self._send(_Routes.create(task, labels, templates))

    def delete(self, task: str) -> None:
        self._send(_Routes.delete(task))

    def versions(self, task: str) -> dict[str, Any]:
        """The task's stored versions (oldest first, each with sha256, size, method, aliases), active one, aliases."""
        return self._send(_Routes.versions(task))

    def activate(self, task: str, version: int | str) -> dict[str, Any]:
        """Make a stored version (a number or an alias) the active one: rollback or roll forward."""
        return self._send(_Routes.activate(task, version))

    def aliases(self, task: str) -> dict[str, int]:
        return self._send(_Routes.aliases(task))

    def set_alias(self, task: str, alias: str, version: int | str) -> dict[str, int]:
        """Point `alias` (e.g. canary) at a version number or another alias; returns the task's aliases."""
        return self._send(_Routes.set_alias(task, alias, version))

    def delete_alias(self, task: str, alias: str) -> dict[str, int]:
        return self._send(_Routes.delete_alias(task, alias))

    def classify(self, images: Sequence[Image], tasks: Sequence[str], top_k: int = 5) -> list[ImageAnswer]:
        """Top-k predictions of each task for each image, in the order given; a task may be pinned to a version
        (`birds@canary`, `birds:3`)."""
        return self._send(_Routes.classify(images, tasks, top_k))

    def zero_shot(self, images: Sequence[Image], labels: Sequence[str], templates: Sequence[str] | None = None,
                  top_k: int | None = None) -> list[ImagePredictions]:
        """Each image against labels given now (default template "a photo of a {}."); all labels unless top_k."""
        return self._send(_Routes.zero_shot(images, labels, templates, top_k))

    def models(self) -> list[dict[str, Any]]:
        """The models /v1/embeddings takes (the backbone): id, embedding_dimensions, logit_scale."""
        return self._send(_Routes.models())

    def embed(self, inputs: Sequence[Image], *, model: str | None = None,
              modality: str = "text") -> list[list[float]]:
        """L2-normalized embeddings of texts, or of images with modality="image"; `model` defaults to the
        service's one model."""
        return self._send(_Routes.embed(inputs, model or self.models()[0]["id"], modality))


class AsyncClient(_Base):
    """`Client`'s twin for asyncio: the same constructor and methods, awaitable."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, max_retry_wait: float = 30.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        super().__init__(url, token, max_retries, max_retry_wait)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout)
        self.sleep = sleep

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        for attempt in range(self.max_retries + 1):
            response = await self.http.request(call.method, call.path, **call.options)
            wait = self._retry_wait(call, response, attempt)
            if wait is None:
                break
            await self.sleep(wait)
        return self._read(call, response)

    async def health(self) -> dict[str, Any]:
        return await self._send(_Routes.health())

    async def tasks(self) -> list[TaskSummary]:
        page = await self._send(_Routes.task_page(None))
        tasks = page.tasks
        while page.next_cursor:
            page = await self._send(_Routes.task_page(page.next_cursor))
            tasks += page.tasks
        return tasks

    async def task(self, name: str) -> dict[str, Any]:
        return await self._send(_Routes.task(name))

    async def upload(self, task: str, bundle: bytes | Path | str) -> dict[str, Any]:
        return await self._send(_Routes.upload(task, bundle))

    async def create(self, task: str, labels: Sequence[str], templates: Sequence[str] | None = None) -> dict[str, Any]:
        return await self._send(_Routes.create(task, labels, templates))

    async def delete(self, task: str) -> None:
        await self._send(_Routes.delete(task))

    async def versions(self, task: str) -> dict[str, Any]:
        return await self._send(_Routes.versions(task))

    async def activate(self, task: str, version: int | str) -> dict[str, Any]:
        return await self._send(_Routes.activate(task, version))

    async def aliases(self, task: str) -> dict[str, int]:
        return await self._send(_Routes.aliases(task))

    async def set_alias(self, task: str, alias: str, version: int | str) -> dict[str, int]:
        return await self._send(_Routes.set_alias(task, alias, version))

    async def delete_alias(self, task: str, alias: str) -> dict[str, int]:
        return await self._send(_Routes.delete_alias(task, alias))

    async def classify(self, images: Sequence[Image], tasks: Sequence[str], top_k: int = 5) -> list[ImageAnswer]:
        return await self._send(_Routes.classify(images, tasks, top_k))

    async def zero_shot(self, images: Sequence[Image], labels: Sequence[str], templates: Sequence[str] | None = None,
                        top_k: int | None = None) -> list[ImagePredictions]:
        return await self._send(_Routes.zero_shot(images, labels, templates, top_k))

    async def models(self) -> list[dict[str, Any]]:
        return await self._send(_Routes.models())

    async def embed(self, inputs: Sequence[Image], *, model: str | None = None,
                    modality: str = "text") -> list[list[float]]:
        return await self._send(_Routes.embed(inputs, model or (await self.models())[0]["id"], modality))


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


def _read_image(image: Image) -> tuple[str, bytes]:
    return image if isinstance(image, tuple) else (Path(image).name, Path(image).read_bytes())


def _files(images: Sequence[Image]) -> list[tuple[str, tuple[str, bytes, str]]]:
    parts = []
    for image in images:
        name, data = _read_image(image)
        parts.append(("images", (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream")))
    return parts


def _data_uri(image: Image) -> str:
    name, data = _read_image(image)
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"
