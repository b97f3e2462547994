"""Activation: bundle bytes → a ready-to-serve task version, or a BundleError naming why not.

Decode and check the bundle, check it fits the backbone and this service's cost limits, then build its head
(`service.serving.heads`: for text-side methods the class text features, computed once). Nothing here touches
shared state, so the task manager can prepare a version before it stores or swaps anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.bundle.codec import Bundle, decode_bundle
from service.bundle.compat import check_compatible
from service.bundle.manifest import Manifest
from service.core.backbone import Backbone
from service.methods import BundleError
from service.registry.base import bundle_sha256
from service.serving.heads import TaskHead, build_head


@dataclass(frozen=True)
class BundleLimits:
    """What this service agrees to serve, beyond what the bundle format allows (cost of activation)."""

    max_classes: int = 2000
    max_classname_chars: int = 200
    max_template_chars: int = 300
    max_templates: int = 64
    max_text_prompts: int = 20_000


@dataclass(frozen=True)
class ActiveTask:
    """One prepared version of a task: what answers a request for it."""

    name: str
    version: int
    manifest: Manifest
    bundle_bytes: int
    head: TaskHead
    activated_at: float
    sha256: str = ""  # of the bundle bytes: a replica tells versions apart by content, not only by number


def prepare(name: str, version: int, data: bytes, backbone: Backbone, limits: BundleLimits) -> ActiveTask:
    """Decode, check and build the head of `data` as version `version` of task `name`."""
    bundle = decode_bundle(data)
    check_compatible(bundle, backbone)
    check_cost(bundle, limits)
    try:
        head = build_head(bundle, backbone)
    except BundleError:
        raise
    except ValueError as exc:  # e.g. a class prompt longer than the text context
        raise BundleError("classnames", str(exc)) from exc
    return ActiveTask(name, version, bundle.manifest, len(data), head, time.time(), bundle_sha256(data))


def check_cost(bundle: Bundle, limits: BundleLimits) -> None:
    """Refuse bundles whose activation would cost more than this service allows (classes × templates)."""
    classes = len(bundle.classnames)
    if classes > limits.max_classes:
        raise BundleError("classnames", f"{classes} classes exceed this service's limit {limits.max_classes}")
    longest = max(len(name) for name in bundle.classnames)
    if longest > limits.max_classname_chars:
        raise BundleError("classnames", f"a class name of {longest} characters exceeds this service's limit "
                          f"{limits.max_classname_chars}")
    templates = bundle.spec.templates(bundle)
    if len(templates) > limits.max_templates:
        raise BundleError("options.templates", f"{len(templates)} templates exceed this service's limit "
                          f"{limits.max_templates}")
    if any(len(t) > limits.max_template_chars for t in templates):
        raise BundleError("options.templates", f"templates are limited to {limits.max_template_chars} characters")
    if classes * max(len(templates), 1) > limits.max_text_prompts:
        raise BundleError("options.templates", f"{classes} classes × {len(templates)} templates exceed this "
                          f"service's limit of {limits.max_text_prompts} prompts to encode")
