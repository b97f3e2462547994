"""Tasks: bundles turned into ready-to-serve classifiers, activated atomically.

Activation turns a bundle into its task head (service/heads.py): for a text-side method (zeroshot, coop,
qprompt, rlp) that is the class text features, computed once, and every such task shares one image forward.
The head is built *before* anything is stored or swapped, so a bundle that fails anywhere leaves the
previous version serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.backbone import Backbone
from service.bundle import DEFAULT_TEMPLATES, METHODS, Bundle, BundleError, Manifest, decode_bundle, fill_template
from service.config import BundleLimits
from service.heads import TaskHead, TextSideHead
from service.registry import Registry, UnknownTask, check_task_name

log = logging.getLogger(__name__)

TEXT_BATCH = 256


def check_compatible(manifest: Manifest, backbone: Backbone, limits: BundleLimits) -> None:
    """Refuse bundles trained for another backbone or too costly to serve; nothing here touches a tensor."""
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
    if manifest.prompt.ctx_dim not in (0, backbone.text.width):
        raise BundleError("prompt.ctx_dim", f"is {manifest.prompt.ctx_dim}, the text width is {backbone.text.width}")
    if manifest.prompt.n_ctx + 2 > backbone.text.context_length:  # start and end tokens take two slots
        raise BundleError("prompt.n_ctx", f"is {manifest.prompt.n_ctx}; the text context holds "
                          f"{backbone.text.context_length} tokens")
    _check_cost(manifest, limits)


def _check_cost(manifest: Manifest, limits: BundleLimits) -> None:
    classes = len(manifest.classnames)
    if classes > limits.max_classes:
        raise BundleError("classnames", f"{classes} classes exceed this service's limit {limits.max_classes}")
    longest = max(len(name) for name in manifest.classnames)
    if longest > limits.max_classname_chars:
        raise BundleError("classnames", f"a class name of {longest} characters exceeds this service's limit "
                          f"{limits.max_classname_chars}")
    templates = manifest.options.get("templates", DEFAULT_TEMPLATES) if bundle_uses_templates(manifest) else ()
    if len(templates) > limits.max_templates:
        raise BundleError("options.templates", f"{len(templates)} templates exceed this service's limit "
                          f"{limits.max_templates}")
    if any(len(t) > limits.max_template_chars for t in templates):
        raise BundleError("options.templates", f"templates are limited to {limits.max_template_chars} characters")
    if classes * max(len(templates), 1) > limits.max_text_prompts:
        raise BundleError("options.templates", f"{classes} classes × {len(templates)} templates exceed this "
                          f"service's limit of {limits.max_text_prompts} prompts to encode")


def bundle_uses_templates(manifest: Manifest) -> bool:
    return not METHODS[manifest.method].uses_context


def check_finite_features(features: torch.Tensor) -> None:
    """Finite inputs can still overflow inside the encoder; such a bundle would answer null probabilities."""
    if not torch.isfinite(features).all():
        raise BundleError("tensors", "the bundle's text features are not finite (its values overflow the encoder)")


@torch.no_grad()
def text_features(bundle: Bundle, backbone: Backbone) -> torch.Tensor:
    """L2-normalized class text features [C, D] (float32, CPU) for a text-side bundle."""
    manifest, ctx = bundle.manifest, bundle.context()
    names = list(manifest.classnames)
    if ctx is None:
        templates = manifest.options.get("templates", list(DEFAULT_TEMPLATES))
        per_template = [_encode_in_batches(backbone, [fill_template(t, n) for n in names], None)
                        for t in templates]
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


def text_side_head(bundle: Bundle, backbone: Backbone) -> TextSideHead:
    features = text_features(bundle, backbone)
    check_finite_features(features)
    return TextSideHead(features)


# How each method's bundle becomes a task head: the method's kind decides what the image forward produces.
HEAD_BUILDERS: dict[str, Callable[[Bundle, Backbone], TaskHead]] = {
    "zeroshot": text_side_head,
    "coop": text_side_head,
    "qprompt": text_side_head,
    "rlp": text_side_head,
}


@dataclass(frozen=True)
class ActiveTask:
    name: str
    version: int
    manifest: Manifest
    bundle_bytes: int
    head: TaskHead
    activated_at: float


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, limits: BundleLimits):
        self.backbone = backbone
        self.registry = registry
        self.limits = limits
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
        check_compatible(bundle.manifest, self.backbone, self.limits)
        try:
            head = HEAD_BUILDERS[bundle.manifest.method](bundle, self.backbone)
        except BundleError:
            raise
        except ValueError as exc:  # e.g. a class prompt longer than the text context
            raise BundleError("classnames", str(exc)) from exc
        return ActiveTask(name, version, bundle.manifest, len(data), head, time.time())

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
        """Bring back every task's active version after a restart; a damaged one is reported, never fatal."""
        for name, reason in self.registry.damaged_tasks().items():
            self.restore_failures[name] = reason
            log.error("task %s could not be restored: %s", name, reason)
        for name, version in self.registry.active_versions().items():
            try:
                self._active[name] = self.prepare(name, version, self.registry.load(name, version))
            except Exception as exc:  # noqa: BLE001  # whatever one task's files hold, the others still serve
                self.restore_failures[name] = f"version {version}: {exc}"
                log.error("task %s version %d could not be restored: %s", name, version, exc)
        log.info("restored %d task(s), %d failed", len(self._active), len(self.restore_failures))
