"""Activation: bundle bytes → a ready-to-serve task version, or a BundleError naming why not.

Decode and check the bundle, check it fits the backbone and this service's cost limits, then build its head
(`service.serving.heads`: for text-side methods the class text features, from the version's stored artefact when
it passes verification, else computed). Nothing here touches shared state or storage, so the task manager can
prepare a version before it stores or swaps anything, and decides what to store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from service.bundle.codec import Bundle, decode_bundle
from service.bundle.compat import check_compatible
from service.bundle.manifest import Manifest
from service.core.backbone import Backbone
from service.methods import BundleError
from service.registry.base import bundle_sha256
from service.serving.artefacts import ArtefactKey, ArtefactRejected, decode_features, encode_features
from service.serving.heads import TaskHead, head_class, held_bytes

log = logging.getLogger(__name__)


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
    # Where the head's class text features came from: "artefact" (stored before), "computed" (now: the caller may
    # store them), or "" (a head without them)
    features_from: str = ""
    held_bytes: int = 0  # memory the head holds (what the feature memory budget counts)

    def artefact(self, key: ArtefactKey) -> bytes | None:
        """The artefact to store for this version: its features if computed here, else None."""
        features = getattr(self.head, "text_features", None)
        if self.features_from != "computed" or not isinstance(features, torch.Tensor):
            return None
        return encode_features(features, self.sha256, key)


def prepare(name: str, version: int, data: bytes, backbone: Backbone, limits: BundleLimits,
            artefact: bytes | None = None) -> ActiveTask:
    """Decode, check and build the head of `data` as version `version` of task `name`, with the class text
    features `artefact` holds if it is this version's and backbone's (else they are computed)."""
    bundle = decode_bundle(data)
    check_compatible(bundle, backbone)
    check_cost(bundle, limits)
    sha256 = bundle_sha256(data)
    kind = head_class(bundle)
    stored = None
    if kind.caches_text_features and artefact is not None:
        shape = (len(bundle.classnames), backbone.sizes.embed_dim)
        try:
            stored = decode_features(artefact, sha256, ArtefactKey.of(backbone), shape)
        except ArtefactRejected as exc:
            log.warning("task %s: version %d's stored features are not used (%s); computing them", name, version, exc)
    try:
        head = kind.build(bundle, backbone, stored)
    except BundleError:
        raise
    except ValueError as exc:  # e.g. a class prompt longer than the text context
        raise BundleError("classnames", str(exc)) from exc
    source = "" if not kind.caches_text_features else "artefact" if stored is not None else "computed"
    return ActiveTask(name, version, bundle.manifest, len(data), head, time.time(), sha256, source, held_bytes(head))


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
