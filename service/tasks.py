"""Tasks: bundles turned into ready-to-serve classifiers, activated atomically.

A bundle for a text-side method (zeroshot, coop, qprompt, rlp) leaves the image tower untouched, so a
task is just its class text features, computed once at activation; every such task shares one image
forward. Activation computes the features *before* anything is stored or swapped, so a bundle that fails
anywhere leaves the previous version serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.backbone import Backbone
from service.bundle import DEFAULT_TEMPLATES, METHODS, Bundle, BundleError, Manifest, decode_bundle
from service.registry import Registry, UnknownTask, check_task_name
from service.tgpt import check_tgpt_backbone

log = logging.getLogger(__name__)

TEXT_BATCH = 256


def check_compatible(manifest: Manifest, backbone: Backbone, max_classes: int) -> None:
    """Refuse bundles trained for another backbone or too large to serve."""
    if manifest.backbone.model != backbone.spec.model:
        raise BundleError(
            "backbone.model", f"bundle is for {manifest.backbone.model!r}, this service runs {backbone.spec.model!r}"
        )
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise BundleError(
            "backbone.fingerprint",
            "bundle was trained on other text-tower weights than this service's "
            f"({manifest.backbone.fingerprint[:19]}… vs {backbone.fingerprint[:19]}…); retrain it on this backbone",
        )
    image_fingerprint = manifest.backbone.image_fingerprint
    if METHODS[manifest.method].needs_image_fingerprint and image_fingerprint != backbone.image_fingerprint:
        raise BundleError("backbone.image_fingerprint", "bundle was trained on other image-tower weights than this "
                          "service's; retrain it on this backbone")
    if manifest.method == "tgpt":
        check_tgpt_backbone(manifest, backbone)
    if manifest.prompt.ctx_dim not in (0, backbone.text.width):
        raise BundleError("prompt.ctx_dim", f"is {manifest.prompt.ctx_dim}, the text width is {backbone.text.width}")
    if len(manifest.classnames) > max_classes:
        raise BundleError("classnames", f"{len(manifest.classnames)} classes exceed this service's limit {max_classes}")


@torch.no_grad()
def text_features(bundle: Bundle, backbone: Backbone) -> torch.Tensor:
    """L2-normalized class text features [C, D] (float32, CPU) for a text-side bundle."""
    manifest, ctx = bundle.manifest, bundle.context()
    names = list(manifest.classnames)
    if ctx is None:
        templates = manifest.options.get("templates", list(DEFAULT_TEMPLATES))
        per_template = [_encode_in_batches(backbone, [t.format(n) for n in names], None) for t in templates]
        features = torch.stack(per_template).mean(dim=0)
    else:
        features = _encode_in_batches(backbone, names, ctx, manifest)
    return F.normalize(features.float(), dim=-1).cpu()


def _encode_in_batches(
    backbone: Backbone, items: list[str], ctx: torch.Tensor | None, manifest: Manifest | None = None
) -> torch.Tensor:
    chunks = []
    for start in range(0, len(items), TEXT_BATCH):
        batch = items[start : start + TEXT_BATCH]
        if ctx is None:
            chunks.append(F.normalize(backbone.text.encode_texts(batch).float(), dim=-1))
        else:
            batch_ctx = ctx[start : start + TEXT_BATCH] if manifest.prompt.class_specific else ctx
            chunks.append(backbone.text.encode_classes(batch, batch_ctx, manifest.prompt).float())
    return torch.cat(chunks)


@dataclass(frozen=True)
class ActiveTask:
    name: str
    version: int
    manifest: Manifest
    bundle_bytes: int
    text_features: torch.Tensor
    activated_at: float

    def probabilities(self, image_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        return (logit_scale * image_features @ self.text_features.T).softmax(dim=-1)


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, max_classes: int):
        self.backbone = backbone
        self.registry = registry
        self.max_classes = max_classes
        self._active: dict[str, ActiveTask] = {}
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.restore_failures: dict[str, str] = {}

    def get(self, name: str) -> ActiveTask:
        try:
            return self._active[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r}") from None

    def all(self) -> list[ActiveTask]:
        return sorted(self._active.values(), key=lambda t: t.name)

    def prepare(self, name: str, version: int, data: bytes) -> ActiveTask:
        """Decode, check and compute features; touches no shared state."""
        bundle = decode_bundle(data)
        check_compatible(bundle.manifest, self.backbone, self.max_classes)
        try:
            features = text_features(bundle, self.backbone)
        except ValueError as exc:  # e.g. a class prompt longer than the text context
            raise BundleError("classnames", str(exc)) from exc
        return ActiveTask(name, version, bundle.manifest, len(data), features, time.time())

    def publish(self, name: str, data: bytes) -> ActiveTask:
        """Make `data` the new active version of `name`, or raise and leave the old one serving."""
        check_task_name(name)
        with self._task_locks[name]:
            candidate = self.prepare(name, 0, data)
            version = self.registry.store(name, data)
            self.registry.activate(name, version)
            task = dataclasses.replace(candidate, version=version, activated_at=time.time())
            self._active[name] = task
        log.info("task %s: version %d active (%d classes)", name, version, len(task.manifest.classnames))
        return task

    def delete(self, name: str) -> None:
        with self._task_locks[name]:
            self.registry.delete(name)
            self._active.pop(name, None)

    def restore(self) -> None:
        """Bring back every task's active version after a restart; a broken one is logged, not fatal."""
        for name, version in self.registry.active_versions().items():
            try:
                self._active[name] = self.prepare(name, version, self.registry.load(name, version))
            except (BundleError, UnknownTask, OSError) as exc:
                self.restore_failures[name] = str(exc)
                log.error("task %s version %d could not be restored: %s", name, version, exc)
        log.info("restored %d task(s)", len(self._active))
