"""`promptserve-train`: train a prompt bundle, evaluate one on a dataset split, or inspect one.

    promptserve-train train --method coop --data $DATA/oxford_pets --shots 16 --protocol base2novel \\
        --model ViT-B-16 --pretrained openai --output pets-coop.safetensors
    promptserve-train train --method tgpt --data $DATA/oxford_pets --descriptions pets-captions.tsv \\
        --model ViT-B-16 --pretrained openai --output pets-tgpt.safetensors
    promptserve-train eval --bundle pets-coop.safetensors --data $DATA/oxford_pets --protocol base2novel
    promptserve-train inspect pets-coop.safetensors

torch and open_clip are imported inside the commands that use them (and the method flags are added to the
`train` parser only when `train` is parsed), so `--help` answers without loading either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.data import LAYOUTS, DataError

log = logging.getLogger("promptserve.train")

# crossdataset / domaingen train on every source class (as "all") and also score each --eval-data target:
# crossdataset applies the learned prompt to the target's own classes, domaingen to the same classes in
# another domain (its classes must be ones the bundle knows).
PROTOCOLS = ("all", "base2novel", "crossdataset", "domaingen")
TRANSFER_PROTOCOLS = ("crossdataset", "domaingen")
NO_WEIGHTS = ("--pretrained is missing: pass --pretrained TAG|PATH (an open_clip tag such as openai, or a "
              "checkpoint file) or --random-weights to train on seeded random weights (accuracy at chance)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = args.run(args)
    except (DataError, ValueError, OSError) as exc:  # BundleError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.report(args, result))
    return 0


def _json_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)


# --- train -------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from service.bundle import Bundle, write_bundle
    from trainer.engine import train_cached, train_on_images
    from trainer.fewshot import save_split
    from trainer.methods import METHODS, build_learner, make_config

    started = time.monotonic()
    output = _check_output(Path(args.output))
    _check_method_args(args)
    config = make_config(args.method, **_method_options(args))  # a bad option fails before any data is read
    train_cfg = _train_config(args, METHODS[args.method].train_defaults)
    dataset = _load_dataset(args.data, args.layout, args.split_file)
    targets = _targets(args)
    classnames, train_samples = _training_set(dataset, args)
    backbone = _backbone(args.model, args.pretrained, args.weights_seed, args.device)
    learner = build_learner(args.method, config, backbone, classnames)
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
    result = {"bundle": str(output), "bytes": size, "method": args.method, **metrics,
              "seconds": round(time.monotonic() - started, 2)}
    _report_path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _report_path(output: Path) -> Path:
    """Where a run's full result (history, metrics) goes: OUTPUT.json, next to the bundle."""
    return output.with_name(output.name + ".json")


def _train_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """One line — method, accuracy, bundle bytes, seconds — or the full result with --json."""
    if args.json:
        return _json_report(args, result)
    if "hm" in result:
        accuracy = f"base {result['base']:.1f}% novel {result['novel']:.1f}% HM {result['hm']:.1f}%"
    elif "top1" in result:
        accuracy = f"top-1 {result['top1']:.1f}%"
    else:
        accuracy = f"no {args.eval_split} split scored"
    targets = "".join(f"; {path} top-1 {t['top1']:.1f}%" for path, t in result.get("targets", {}).items())
    return (f"{result['method']}: {accuracy}{targets}; bundle {result['bytes']:,} bytes; {result['seconds']:.1f} s; "
            f"wrote {result['bundle']} (full results: {_report_path(Path(result['bundle']))})")


def _check_method_args(args: argparse.Namespace) -> None:
    if (args.pretrained is None) == (not args.random_weights):
        raise ValueError(NO_WEIGHTS if args.pretrained is None else "--pretrained and --random-weights exclude "
                                                                     "each other: pass one")
    if args.method != "tgpt" and (args.descriptions or args.allow_missing_descriptions):
        raise ValueError("--descriptions and --allow-missing-descriptions are options of --method tgpt")
    if args.method == "tgpt" and args.protocol == "base2novel":
        from trainer.evaluate import TGPT_NO_NOVEL

        raise ValueError(TGPT_NO_NOVEL)
    if args.method == "tgpt" and not (args.descriptions or args.allow_missing_descriptions):
        raise ValueError("--method tgpt trains its content prompt on per-image descriptions: pass --descriptions "
                         "FILE.tsv (relative/path<TAB>description[<TAB>class]) or --allow-missing-descriptions")


