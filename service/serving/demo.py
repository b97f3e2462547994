"""The demo tasks a fresh service starts with, so README command 1 classifies something at once.

Their classes are the two task families of the embedded tiny CLIP's world (trainer/world/families.py).
"""

from __future__ import annotations

import logging

from service.bundle.codec import encode_bundle
from service.bundle.manifest import build_manifest
from service.serving.tasks import TaskManager

log = logging.getLogger(__name__)

DEMO_TASKS = {
    "shapes": ("circle", "ellipse", "square", "triangle", "pentagon", "hexagon", "star", "cross", "plus", "heart",
               "diamond", "ring", "arrow", "crescent", "trapezoid", "semicircle"),
    "colours": ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "navy", "purple", "magenta",
                "pink", "brown", "black", "white", "grey"),
}
DEMO_TEMPLATES = ["a photo of a {}."]


def seed_demo_tasks(tasks: TaskManager) -> None:
    """Publish zero-shot demo tasks when the registry holds no task at all."""
    if tasks.registry.active_versions():
        return
    for name, classnames in DEMO_TASKS.items():
        manifest = build_manifest("zeroshot", tasks.backbone, classnames, options={"templates": DEMO_TEMPLATES})
        tasks.publish(name, encode_bundle(manifest, {}))
    log.info("seeded demo tasks %s", ", ".join(DEMO_TASKS))
