"""The papers' evaluation protocols as resumable units of work, shared by the reproduction harness
(`bench/paper_table.py`) and the procedural-world benchmarks (`bench/base_to_novel.py`, `bench/tgpt_world.py`).

A *row* is what a table row stands for: a trainer method at a recipe (fitted by `trainer.fit`, exported as the
bundle the service would serve, and scored the service's way), or a baseline scored in-process on frozen image
features (`trainer.baselines`). A *unit* is one row fitted on one seed's shots and scored: base-to-novel (base
classes trained, base and novel test images scored), few-shot (every class), or transfer (train on a source, score
each target: cross-dataset on the target's classes, domain generalisation on the same classes in another domain).
Each unit's result is a small JSON file in a `Store`, written atomically when the unit ends, so an interrupted
run resumes where it stopped; a dataset's test features are encoded once and cached there too, and only when a
unit still needs them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from service.bundle.codec import Bundle
from service.bundle.manifest import build_manifest
from service.core.backbone import Backbone
from service.core.fsio import atomic_write
from service.methods import METHODS, Kind
from service.serving.text_features import text_features
from trainer import baselines
from trainer.configs import recipe
from trainer.data import Dataset, Sample
from trainer.evaluate import predict
from trainer.features import encode_samples
from trainer.fewshot import base_novel_split, sample_few_shot
from trainer.fit import fit
from trainer.methods import make_config
from trainer.metrics import harmonic_mean

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."
BASELINE_VIEWS = 8  # cached views of the shots the feature baselines train on (clean + 7 augmented)


# --- what is scored ---------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Test images labelled by `classnames`; their clean features are encoded on first use (and cached on disk
    at `cache`, so a resumed run encodes nothing twice)."""

    backbone: Backbone
    samples: list[Sample]
    classnames: tuple[str, ...]
    cache: Path | None = None

    @functools.cached_property
    def features(self) -> torch.Tensor:
        if self.cache is not None and self.cache.is_file():
            return safetensors.torch.load_file(str(self.cache))["features"]
        features = encode_samples(self.backbone, self.samples).features[:, 0]
        if self.cache is not None:
            atomic_write(self.cache, safetensors.torch.save({"features": features.contiguous()}))
        return features

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples])

    def top1(self, predictions: torch.Tensor) -> float:
        return 100.0 * (predictions == self.labels).float().mean().item()


class Predictor(Protocol):
    """A fitted row: class indices over `test.classnames` for each test image."""

    @property
    def parameters(self) -> int: ...

    @property
    def payload_bytes(self) -> int: ...

    def predict(self, test: EvalSet) -> torch.Tensor: ...


@dataclass(frozen=True)
class BundlePredictor:
    """A bundle, scored as the service scores it: text-kind bundles by the runtime's product of cached image
    features and class text features; the others through the service's runtime on the images themselves."""

    bundle: Bundle
    backbone: Backbone
    parameters: int = 0

    @property
    def payload_bytes(self) -> int:
        return self.bundle.payload_bytes

    def predict(self, test: EvalSet) -> torch.Tensor:
        bundle = for_classes(self.bundle, test.classnames)
        if bundle.spec.kind is Kind.TEXT:
            return (test.features @ text_features(bundle, self.backbone).T).argmax(dim=-1)
        return predict(bundle, self.backbone, test.samples)


def for_classes(bundle: Bundle, classnames: tuple[str, ...]) -> Bundle:
    """The bundle for other classes: its own prompt, or — for a class-specific context, which has no row for a
    class it was not trained on — the mean of its class contexts, shared."""
    if tuple(classnames) == bundle.classnames:
        return bundle
    if not bundle.prompt.class_specific:
        return bundle.with_classnames(classnames)
    ctx = bundle.tensors["ctx"].float().mean(dim=0)
    manifest = dataclasses.replace(bundle.manifest, classnames=tuple(classnames),
                                   prompt=dataclasses.replace(bundle.prompt, class_specific=False))
    return Bundle(manifest, {"ctx": ctx})


class Head(Protocol):
    @property
    def parameters(self) -> int: ...

    def logits(self, features: torch.Tensor, classnames: tuple[str, ...]) -> torch.Tensor: ...


