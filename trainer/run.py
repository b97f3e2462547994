"""What `promptserve-train` runs, once its arguments are parsed: train (data → few-shot split → learner → fit →
evaluate → export), evaluate a bundle, inspect a bundle. Torch and open_clip are imported inside the runs that
use them, so the parser (and `inspect`) answer without loading either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.methods import METHODS, MethodSpec, method
from trainer.data import DataError

log = logging.getLogger("promptserve.train")

# crossdataset / domaingen train on every source class (as "all") and also score each --eval-data target:
# crossdataset applies the learned prompt to the target's own classes, domaingen to the same classes in
# another domain (its classes must be ones the bundle knows).
PROTOCOLS = ("all", "base2novel", "crossdataset", "domaingen")
TRANSFER_PROTOCOLS = ("crossdataset", "domaingen")
NO_WEIGHTS = ("--pretrained is missing: pass --pretrained TAG|PATH (an open_clip tag such as openai, or a "
              "checkpoint file) or --random-weights to train on seeded random weights (accuracy at chance)")


def json_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)


# --- train -------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict[str, Any]:
    """data → few-shot split → learner → fit → evaluate → export: one training run, its result as a dict."""
    from service.bundle.codec import Bundle, write_bundle
    from trainer.engine import train_cached, train_on_images
    from trainer.fewshot import save_split
    from trainer.methods import build_learner, make_config

    started = time.monotonic()
    output = _check_output(Path(args.output))
    spec = _check_method_args(args)
    config = make_config(args.method, **_method_options(args))  # a bad option fails before any data is read
    train_cfg = _train_config(args, spec.train_defaults)
    dataset = _load_dataset(args.data, args.layout, args.split_file)
    targets = _targets(args)
    classnames, train_samples = _training_set(dataset, args)
    backbone = _backbone(args.model, args.pretrained, args.weights_seed, args.device)
    learner = build_learner(args.method, config, backbone, classnames)
    if learner.needs_image_tower:  # MaPLe: the image tower runs (forward and backward) on every step
        transform = backbone.preprocess if args.views == 1 else None  # --views 1: clean images, as cached
        history = train_on_images(learner, backbone, train_samples, train_cfg, transform)
    else:
        history = train_cached(learner, _cached_training_data(spec, learner, train_samples, args), train_cfg)
    manifest, tensors = learner.export()
    metrics = _train_metrics(args, history, train_cfg)
    metrics.update(_test_metrics(Bundle(manifest, tensors), backbone, dataset, args))
    metrics.update(_target_metrics(Bundle(manifest, tensors), backbone, targets, args))
    save_split(Path(args.save_split or f"{output}.split.json"), train_samples, classnames, args.shots, args.seed,
               _dataset_root(args))
    size = write_bundle(output, dataclasses.replace(manifest, metrics=metrics), tensors)
    result = {"bundle": str(output), "bytes": size, "method": args.method, **metrics,
              "seconds": round(time.monotonic() - started, 2)}
    _report_path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _report_path(output: Path) -> Path:
    """Where a run's full result (history, metrics) goes: OUTPUT.json, next to the bundle."""
    return output.with_name(output.name + ".json")


