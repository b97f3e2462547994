"""Few-shot sampling (seeded, saved so a run can be repeated) and the base-to-novel class split."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from service.core.fsio import atomic_write
from trainer.data import DataError, Sample

SPLIT_FORMAT = "promptserve.fewshot-split/1"


def sample_few_shot(samples: list[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` samples per class, drawn with `seed` from each class's path-sorted list."""
    if shots < 1:
        raise DataError(f"shots must be ≥ 1, got {shots}")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s.label, str(s.path))):
        by_class[s.label].append(s)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        pool = by_class[label]
        if len(pool) < shots:
            raise DataError(
                f"class {pool[0].classname!r} has {len(pool)} training images but {shots} shots were asked; "
                "use fewer shots or add images"
            )
        chosen += rng.sample(pool, shots)
    return chosen


def save_split(path: Path, samples: list[Sample], classnames: tuple[str, ...], shots: int, seed: int,
               root: Path) -> None:
    """Record exactly which images a run trained on (atomically), so it can be repeated; paths are kept
    relative to the dataset `root`, so the split still works when the dataset moves to another machine."""
    doc = {
        "format": SPLIT_FORMAT,
        "shots": shots,
        "seed": seed,
        "classnames": list(classnames),
        "train": [[_relative(s.path, root), s.label, s.classname] for s in samples],
    }
    atomic_write(Path(path), json.dumps(doc, indent=1).encode())


def load_split(path: Path, classnames: tuple[str, ...], root: Path) -> list[Sample]:
    """The samples of a saved split (relative paths resolved against the dataset `root`); refuses one
    made for other classes than `classnames`."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the saved few-shot split ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
        raise DataError(f"{path}: not a saved few-shot split (format must be {SPLIT_FORMAT!r})")
    if tuple(doc.get("classnames", ())) != tuple(classnames):
        raise DataError(f"{path}: the saved split was made for other classes than {list(classnames)[:5]}...")
    return [Sample(root / p, label, name) for p, label, name in doc["train"]]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:  # outside the dataset folder (e.g. a CSV naming absolute paths): keep it as it is
        return str(path)


@dataclass(frozen=True)
class ClassSubset:
    """A subset of a dataset's classes, relabelled 0..len-1 in sorted-label order."""

    labels: tuple[int, ...]
    classnames: tuple[str, ...]

    def select(self, samples: list[Sample]) -> list[Sample]:
        index = {old: new for new, old in enumerate(self.labels)}
        return [Sample(s.path, index[s.label], s.classname) for s in samples if s.label in index]


def base_novel_split(classnames: tuple[str, ...]) -> tuple[ClassSubset, ClassSubset]:
    """CoOp/CoCoOp protocol: labels sorted, the first ceil(n/2) are base, the rest novel, each relabelled."""
    n = len(classnames)
    if n < 2:
        raise DataError(f"base-to-novel needs at least 2 classes, the dataset has {n}")
    cut = math.ceil(n / 2)
    base, novel = tuple(range(cut)), tuple(range(cut, n))
    return ClassSubset(base, classnames[:cut]), ClassSubset(novel, classnames[cut:])