@dataclass(frozen=True)
class HeadPredictor:
    """A baseline head on the test images' cached features (scored in-process: not a servable bundle)."""

    head: Head
    payload_bytes: int = 0

    @property
    def parameters(self) -> int:
        return self.head.parameters

    def predict(self, test: EvalSet) -> torch.Tensor:
        return self.head.logits(test.features, test.classnames).argmax(dim=-1)


# --- rows -------------------------------------------------------------------------------------------


@dataclass
class Shots:
    """One seed's few-shot training set, with what every row may need of it, computed once."""

    backbone: Backbone
    classnames: tuple[str, ...]
    samples: list[Sample]
    seed: int
    template: str = DEFAULT_TEMPLATE
    descriptions: list[str | None] | None = None
    fitted: dict[str, Predictor] = dataclasses.field(default_factory=dict)  # rows that others derive from

    @functools.cached_property
    def views(self) -> torch.Tensor:
        """[N, K, D] features of the shots, clean + augmented views (the feature baselines train on them)."""
        return encode_samples(self.backbone, self.samples, views=BASELINE_VIEWS, seed=self.seed).features

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples])

    def zero_shot(self) -> baselines.ZeroShot:
        return zero_shot_features(self.backbone, self.template)

    def shots_per_class(self) -> int:
        return len(self.samples) // len(self.classnames)


def zero_shot_features(backbone: Backbone, template: str) -> baselines.ZeroShot:
    """Class names → normalized zero-shot features through `template`, memoized (baselines ask repeatedly)."""

    @functools.lru_cache(maxsize=8)
    def features(classnames: tuple[str, ...]) -> torch.Tensor:
        return text_features(zero_shot_bundle(backbone, classnames, template), backbone)

    return features


def zero_shot_bundle(backbone: Backbone, classnames: tuple[str, ...], template: str = DEFAULT_TEMPLATE) -> Bundle:
    return Bundle(build_manifest("zeroshot", backbone, classnames, options={"templates": [template]}), {})


Row = Callable[[Shots], Predictor]


def zero_shot_row(shots: Shots) -> Predictor:
    return BundlePredictor(zero_shot_bundle(shots.backbone, shots.classnames, shots.template), shots.backbone)


def method_row(method: str, options: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None,
               descriptions: bool = True) -> Row:
    """A trainer method at its recipe (`train` overrides it): fitted, exported, scored as the service would."""

    def fit_row(shots: Shots) -> Predictor:
        given = dict(options or {})
        config = METHODS[method].config
        if config is not None and "init_seed" in {f.name for f in dataclasses.fields(config)}:
            given["init_seed"] = shots.seed  # a method's random init follows the run seed, as in the CLI
        cfg = recipe(method, **{**(train or {}), "seed": shots.seed})
        texts = shots.descriptions if descriptions else None
        fitted = fit(method, make_config(method, **given), cfg, shots.backbone, shots.classnames, shots.samples, texts)
        return BundlePredictor(Bundle(*fitted.learner.export()), shots.backbone, fitted.learner.trainable_parameters())

    return fit_row


def linear_probe(lr: float = 3e-4, steps: int = 100) -> Row:
    """A linear probe on frozen image features, initialised from the zero-shot classifier."""

    def fit_probe(shots: Shots) -> Predictor:
        init = shots.zero_shot()(shots.classnames)
        weights = baselines.fit_linear_probe(shots.views, shots.labels, init, shots.backbone.logit_scale, steps, lr,
                                             seed=shots.seed)
        head = baselines.LinearHead(shots.classnames, weights, shots.backbone.logit_scale, shots.zero_shot())
        shots.fitted["linear probe"] = HeadPredictor(head)
        return shots.fitted["linear probe"]

    return fit_probe


def wise_ft_row(shots: Shots) -> Predictor:
    """WiSE-FT: the linear probe's weights averaged with its zero-shot start (α = 0.5)."""
    probe = shots.fitted.get("linear probe") or linear_probe()(shots)
    assert isinstance(probe, HeadPredictor) and isinstance(probe.head, baselines.LinearHead)
    return HeadPredictor(baselines.wise_ft(probe.head, shots.zero_shot()(shots.classnames)))


