"""The demo task that a fresh service starts with, so README command 1 classifies something at once."""

from __future__ import annotations

import logging

from service.bundle import Manifest, encode_bundle
from service.tasks import TaskManager

log = logging.getLogger(__name__)

DEMO_CLASSES = ("circle", "square", "triangle", "star")
DEMO_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def seed_demo_task(tasks: TaskManager, name: str) -> None:
    """Publish a zero-shot demo task when the registry holds no task at all."""
    if tasks.registry.active_versions():
        return
    manifest = Manifest(
        method="zeroshot",
        backbone=tasks.backbone.ref(),
        classnames=DEMO_CLASSES,
        options={"templates": DEMO_TEMPLATES},
    )
    tasks.publish(name, encode_bundle(manifest, {}))
    log.info("seeded demo task %r with classes %s", name, ", ".join(DEMO_CLASSES))
