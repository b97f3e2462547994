"""`promptserve-train`: train a prompt bundle, evaluate one on a dataset split, or inspect one.

    promptserve-train train --method coop --data $DATA/oxford_pets --shots 16 --protocol base2novel \\
        --model ViT-B-16 --pretrained openai --output pets-coop.safetensors
    promptserve-train train --method tgpt --data $DATA/oxford_pets --descriptions pets-captions.tsv \\
        --model ViT-B-16 --pretrained openai --output pets-tgpt.safetensors
    promptserve-train eval --bundle pets-coop.safetensors --data $DATA/oxford_pets --protocol base2novel
    promptserve-train inspect pets-coop.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from service.backbone import Backbone, BackboneSpec, load_backbone
from service.bundle import Bundle, BundleError, read_bundle, write_bundle
from trainer.data import LAYOUTS, DataError, Dataset, Sample, load_dataset
from trainer.descriptions import descriptions_for, read_descriptions
from trainer.engine import OPTIMIZERS, TrainConfig, train_cached, train_on_images
from trainer.evaluate import TGPT_NO_NOVEL, evaluate, evaluate_base_novel, with_classnames
from trainer.features import encode_samples
from trainer.fewshot import base_novel_split, load_split, sample_few_shot, save_split
from trainer.methods import METHODS, build_learner, make_config

log = logging.getLogger("promptserve.train")

# crossdataset / domaingen train on every source class (as "all") and also score each --eval-data target:
# crossdataset applies the learned prompt to the target's own classes, domaingen to the same classes in
# another domain (its classes must be ones the bundle knows).
PROTOCOLS = ("all", "base2novel", "crossdataset", "domaingen")
TRANSFER_PROTOCOLS = ("crossdataset", "domaingen")
METHOD_FLAGS = ("n_ctx", "ctx_init", "class_token_position", "bits", "min_steps", "kl_threshold", "rank", "dropout",
                "depth", "export_dtype", "category_queries", "content_queries")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = args.run(args)
    except (DataError, BundleError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


# --- train -------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    output = _check_output(Path(args.output))
    _check_method_args(args)
    dataset = load_dataset(args.data, args.layout, args.split_file)
    targets = _targets(args)
    classnames, train_samples = _training_set(dataset, args)
    backbone = _backbone(args.model, args.pretrained, args.weights_seed, args.device)
    config = make_config(args.method, **_method_options(args))
    learner = build_learner(args.method, config, backbone, classnames)
    train_cfg = _train_config(args, METHODS[args.method].train_defaults)
    if learner.needs_image_tower:  # MaPLe: the image tower runs (forward and backward) on every step
        transform = backbone.preprocess if args.views == 1 else None  # --views 1: clean images, as cached
        history = train_on_images(learner, backbone, train_samples, train_cfg, transform)
    else:
        history = train_cached(learner, _cached_training_data(learner, backbone, train_samples, args), train_cfg)
    manifest, tensors = learner.export()
    metrics = _train_metrics(args, history, train_cfg)
    metrics.update(_test_metrics(Bundle(manifest, tensors), backbone, dataset, args))
    metrics.update(_target_metrics(Bundle(manifest, tensors), backbone, targets, args))
    save_split(Path(args.save_split or f"{output}.split.json"), train_samples, classnames, args.shots, args.seed,
               _dataset_root(args))
    size = write_bundle(output, dataclasses.replace(manifest, metrics=metrics), tensors)
    return {"bundle": str(output), "bytes": size, "method": args.method, **metrics}


def _check_method_args(args: argparse.Namespace) -> None:
    if args.method != "tgpt" and (args.descriptions or args.allow_missing_descriptions):
        raise ValueError("--descriptions and --allow-missing-descriptions are options of --method tgpt")
    if args.method == "tgpt" and args.protocol == "base2novel":
        raise ValueError(TGPT_NO_NOVEL)
    if args.method == "tgpt" and not (args.descriptions or args.allow_missing_descriptions):
        raise ValueError("--method tgpt trains its content prompt on per-image descriptions: pass --descriptions "
                         "FILE.tsv (relative/path<TAB>description[<TAB>class]) or --allow-missing-descriptions")


def _cached_training_data(learner: Any, backbone: Backbone, samples: list[Sample], args: argparse.Namespace) -> Any:
    """What training reads per step: image features, or (TGP-T) image tokens + pooled features + descriptions."""
    if args.method != "tgpt":
        return encode_samples(backbone, samples, views=args.views, seed=args.seed, progress=args.progress)
    table = read_descriptions(args.descriptions) if args.descriptions else {}
    descriptions = descriptions_for(samples, table, args.allow_missing_descriptions)
    return learner.token_set(samples, descriptions, views=args.views, seed=args.seed, progress=args.progress)


def _check_output(output: Path) -> Path:
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; give a bundle file path such as {output}/task.safetensors")
    return output


def _training_set(dataset: Dataset, args: argparse.Namespace) -> tuple[tuple[str, ...], list[Sample]]:
    """The classes trained on and the few-shot samples (relabelled to the base half for base2novel)."""
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
    options = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k) is not None}
    if options.get("ctx_init") == "":
        options["ctx_init"] = None  # random N(0, 0.02) init
    if "init_seed" in {f.name for f in dataclasses.fields(METHODS[args.method].config)}:
        options["init_seed"] = args.seed  # a method's random init follows the run seed (RLP's factor B)
    return options


def _train_config(args: argparse.Namespace, defaults: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**(defaults | {k: v for k, v in vars(args).items() if k in names and v is not None}))


def _train_metrics(args: argparse.Namespace, history: list, cfg: TrainConfig) -> dict[str, Any]:
    return {
        "protocol": args.protocol,
        "shots": args.shots,
        "seed": args.seed,
        "views": args.views,
        "train": dataclasses.asdict(cfg),
        "epochs": [{"loss": round(s.loss, 5), "train_acc": round(s.accuracy, 3)} for s in history],
    }


def _test_metrics(bundle: Bundle, backbone: Backbone, dataset: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    if not dataset.splits.get(args.eval_split):
        return {}
    if args.protocol == "base2novel":
        return evaluate_base_novel(bundle, backbone, dataset, args.eval_split, args.progress).as_dict()
    return {"top1": evaluate(bundle, backbone, dataset.split(args.eval_split), args.progress).top1}


def _targets(args: argparse.Namespace) -> dict[str, Dataset]:
    """The --eval-data datasets of a transfer protocol, loaded before training so a bad path fails early."""
    if (args.protocol in TRANSFER_PROTOCOLS) != bool(args.eval_data):
        raise ValueError("--eval-data goes with --protocol crossdataset or domaingen, and they need it")
    return {path: load_dataset(path, args.eval_layout or args.layout) for path in args.eval_data or ()}


def _target_metrics(bundle: Bundle, backbone: Backbone, targets: dict[str, Dataset],
                    args: argparse.Namespace) -> dict[str, Any]:
    if not targets:
        return {}
    return {"targets": {path: {"top1": _transfer_top1(bundle, backbone, target, args.protocol, args.eval_split,
                                                       args.progress)} for path, target in targets.items()}}


def _transfer_top1(bundle: Bundle, backbone: Backbone, target: Dataset, protocol: str, split: str,
                   progress: bool) -> float:
    if protocol == "crossdataset":  # the learned prompt, the target's classes
        bundle = with_classnames(bundle, target.classnames)
    return evaluate(bundle, backbone, target.split(split), progress).top1


# --- eval and inspect --------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    bundle = read_bundle(args.bundle)
    ref = bundle.manifest.backbone
    backbone = _backbone(ref.model, args.pretrained or ref.pretrained, args.weights_seed, args.device)
    if backbone.fingerprint != ref.fingerprint:
        raise BundleError("backbone.fingerprint", "these backbone weights are not the ones the bundle was trained on")
    if ref.image_fingerprint is not None and backbone.image_fingerprint != ref.image_fingerprint:
        raise BundleError("backbone.image_fingerprint", "these image-tower weights are not the bundle's")
    dataset = load_dataset(args.data, args.layout, args.split_file)
    if args.protocol == "base2novel":
        return evaluate_base_novel(bundle, backbone, dataset, args.split, args.progress).as_dict()
    if args.protocol == "crossdataset":
        bundle = with_classnames(bundle, dataset.classnames)
    result = evaluate(bundle, backbone, dataset.split(args.split), args.progress)
    return result.as_dict(bundle.manifest.classnames)


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    bundle = read_bundle(args.bundle)
    layout = bundle.manifest.prompt  # not bundle.context(): a factorized RLP prompt needs the backbone to rebuild
    classes = len(bundle.manifest.classnames) if layout.class_specific else 1
    deep = [t for t in (bundle.deep_text_prompts(), bundle.vision_prompts()) if t is not None]
    return {
        "file_bytes": Path(args.bundle).stat().st_size,
        "payload_bytes": bundle.payload_bytes,
        "prompt_values": classes * layout.n_ctx * layout.ctx_dim + sum(t.numel() for t in deep),
        "trainable_parameters": bundle.manifest.options.get("trainable_parameters"),
        "tensors": {k: {"dtype": str(t.dtype), "shape": list(t.shape)} for k, t in bundle.tensors.items()},
        "manifest": json.loads(bundle.manifest.to_json()),
    }


def _backbone(model: str, pretrained: str | None, seed: int, device: str) -> Backbone:
    return load_backbone(BackboneSpec(model, pretrained, device=device, seed=seed))


# --- arguments ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptserve-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-epoch loss/accuracy")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_train(commands.add_parser("train", help="learn a prompt bundle on a few-shot dataset"))
    _add_eval(commands.add_parser("eval", help="accuracy of a bundle on a dataset split"))
    inspect = commands.add_parser("inspect", help="a bundle's manifest, size and parameter count")
    inspect.add_argument("bundle")
    inspect.set_defaults(run=run_inspect)
    return parser


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (coop, imagefolder) or CSV file")
    p.add_argument("--layout", choices=LAYOUTS, default="coop")
    p.add_argument("--split-file", help="CoOp split_zhou_*.json (default: the one in --data)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="all",
                   help="base2novel: train on the first half; crossdataset, domaingen: also score --eval-data")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of random weights when no --pretrained")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_train(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--method", choices=sorted(METHODS), required=True)
    p.add_argument("--output", required=True, help="bundle file to write (atomically, only on success)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint path (none: seeded random weights)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--views", type=int, default=1, help="cached views per image: 1 clean + K-1 augmented "
                   "(image-tower methods: 1 = clean images, more = a random augmentation every step)")
    p.add_argument("--save-split", help="where to save the few-shot split (default: OUTPUT.split.json)")
    p.add_argument("--load-split", help="repeat a run: train on a saved few-shot split")
    p.add_argument("--eval-split", default="test", help="split scored after training (skipped if absent)")
    p.add_argument("--eval-data", action="append", help="crossdataset/domaingen: a target dataset (repeatable)")
    p.add_argument("--eval-layout", choices=LAYOUTS, help="layout of the --eval-data datasets (default: --layout)")
    for flag, kind in (("n-ctx", int), ("ctx-init", str), ("class-token-position", str), ("bits", int),
                       ("min-steps", int), ("kl-threshold", float), ("rank", int), ("dropout", float),
                       ("depth", int), ("export-dtype", str), ("category-queries", int), ("content-queries", int)):
        p.add_argument(f"--{flag}", type=kind, help="method option (see docs/trainer.md)")
    for flag, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
                       ("warmup-epochs", int), ("warmup-lr", float), ("warmup-steps", int),
                       ("adam-eps", float)):
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--descriptions", help="tgpt: TSV of relative/path<TAB>description[<TAB>class] (paths relative "
                                          "to the TSV's folder)")
    p.add_argument("--allow-missing-descriptions", action="store_true",
                   help="tgpt: train images without a description without the content loss (logged)")
    p.add_argument("--deterministic", action="store_true")
    p.set_defaults(run=run_train)


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--bundle", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--pretrained", help="weights path, if not the bundle's recorded tag")
    p.set_defaults(run=run_eval)


if __name__ == "__main__":
    sys.exit(main())