def tip_adapter_row(shots: Shots) -> Predictor:
    """Tip-Adapter, α and β searched on a quarter of the shots against a cache of the others."""
    held_out = shots.shots_per_class() // 4
    return HeadPredictor(baselines.tip_adapter(shots.views, shots.labels, shots.classnames,
                                               shots.backbone.logit_scale, shots.zero_shot(), held_out))


def centring_row(shots: Shots) -> Predictor:
    return HeadPredictor(baselines.Centring(shots.views[:, 0].mean(dim=0), shots.backbone.logit_scale,
                                            shots.zero_shot()))


BASELINE_ROWS: dict[str, Row] = {
    "zero-shot CLIP": zero_shot_row,
    "linear probe (ZS init)": linear_probe(),
    "WiSE-FT (probe ⊕ ZS, 0.5)": wise_ft_row,
    "Tip-Adapter": tip_adapter_row,
}


# --- the store --------------------------------------------------------------------------------------


class Store:
    """Unit results (JSON) and cached test features under one folder, for one backbone: resuming reads what is
    there, a unit is written only when it finished."""

    def __init__(self, root: Path, backbone: Backbone):
        self.root = Path(root)
        identity = {"model": backbone.spec.model, "pretrained": backbone.spec.pretrained,
                    "fingerprint": backbone.fingerprint}
        marker = self.root / "backbone.json"
        if marker.is_file() and json.loads(marker.read_text()) != identity:
            raise ValueError(f"{self.root} holds results of another backbone ({marker.read_text().strip()}); "
                             "use another output folder")
        atomic_write(marker, json.dumps(identity).encode())

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*(slug(p) for p in parts))

    def get(self, *parts: str) -> dict[str, Any] | None:
        path = self.path(*parts).with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, result: dict[str, Any], *parts: str) -> dict[str, Any]:
        atomic_write(self.path(*parts).with_suffix(".json"), json.dumps(result, indent=1).encode())
        return result

    def eval_set(self, backbone: Backbone, dataset: str, split: str, samples: list[Sample],
                 classnames: tuple[str, ...]) -> EvalSet:
        return EvalSet(backbone, samples, classnames, self.path("features", f"{dataset}-{split}.safetensors"))


