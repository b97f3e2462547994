"""The demo tasks a fresh service starts with, so README command 1 classifies something at once.

Their classes are the two task families of the embedded tiny CLIP's world (trainer/world/families.py).
"""

from __future__ import annotations

import logging

from service.serving.tasks import TaskManager
from service.serving.zero_shot import ZERO_SHOT, zero_shot_bundle

log = logging.getLogger(__name__)

DEMO_TASKS = {
    "shapes": ("circle", "ellipse", "square", "triangle", "pentagon", "hexagon", "star", "cross", "plus", "heart",
               "diamond", "ring", "arrow", "crescent", "trapezoid", "semicircle"),
    "colours": ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "navy", "purple", "magenta",
                "pink", "brown", "black", "white", "grey"),
}
DEMO_TEMPLATES = ["a photo of a {}."]


def seed_demo_tasks(tasks: TaskManager) -> bool:
    """Store and serve zero-shot demo tasks if the registry never held a task; the registry decides in one
    step, so of several replicas starting together on an empty registry exactly one seeds. True if seeded."""
    bundles = {}
    for name, classnames in DEMO_TASKS.items():
        bundles[name] = (zero_shot_bundle(tasks.backbone, classnames, DEMO_TEMPLATES), ZERO_SHOT.name)
    if not tasks.registry.seed(bundles):
        return False
    for name in bundles:
        tasks.sync(name)
    log.info("seeded demo tasks %s", ", ".join(bundles))
    return True
