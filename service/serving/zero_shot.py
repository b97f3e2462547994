"""Zero-shot tasks from a list of labels: the bundle such a list makes, and the bounded cache of the versions that
labels sent with a request (`POST /v1/zero-shot`) are served by.

Both go through the same activation as an uploaded bundle (`service.serving.activation.prepare`: the format's
checks, this service's cost limits, the text features through the prompt-aware encoder), so a label list costs
and is refused exactly like a bundle with those class names. The cache is keyed by (labels, templates) in their
order: the features of a label set are computed once, and a repeated set costs a dictionary lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from pydantic import ValidationError

from service.bundle.codec import encode_bundle
from service.bundle.manifest import build_manifest
from service.core.backbone import Backbone
from service.methods import BundleError
from service.methods.zeroshot import DEFAULT_TEMPLATES
from service.methods.zeroshot import SPEC as ZERO_SHOT
from service.serving.activation import ActiveTask, BundleLimits, prepare

__all__ = ["DEFAULT_TEMPLATES", "REQUEST_TASK", "ZERO_SHOT", "ZeroShotCache", "zero_shot_bundle"]
LabelSet = tuple[tuple[str, ...], tuple[str, ...]]  # (labels, templates)
REQUEST_TASK = "zero-shot"  # the name request-time label sets answer under (metrics, logs)


def zero_shot_bundle(backbone: Backbone, labels: Sequence[str], templates: Sequence[str] | None = None) -> bytes:
    """A zero-shot bundle for `backbone`: each label through `templates` (default "a photo of a {}."), averaged.
    Raises BundleError naming `classnames` or `options.templates` when the lists break the format."""
    options = {"templates": list(templates or DEFAULT_TEMPLATES)}
    try:
        manifest = build_manifest(ZERO_SHOT.name, backbone, labels, options=options)
    except ValidationError as exc:
        raise BundleError.from_validation(exc) from exc
    return encode_bundle(manifest, {})


class ZeroShotCache:
    """Prepared zero-shot versions of request-time label sets, least recently used dropped beyond `size`."""

    def __init__(self, backbone: Backbone, limits: BundleLimits, size: int):
        self.backbone, self.limits, self.size = backbone, limits, size
        self._entries: OrderedDict[LabelSet, ActiveTask] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # label sets encoded (tests: a repeated set encodes nothing)

    def cached(self, labels: Sequence[str], templates: Sequence[str] | None) -> ActiveTask | None:
        """The prepared version of this label set if it is at hand (cheap: safe on the event loop)."""
        key = _key(labels, templates)
        with self._lock:
            task = self._entries.get(key)
            if task is not None:
                self._entries.move_to_end(key)
            return task

    def get(self, labels: Sequence[str], templates: Sequence[str] | None) -> ActiveTask:
        """The prepared version of this label set, encoded now if it is not cached (blocking: a worker thread)."""
        task = self.cached(labels, templates)
        if task is not None:
            return task
        self.check_count(len(labels))
        data = zero_shot_bundle(self.backbone, labels, templates)
        task = prepare(REQUEST_TASK, 0, data, self.backbone, self.limits)
        with self._lock:
            self.misses += 1
            self._entries[_key(labels, templates)] = task
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return task

    def check_count(self, labels: int) -> None:
        """Refuse a label list beyond the class limit before any manifest is built from it."""
        if labels > self.limits.max_classes:
            raise BundleError("classnames", f"{labels} classes exceed this service's limit {self.limits.max_classes}")


def _key(labels: Sequence[str], templates: Sequence[str] | None) -> LabelSet:
    return tuple(labels), tuple(templates or DEFAULT_TEMPLATES)