def train_summary(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """One line — method, accuracy, bundle bytes, seconds — or the full result with --json."""
    if args.json:
        return json_report(args, result)
    if "hm" in result:
        accuracy = f"base {result['base']:.1f}% novel {result['novel']:.1f}% HM {result['hm']:.1f}%"
    elif "top1" in result:
        accuracy = f"top-1 {result['top1']:.1f}%"
    else:
        accuracy = f"no {args.eval_split} split scored"
    targets = "".join(f"; {path} top-1 {t['top1']:.1f}%" for path, t in result.get("targets", {}).items())
    return (f"{result['method']}: {accuracy}{targets}; bundle {result['bytes']:,} bytes; {result['seconds']:.1f} s; "
            f"wrote {result['bundle']} (full results: {_report_path(Path(result['bundle']))})")


def _check_method_args(args: argparse.Namespace) -> MethodSpec[Any]:
    """The method's spec, once the flags that depend on the method agree with it (before torch loads)."""
    spec = method(args.method)
    if (args.pretrained is None) == (not args.random_weights):
        raise ValueError(NO_WEIGHTS if args.pretrained is None else "--pretrained and --random-weights exclude "
                                                                     "each other: pass one")
    describing = bool(args.descriptions or args.allow_missing_descriptions)
    if describing and not spec.trains_on_descriptions:
        raise ValueError("--descriptions and --allow-missing-descriptions are options of --method "
                         f"{' or '.join(_describing_methods())}, whose content prompts learn from descriptions")
    refusal = spec.novel_classes_refusal()
    if refusal is not None and args.protocol == "base2novel":
        raise ValueError(refusal)
    if spec.trains_on_descriptions and not describing:
        raise ValueError(f"--method {args.method} trains its content prompt on per-image descriptions: pass "
                         "--descriptions FILE.tsv (relative/path<TAB>description[<TAB>class]) or "
                         "--allow-missing-descriptions")
    return spec


def _describing_methods() -> list[str]:
    return sorted(name for name, spec in METHODS.items() if spec.trains_on_descriptions)


def _cached_training_data(spec: MethodSpec[Any], learner: Any, samples: list[Any], args: argparse.Namespace) -> Any:
    """What training reads per step (image features, or image tokens), with the images' descriptions if the
    method trains on them."""
    from trainer.descriptions import descriptions_for, read_descriptions

    descriptions: list[str | None] = [None] * len(samples)
    if spec.trains_on_descriptions:
        table = read_descriptions(args.descriptions) if args.descriptions else {}
        descriptions = descriptions_for(samples, table, args.allow_missing_descriptions)
    return learner.training_set(samples, descriptions, views=args.views, seed=args.seed, progress=args.progress)


def _check_output(output: Path) -> Path:
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; give a bundle file path such as {output}/task.safetensors")
    return output


def _load_dataset(data: str, layout: str, split_file: str | None = None) -> Any:
    """The dataset; a folder given as CoOp layout (the default) without its split file suggests imagefolder."""
    from trainer.data import find_split_file, load_dataset

    if layout == "coop" and split_file is None and Path(data).is_dir():
        try:
            find_split_file(Path(data))
        except DataError as exc:
            raise DataError(f"{exc}; if {data} holds class folders (train/<class>/*.jpg, test/<class>/...), "
                            "pass --layout imagefolder") from exc
    return load_dataset(data, layout, split_file)


def _training_set(dataset: Any, args: argparse.Namespace) -> tuple[tuple[str, ...], list]:
    """The classes trained on and the few-shot samples (relabelled to the base half for base2novel)."""
    from trainer.fewshot import base_novel_split, load_split, sample_few_shot

    classnames, pool = dataset.classnames, dataset.split("train")
    if args.protocol == "base2novel":
        base, _ = base_novel_split(dataset.classnames)
        classnames, pool = base.classnames, base.select(pool)
    if args.load_split:
        return classnames, load_split(Path(args.load_split), classnames, _dataset_root(args))
    return classnames, sample_few_shot(pool, args.shots, args.seed)


def _dataset_root(args: argparse.Namespace) -> Path:
    """The folder saved splits are relative to: the dataset folder (or the CSV file's folder)."""
    data = Path(args.data)
    return data.parent if data.is_file() else data


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags given (make_config refuses, by name, those the method does not have)."""
    from trainer.methods import method_options

    options = {k: getattr(args, k) for k in method_options() if getattr(args, k) is not None}
    if options.get("ctx_init") == "":
        options["ctx_init"] = None  # random N(0, init_std) init
    config = method(args.method).config
    if config is not None and "init_seed" in {f.name for f in dataclasses.fields(config)}:
        options["init_seed"] = args.seed  # a method's random init follows the run seed (RLP's factor B)
    return options


def _train_config(args: argparse.Namespace, defaults: Mapping[str, Any]) -> Any:
    """TrainConfig from the method's defaults under the given flags; warm-up defaults to at most epochs − 1."""
    from trainer.configs import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(defaults) | {k: v for k, v in vars(args).items() if k in names and v is not None}
    epochs = values.get("epochs", TrainConfig.epochs)
    if "warmup_epochs" not in values and TrainConfig.warmup_epochs >= epochs:
        values["warmup_epochs"] = epochs - 1  # so --epochs 1 trains: the warm-up must leave an epoch of schedule
        log.info("warm-up lowered to %d epoch(s) for --epochs %d", epochs - 1, epochs)
    return TrainConfig(**values)


def _train_metrics(args: argparse.Namespace, history: list, cfg: Any) -> dict[str, Any]:
    return {
        "protocol": args.protocol,
        "shots": args.shots,
        "seed": args.seed,
        "views": args.views,
        "train": dataclasses.asdict(cfg),
        "epochs": [{"loss": round(s.loss, 5), "train_acc": round(s.accuracy, 3)} for s in history],
    }


def _test_metrics(bundle: Any, backbone: Any, dataset: Any, args: argparse.Namespace) -> dict[str, Any]:
    from trainer.evaluate import evaluate, evaluate_base_novel

    if not dataset.splits.get(args.eval_split):
        return {}
    if args.protocol == "base2novel":
        return evaluate_base_novel(bundle, backbone, dataset, args.eval_split, args.progress).as_dict()
    return {"top1": evaluate(bundle, backbone, dataset.split(args.eval_split), args.progress).top1}


def _targets(args: argparse.Namespace) -> dict[str, Any]:
    """The --eval-data datasets of a transfer protocol, loaded before training so a bad path fails early."""
    if (args.protocol in TRANSFER_PROTOCOLS) != bool(args.eval_data):
        raise ValueError("--eval-data goes with --protocol crossdataset or domaingen, and they need it")
    return {path: _load_dataset(path, args.eval_layout or args.layout) for path in args.eval_data or ()}


def _target_metrics(bundle: Any, backbone: Any, targets: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if not targets:
        return {}
    return {"targets": {path: {"top1": _transfer_top1(bundle, backbone, target, args.protocol, args.eval_split,
                                                       args.progress)} for path, target in targets.items()}}


def _transfer_top1(bundle: Any, backbone: Any, target: Any, protocol: str, split: str, progress: bool) -> float:
    from trainer.evaluate import evaluate

    if protocol == "crossdataset":  # the learned prompt, the target's classes
        bundle = bundle.with_classnames(target.classnames)
    return evaluate(bundle, backbone, target.split(split), progress).top1


# --- eval and inspect --------------------------------------------------------------------------------


def evaluate_bundle(args: argparse.Namespace) -> dict[str, Any]:
    """A bundle's accuracy on a dataset split, on the backbone it names (checked to be the one it was made for)."""
    from service.bundle.codec import read_bundle
    from trainer.evaluate import evaluate, evaluate_base_novel

    bundle = read_bundle(args.bundle)
    ref = bundle.manifest.backbone
    backbone = _backbone(ref.model, args.pretrained or ref.pretrained, args.weights_seed, args.device)
    dataset = _load_dataset(args.data, args.layout, args.split_file)
    if args.protocol == "base2novel":
        return evaluate_base_novel(bundle, backbone, dataset, args.split, args.progress).as_dict()
    if args.protocol == "crossdataset":
        bundle = bundle.with_classnames(dataset.classnames)
    result = evaluate(bundle, backbone, dataset.split(args.split), args.progress)
    return result.as_dict(bundle.manifest.classnames)


def inspect_bundle(args: argparse.Namespace) -> dict[str, Any]:
    """The bundle's manifest, sizes and tensor entries, from its header alone (no torch: the tensors' values and
    their per-method shapes are checked where they are used, by `eval` and the service)."""
    from service.bundle.header import TORCH_DTYPE_NAMES, decode_header

    path = Path(args.bundle)
    header = decode_header(path.read_bytes())
    manifest = header.manifest
    return {
        "file_bytes": path.stat().st_size,
        "payload_bytes": header.payload_bytes,
        "prompt_values": header.spec.prompt_values(header),  # served form: factorized RLP stores factors
        "trainable_parameters": manifest.options.get("trainable_parameters"),
        "tensors": {name: {"dtype": TORCH_DTYPE_NAMES.get(e.dtype, e.dtype), "shape": e.shape}
                    for name, e in header.entries().items()},
        "manifest": json.loads(manifest.to_json()),
    }


def _backbone(model: str, pretrained: str | None, seed: int, device: str) -> Any:
    from service.core.backbone import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec(model, pretrained, device=device, seed=seed))
