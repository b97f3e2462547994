"""The batched forward of the request path: a micro-batch of classify jobs in, class probabilities out.

A job is one request's preprocessed images and the task versions it asked for (snapshotted when the request
arrived, so a swap mid-request cannot mix versions). For a whole micro-batch, top to bottom:
1. one shared image forward over every image of a job with a task that needs it (with tokens if any needs them);
2. one prompted image forward over every (image, vision-side task) row, per-row prompts, per prompt shape;
3. each task kind scores all of its rows at once (`TaskHead.score`);
4. softmax per (job, task) for the heads that score classes (image embeddings leave as features).
The runtime asks each task's head which forward it needs (`TaskHead.forward`) and knows no method.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from service.core.backbone import Backbone
from service.serving.heads import ImageForward, ImageRows, TaskHead

SHARED = (ImageForward.PLAIN, ImageForward.PLAIN_WITH_TOKENS)
Key = tuple[int, int]  # (job position in the micro-batch, task position in the job)


class Answerer(Protocol):
    """What a job asks the runtime for: a task version (`ActiveTask`), or the image embeddings' head."""

    @property
    def name(self) -> str: ...

    @property
    def head(self) -> TaskHead: ...


@dataclass(frozen=True)
class ClassifyJob:
    pixels: torch.Tensor  # [B, 3, H, W]
    tasks: tuple[Answerer, ...]

    def needs(self, *forwards: ImageForward) -> list[int]:
        """Positions of this job's tasks whose head needs one of `forwards`."""
        return [i for i, task in enumerate(self.tasks) if task.head.forward in forwards]

    @property
    def rows(self) -> int:
        """Image forwards this job costs: one shared, plus one per vision-side task, per image."""
        forwards = bool(self.needs(*SHARED)) + len(self.needs(ImageForward.PROMPTED))
        return len(self.pixels) * forwards


@dataclass(frozen=True)
class Forward:
    """One image-tower forward the runtime ran: its kind and how many rows it took."""

    kind: ImageForward
    rows: int


class ClassifyRuntime:
    """Runs micro-batches for the batcher; `forwards` keeps the recent image forwards (tests and metrics)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.forwards: deque[Forward] = deque(maxlen=1000)

    def __call__(self, jobs: list[ClassifyJob]) -> list[list[torch.Tensor]]:
        """For each job, the probabilities [B, C] of each of its tasks (features [B, D] for a head that scores
        no classes), in the job's task order."""
        return [[scores.softmax(dim=-1) if task.head.scores_classes else scores
                 for task, scores in zip(job.tasks, job_scores, strict=True)]
                for job, job_scores in zip(jobs, self.logits(jobs), strict=True)]

    def logits(self, jobs: list[ClassifyJob]) -> list[list[torch.Tensor]]:
        """For each job, the logits [B, C] of each of its tasks, in the job's task order."""
        rows = {**self._shared_forward(jobs), **self._prompted_forward(jobs)}
        logits = self._score(jobs, rows)
        return [[logits[j, t] for t in range(len(job.tasks))] for j, job in enumerate(jobs)]

    def _shared_forward(self, jobs: list[ClassifyJob]) -> dict[Key, ImageRows]:
        users = [j for j, job in enumerate(jobs) if job.needs(*SHARED)]
        if not users:
            return {}
        pixels = torch.cat([jobs[j].pixels for j in users])
        with_tokens = any(jobs[j].needs(ImageForward.PLAIN_WITH_TOKENS) for j in users)
        kind = ImageForward.PLAIN_WITH_TOKENS if with_tokens else ImageForward.PLAIN
        self.forwards.append(Forward(kind, len(pixels)))
        pooled: torch.Tensor | None = None
        tokens: torch.Tensor | None = None
        if with_tokens:  # one torch forward gives the pooled features and the tokens for every kind
            out = self.backbone.encode_image_tokens(pixels)
            features, pooled, tokens = out.features, out.pooled, out.tokens
        else:
            features = self.backbone.encode_images(pixels)
        rows = {}
        for j, start in zip(users, _starts(len(jobs[j].pixels) for j in users), strict=True):
            part = slice(start, start + len(jobs[j].pixels))
            image_rows = ImageRows(features[part], *(None if t is None else t[part] for t in (pooled, tokens)))
            rows.update({(j, t): image_rows for t in jobs[j].needs(*SHARED)})
        return rows

    def _prompted_forward(self, jobs: list[ClassifyJob]) -> dict[Key, ImageRows]:
        """Rows of every vision-side task in one forward per prompt shape, each row with its own prompts."""
        by_shape: defaultdict[tuple[int, ...], list[tuple[Key, torch.Tensor]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for t in job.needs(ImageForward.PROMPTED):
                prompts = job.tasks[t].head.vision_prompts
                if prompts is None:
                    raise TypeError(f"task {job.tasks[t].name!r} needs a prompted forward but has no vision prompts")
                by_shape[tuple(prompts.shape)].append(((j, t), prompts))
        out = {}
        for members in by_shape.values():
            keys = [key for key, _ in members]
            pixels = torch.cat([jobs[j].pixels for j, _ in keys])
            prompts = torch.cat([p.expand(len(jobs[j].pixels), -1, -1, -1) for (j, _), p in members])
            self.forwards.append(Forward(ImageForward.PROMPTED, len(pixels)))
            features = self.backbone.encode_prompted_images(pixels, prompts)
            for (j, t), start in zip(keys, _starts(len(jobs[j].pixels) for j, _ in keys), strict=True):
                out[j, t] = ImageRows(features[start : start + len(jobs[j].pixels)])
        return out

    def _score(self, jobs: list[ClassifyJob], rows: dict[Key, ImageRows]) -> dict[Key, torch.Tensor]:
        by_kind: defaultdict[type[TaskHead], list[Key]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for t, task in enumerate(job.tasks):
                by_kind[type(task.head)].append((j, t))
        logits: dict[Key, torch.Tensor] = {}
        for kind, keys in by_kind.items():
            scored = kind.score([(jobs[j].tasks[t].head, rows[j, t]) for j, t in keys], self.backbone)
            logits.update(zip(keys, scored, strict=True))
        return logits


def _starts(lengths: Iterable[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)][:-1]
