"""The classify request path, top to bottom, for every HTTP surface (v1, KServe V2):

    check answer size and queue room (before the body is read) → decode + preprocess (worker thread, bounded
    per process) → micro-batched forward (`ClassifyRuntime`: image forward per head need, head scores) →
    probabilities [B, C] per task; or, for image embeddings, the shared forward's features [B, D].

The task versions answering a request are chosen by the caller before it comes here (a swap mid-request
cannot mix versions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import torch

from service.serving.activation import ActiveTask
from service.serving.batcher import JobTooLarge, MicroBatcher, Overloaded, Ran
from service.serving.errors import ServiceError
from service.serving.heads import EmbeddingHead, TaskHead
from service.serving.images import DecodeLimits, ImagePreprocessor, decode_images
from service.serving.runtime import Answerer, ClassifyJob
from service.serving.stats import InferenceStats, Timings

Uploads = list[tuple[str, bytes]]  # (filename, encoded image) as a request sent them


@dataclass(frozen=True)
class AnswerLimits:
    decode: DecodeLimits
    max_answer_predictions: int  # tasks × images × top_k in one answer


@dataclass(frozen=True)
class ImageEmbeddings:
    """What an embeddings job asks the runtime for: the shared forward's normalized features, no task."""

    name: str = "(image embeddings)"
    head: TaskHead = EmbeddingHead()


class ClassifyPipeline:
    def __init__(self, batcher: MicroBatcher[ClassifyJob, list[torch.Tensor]], preprocessor: ImagePreprocessor,
                 limits: AnswerLimits, decode_concurrency: int,
                 on_classified: Callable[[str, int], None] = lambda task, images: None):
        self.batcher, self.preprocessor, self.limits = batcher, preprocessor, limits
        # Decoding is bounded per process, so many concurrent requests cannot hold many decoded images at once.
        self.decode_limiter = anyio.CapacityLimiter(decode_concurrency)
        self.on_classified = on_classified
        self.stats = InferenceStats()

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap reading a request's body: a batch about to start waits for it (bounded)."""
        with self.batcher.incoming():
            yield

    def admit(self, tasks: Sequence[ActiveTask], top_k: int) -> None:
        """Refuse, before the body is read, an answer that is too large even for one image, or a full queue."""
        self.check_answer_size(tasks, 1, top_k)
        try:
            self.batcher.check_capacity(1)
        except Overloaded as exc:
            raise _overloaded(exc) from exc

    async def classify(self, uploads: Uploads, tasks: tuple[ActiveTask, ...], top_k: int) -> list[torch.Tensor]:
        """decode → preprocess (worker thread) → micro-batched forward → probabilities [B, C] per task."""
        self.check_answer_size(tasks, len(uploads), top_k)
        start = time.perf_counter()
        try:
            ran, decode_s = await self._run(uploads, tasks)
        except Exception:
            for task in tasks:
                self.stats.failure(task.name, task.version, time.perf_counter() - start)
            raise
        timings = Timings(time.perf_counter() - start, decode_s, ran.queued_s, ran.run_s, ran.batch)
        for task in tasks:
            self.on_classified(task.name, len(uploads))
            self.stats.success(task.name, task.version, len(uploads), timings)
        return ran.result

    async def embed(self, uploads: Uploads) -> torch.Tensor:
        """decode → preprocess → the same micro-batched shared image forward → L2-normalized features [B, D]."""
        ran, _ = await self._run(uploads, (ImageEmbeddings(),))
        (features,) = ran.result
        return features

    async def _run(self, uploads: Uploads, answerers: tuple[Answerer, ...]) -> tuple[Ran[list[torch.Tensor]], float]:
        """The job's result and the seconds its decoding took."""
        start = time.perf_counter()
        with self.batcher.incoming():  # a batch about to start waits (bounded) for this request's decoding
            pixels = await anyio.to_thread.run_sync(self._decode_and_preprocess, uploads, limiter=self.decode_limiter)
        decode_s = time.perf_counter() - start
        try:
            return await self.batcher.run_job(ClassifyJob(pixels, answerers)), decode_s
        except Overloaded as exc:
            raise _overloaded(exc) from exc
        except JobTooLarge as exc:
            raise ServiceError(413, "too_many_forwards", f"{exc}: send fewer images or fewer vision-side tasks at "
                               "once") from exc

    def check_answer_size(self, tasks: Sequence[ActiveTask], images: int, top_k: int) -> None:
        """Answers grow as tasks × images × top_k: refuse ones beyond the configured size."""
        predictions = images * sum(min(top_k, len(t.manifest.classnames)) for t in tasks)
        limit = self.limits.max_answer_predictions
        if predictions > limit:
            raise ServiceError(413, "answer_too_large", f"{len(tasks)} task(s) × {images} image(s) × top_k={top_k} "
                               f"make {predictions} predictions; the limit is {limit}")

    def _decode_and_preprocess(self, uploads: Uploads) -> torch.Tensor:
        return self.preprocessor.batch(decode_images(uploads, self.limits.decode))


def _overloaded(exc: Overloaded) -> ServiceError:
    return ServiceError(503, "overloaded", f"{exc}; retry shortly", headers={"Retry-After": "1"})