def _cached_training_data(learner: Any, backbone: Any, samples: list, args: argparse.Namespace) -> Any:
    """What training reads per step: image features, or (TGP-T) image tokens + pooled features + descriptions."""
    from trainer.descriptions import descriptions_for, read_descriptions
    from trainer.features import encode_samples

    if args.method != "tgpt":
        return encode_samples(backbone, samples, views=args.views, seed=args.seed, progress=args.progress)
    table = read_descriptions(args.descriptions) if args.descriptions else {}
    descriptions = descriptions_for(samples, table, args.allow_missing_descriptions)
    return learner.token_set(samples, descriptions, views=args.views, seed=args.seed, progress=args.progress)


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
    from trainer.methods import METHODS, method_options

    options = {k: getattr(args, k) for k in method_options() if getattr(args, k) is not None}
    if options.get("ctx_init") == "":
        options["ctx_init"] = None  # random N(0, init_std) init
    if "init_seed" in {f.name for f in dataclasses.fields(METHODS[args.method].config)}:
        options["init_seed"] = args.seed  # a method's random init follows the run seed (RLP's factor B)
    return options


def _train_config(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """TrainConfig from the method's defaults under the given flags; warm-up defaults to at most epochs − 1."""
    from trainer.configs import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = defaults | {k: v for k, v in vars(args).items() if k in names and v is not None}
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
    from trainer.evaluate import evaluate, with_classnames

    if protocol == "crossdataset":  # the learned prompt, the target's classes
        bundle = with_classnames(bundle, target.classnames)
    return evaluate(bundle, backbone, target.split(split), progress).top1


# --- eval and inspect --------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from service.bundle import BundleError, read_bundle
    from trainer.evaluate import evaluate, evaluate_base_novel, with_classnames

    bundle = read_bundle(args.bundle)
    ref = bundle.manifest.backbone
    backbone = _backbone(ref.model, args.pretrained or ref.pretrained, args.weights_seed, args.device)
    if backbone.fingerprint != ref.fingerprint:
        raise BundleError("backbone.fingerprint", "these backbone weights are not the ones the bundle was trained on")
    if ref.image_fingerprint is not None and backbone.image_fingerprint != ref.image_fingerprint:
        raise BundleError("backbone.image_fingerprint", "these image-tower weights are not the bundle's")
    dataset = _load_dataset(args.data, args.layout, args.split_file)
    if args.protocol == "base2novel":
        return evaluate_base_novel(bundle, backbone, dataset, args.split, args.progress).as_dict()
    if args.protocol == "crossdataset":
        bundle = with_classnames(bundle, dataset.classnames)
    result = evaluate(bundle, backbone, dataset.split(args.split), args.progress)
    return result.as_dict(bundle.manifest.classnames)


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """The bundle's manifest, sizes and tensor entries, from its header alone (no torch: the tensors' values and
    their per-method shapes are checked where they are used, by `eval` and the service)."""
    from service.bundle_header import METHOD_INFO, TORCH_DTYPE_NAMES, decode_header, maple_shapes

    path = Path(args.bundle)
    header = decode_header(path.read_bytes())
    manifest, layout = header.manifest, header.manifest.prompt
    classes = len(manifest.classnames) if layout.class_specific else 1
    values = classes * layout.n_ctx * layout.ctx_dim  # not the stored tensors: factorized RLP stores factors
    if METHOD_INFO[manifest.method].vision_side:  # deep text prompts (rows 1..J-1) and the vision prompts
        text, vision = maple_shapes(manifest)
        values += math.prod(text) - math.prod(text[1:]) + math.prod(vision)
    return {
        "file_bytes": path.stat().st_size,
        "payload_bytes": header.payload_bytes,
        "prompt_values": values,
        "trainable_parameters": manifest.options.get("trainable_parameters"),
        "tensors": {name: {"dtype": TORCH_DTYPE_NAMES.get(e.dtype, e.dtype), "shape": e.shape}
                    for name, e in header.entries().items()},
        "manifest": json.loads(manifest.to_json()),
    }


def _backbone(model: str, pretrained: str | None, seed: int, device: str) -> Any:
    from service.backbone import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec(model, pretrained, device=device, seed=seed))