def slug(text: str) -> str:
    """A file-name-safe form of a row, dataset or split name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "_"


@dataclass(frozen=True)
class Task:
    """A dataset as a protocol uses it: its name, the zero-shot template, and its descriptions table (TGP-T)."""

    name: str
    dataset: Dataset
    template: str = DEFAULT_TEMPLATE
    descriptions: Callable[[list[Sample]], list[str | None]] | None = None


def _unit(store: Store, key: tuple[str, ...], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    done = store.get(*key)
    if done is not None:
        log.info("%s: done before, skipped", "/".join(key))
        return done
    return store.put(run(), *key)


def _fitted(row: Row, shots: Shots) -> tuple[Predictor, dict[str, Any]]:
    start = time.perf_counter()
    predictor = row(shots)
    return predictor, {"seconds": round(time.perf_counter() - start, 3), "payload_bytes": predictor.payload_bytes,
                       "parameters": predictor.parameters, "scored": scored_as(predictor)}


def scored_as(predictor: Predictor) -> str:
    """"bundle" (served by the service as it is) or "in-process" (a baseline the service cannot serve)."""
    return "bundle" if isinstance(predictor, BundlePredictor) else "in-process"


IN_PROCESS = ("linear probe (ZS init)", "WiSE-FT (probe ⊕ ZS, 0.5)", "Tip-Adapter", "centring control")


def scored(name: str, unit: Mapping[str, Any]) -> str:
    """How a stored unit was scored (units stored before they recorded it: by the row's name)."""
    return unit.get("scored") or ("in-process" if name in IN_PROCESS else "bundle")


def _shots(task: Task, backbone: Backbone, classnames: tuple[str, ...], samples: list[Sample], seed: int) -> Shots:
    texts = task.descriptions(samples) if task.descriptions else None
    return Shots(backbone, classnames, samples, seed, task.template, texts)


# --- the protocols ------------------------------------------------------------------------------------


def base_to_novel(task: Task, backbone: Backbone, rows: Mapping[str, Row], seeds: list[int], shots: int,
                  store: Store) -> dict[str, list[dict[str, Any]]]:
    """CoOp's base-to-novel protocol: train on `shots` per base class (the first half of the labels), score base
    and novel test images, each half against its own classes; one unit per (row, seed)."""
    data = task.dataset
    base, novel = base_novel_split(data.classnames)
    test = data.split("test")
    base_test = store.eval_set(backbone, task.name, "test-base", base.select(test), base.classnames)
    novel_test = store.eval_set(backbone, task.name, "test-novel", novel.select(test), novel.classnames)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for seed in seeds:
        pool = sample_few_shot(base.select(data.split("train")), shots, seed)
        context = _shots(task, backbone, base.classnames, pool, seed)
        for name, row in rows.items():
            def run(row: Row = row, context: Shots = context) -> dict[str, Any]:
                predictor, facts = _fitted(row, context)
                scores = {"base": base_test.top1(predictor.predict(base_test)),
                          "novel": novel_test.top1(predictor.predict(novel_test))}
                return facts | scores | {"hm": harmonic_mean(scores["base"], scores["novel"])}

            out[name].append(_unit(store, ("base2novel", task.name, name, f"seed{seed}-shots{shots}"), run))
    return out


def few_shot(task: Task, backbone: Backbone, rows: Mapping[str, Row], seeds: list[int], shots: list[int],
             store: Store) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """CoOp's few-shot protocol: every class trained on k shots, top-1 on the test split; one unit per
    (k, row, seed)."""
    data = task.dataset
    test = store.eval_set(backbone, task.name, "test", data.split("test"), data.classnames)
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for k in shots:
        out[k] = {name: [] for name in rows}
        for seed in seeds:
            context = _shots(task, backbone, data.classnames, sample_few_shot(data.split("train"), k, seed), seed)
            for name, row in rows.items():
                def run(row: Row = row, context: Shots = context) -> dict[str, Any]:
                    predictor, facts = _fitted(row, context)
                    return facts | {"top1": test.top1(predictor.predict(test))}

                out[k][name].append(_unit(store, ("fewshot", task.name, name, f"seed{seed}-shots{k}"), run))
    return out


def transfer(protocol: str, source: Task, targets: Mapping[str, Callable[[], Task]], backbone: Backbone,
             rows: Mapping[str, Row], seeds: list[int], shots: int, store: Store) -> dict[str, list[dict[str, Any]]]:
    """Cross-dataset ("crossdataset": the learned prompt on each target's own classes) or domain generalisation
    ("domaingen": the same classes, another domain): train on every source class, score the source's test split
    and each target's. Targets are loaded one at a time (`targets` maps a name to its loader); a row that cannot
    score other classes (an image-conditioned head) scores the source only."""
    data = source.dataset
    tests = {source.name: lambda: store.eval_set(backbone, source.name, "test", data.split("test"), data.classnames)}
    for name, load in targets.items():
        tests[name] = functools.partial(_target_set, store, backbone, name, load)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for seed in seeds:
        context = _shots(source, backbone, data.classnames, sample_few_shot(data.split("train"), shots, seed), seed)
        for name, row in rows.items():
            def run(row: Row = row, context: Shots = context) -> dict[str, Any]:
                predictor, facts = _fitted(row, context)
                scores = {}
                for target, load_set in tests.items():  # one target dataset in memory at a time
                    if target != source.name and not _scores_other_classes(predictor):
                        continue
                    test = load_set()
                    scores[target] = test.top1(predictor.predict(test))
                return facts | {"top1": scores}

            out[name].append(_unit(store, (protocol, source.name, name, f"seed{seed}-shots{shots}"), run))
    return out


def _target_set(store: Store, backbone: Backbone, name: str, load: Callable[[], Task]) -> EvalSet:
    data = load().dataset
    return store.eval_set(backbone, name, "test", data.split("test"), data.classnames)


def _scores_other_classes(predictor: Predictor) -> bool:
    return not isinstance(predictor, BundlePredictor) or predictor.bundle.spec.kind.scores_any_classes
