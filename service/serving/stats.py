"""Per task version inference statistics, as Triton reports them (`GET /v2/models/{task}/stats`).

The classify pipeline records each request once it is answered or refused: how many images, how long it
spent decoding (compute_input), queued for its micro-batch (queue) and in the batched forward with its softmax
(compute_infer), and which micro-batch ran it (executions: a batch that answers several requests of a task counts once).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field

RECENT_BATCHES = 256  # batch ids remembered per version, so a batch's requests answered out of order count once


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * 1e9)


@dataclass
class VersionStats:
    inference_count: int = 0  # images answered
    execution_count: int = 0  # micro-batches that ran them
    last_inference_ms: int = 0  # unix time of the last answer, in milliseconds
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)  # top-k and serializing happen in the routes: untimed
    batches: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_BATCHES))


@dataclass(frozen=True)
class Timings:
    """Where one request's time went, in seconds; `batch` identifies its micro-batch."""

    total: float
    decode: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    batch: int | None = None


class InferenceStats:
    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], VersionStats] = {}
        self._lock = threading.Lock()

    def success(self, task: str, version: int, images: int, timings: Timings) -> None:
        with self._lock:
            stats = self._versions.setdefault((task, version), VersionStats())
            stats.inference_count += images
            stats.last_inference_ms = int(time.time() * 1000)
            stats.success.add(timings.total)
            for duration, seconds in ((stats.compute_input, timings.decode), (stats.queue, timings.queue),
                                      (stats.compute_infer, timings.infer)):
                duration.add(seconds)
            if timings.batch is not None and timings.batch not in stats.batches:
                stats.batches.append(timings.batch)
                stats.execution_count += 1

    def failure(self, task: str, version: int, seconds: float) -> None:
        with self._lock:
            self._versions.setdefault((task, version), VersionStats()).fail.add(seconds)

    def of(self, task: str) -> dict[int, VersionStats]:
        """Every recorded version of `task` (a copy of each, taken under the lock)."""
        with self._lock:
            return {version: copy.deepcopy(stats) for (name, version), stats in self._versions.items() if name == task}

    def forget(self, task: str) -> None:
        with self._lock:
            for key in [key for key in self._versions if key[0] == task]:
                del self._versions[key]