# --- arguments ---------------------------------------------------------------------------------------


class _LazyParser(argparse.ArgumentParser):
    """A command parser whose options are added when it first parses, so other commands import no torch."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptserve-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-epoch loss/accuracy")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_LazyParser)
    commands.add_parser("train", help="learn a prompt bundle on a few-shot dataset", populate=_add_train,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Method options apply to the methods in [brackets]; "
                                    "the defaults are each method's own.")
    commands.add_parser("eval", help="accuracy of a bundle on a dataset split", populate=_add_eval)
    inspect = commands.add_parser("inspect", help="a bundle's manifest, size and parameter count")
    inspect.add_argument("bundle")
    inspect.set_defaults(run=run_inspect, report=_json_report)
    return parser


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (coop, imagefolder) or CSV file")
    p.add_argument("--layout", choices=LAYOUTS, default="coop",
                   help="coop: split_zhou_*.json in --data; imagefolder: train/<class>/, test/<class>/; "
                        "csv: path,label[,split] (default: %(default)s)")
    p.add_argument("--split-file", help="CoOp split_zhou_*.json (default: the one in --data)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="all",
                   help="base2novel: train on the first half; crossdataset, domaingen: also score --eval-data "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="seed of the random weights of --random-weights (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")


def _add_train(p: argparse.ArgumentParser) -> None:
    from trainer.configs import TrainConfig
    from trainer.methods import METHODS, method_options
    from trainer.options import add_options, config_options

    _add_data(p)
    run = p.add_argument_group("run")
    run.add_argument("--method", choices=sorted(METHODS), required=True)
    run.add_argument("--output", required=True, help="bundle file to write (atomically, only on success); the "
                                                     "full results go to OUTPUT.json")
    run.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    run.add_argument("--pretrained", help="open_clip tag or checkpoint path (required unless --random-weights)")
    run.add_argument("--random-weights", action="store_true",
                     help="train on seeded random weights (--weights-seed): for tests and timing only")
    run.add_argument("--shots", type=int, default=16, help="images per class (default: %(default)s)")
    run.add_argument("--seed", type=int, default=1, help="seeds the shots, training and random inits "
                                                         "(default: %(default)s)")
    run.add_argument("--views", type=int, default=1, help="cached views per image: 1 clean + K-1 augmented "
                     "(image-tower methods: 1 = clean images, more = a random augmentation every step) "
                     "(default: %(default)s)")
    run.add_argument("--save-split", help="where to save the few-shot split (default: OUTPUT.split.json)")
    run.add_argument("--load-split", help="repeat a run: train on a saved few-shot split")
    run.add_argument("--eval-split", default="test", help="split scored after training, skipped if absent "
                                                          "(default: %(default)s)")
    run.add_argument("--eval-data", action="append", help="crossdataset/domaingen: a target dataset (repeatable)")
    run.add_argument("--eval-layout", choices=LAYOUTS, help="layout of the --eval-data datasets (default: --layout)")
    run.add_argument("--descriptions", help="tgpt: TSV of relative/path<TAB>description[<TAB>class] (paths "
                                            "relative to the TSV's folder)")
    run.add_argument("--allow-missing-descriptions", action="store_true",
                     help="tgpt: train images without a description without the content loss (logged)")
    run.add_argument("--json", action="store_true", help="print the full result as JSON instead of one line")
    train = config_options(TrainConfig)
    for method, entry in METHODS.items():  # a method's own training defaults (TGP-T's AdamW recipe)
        train = {k: dataclasses.replace(s, defaults={**s.defaults, method: entry.train_defaults[k]})
                 if k in entry.train_defaults else s for k, s in train.items()}
    add_options(p.add_argument_group("training"), train)
    add_options(p.add_argument_group("method options"), method_options(), owners=len(METHODS))
    p.set_defaults(run=run_train, report=_train_report)


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--bundle", required=True)
    p.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    p.add_argument("--pretrained", help="weights path, if not the bundle's recorded tag")
    p.set_defaults(run=run_eval, report=_json_report)


if __name__ == "__main__":
    sys.exit(main())
