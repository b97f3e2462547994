"""What `promptserve-train` runs, once its arguments are parsed: train (data → few-shot split → learner → fit →
evaluate → export), evaluate a bundle, inspect a bundle. Torch and open_clip are imported inside the runs that
use them, so the parser (and `inspect`) answer without loading either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
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
# The service's default backbone (service.config.Settings; a test holds them equal): a bundle trained with the
# defaults loads into a service started with the defaults.
DEFAULT_MODEL, DEFAULT_PRETRAINED = "promptserve-tiny", "world-v1"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
NO_WEIGHTS = ("--pretrained is missing: pass --pretrained TAG|PATH (an open_clip tag such as openai, or a "
              "checkpoint file) or --random-weights to train on seeded random weights (accuracy at chance)")


def json_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)


# --- train -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training run needs but the backbone, checked without torch: a bad flag, path, dataset or
    output fails in well under a second, before any model loads."""

    output: Path
    split_path: Path
    config: Any
    train_cfg: Any
    dataset: Any
    targets: dict[str, Any]
    classnames: tuple[str, ...]
    samples: list
    descriptions: list[str | None]
    pretrained: str | None


def plan(args: argparse.Namespace) -> TrainPlan:
    """The run's checks, in the order a user fixes them: flags, output, weights, data, shots, descriptions."""
    from trainer.methods import make_config

    spec = _check_method_args(args)
    config = make_config(args.method, **_method_options(args))  # a bad option fails before any data is read
    train_cfg = _train_config(args)
    output = check_writable(Path(args.output), "--output")
    split_path = check_writable(Path(args.save_split or f"{output}.split.json"), "--save-split")
    check_writable(_report_path(output), "--output")
    pretrained = _weights(args)
    dataset = _load_dataset(args.data, args.layout, args.split_file)
    targets = _targets(args)
    classnames, samples = _training_set(dataset, args)
    return TrainPlan(output, split_path, config, train_cfg, dataset, targets, classnames, samples,
                     _descriptions(spec, samples, args), pretrained)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """plan (no torch) → backbone → fit → evaluate → export: one training run, its result as a dict."""
    run = plan(args)
    from service.bundle.codec import Bundle, write_bundle
    from trainer.fewshot import save_split
    from trainer.fit import fit

    backbone = _backbone(args.model, run.pretrained, args.weights_seed, args.device, args.threads)
    fitted = fit(args.method, run.config, run.train_cfg, backbone, run.classnames, run.samples, run.descriptions)
    manifest, tensors = fitted.learner.export()
    metrics = _train_metrics(args, fitted, run.train_cfg)
    started = time.perf_counter()
    metrics.update(_test_metrics(Bundle(manifest, tensors), backbone, run.dataset, args))
    metrics.update(_target_metrics(Bundle(manifest, tensors), backbone, run.targets, args))
    metrics["evaluate_seconds"] = round(time.perf_counter() - started, 2)
    save_split(run.split_path, run.samples, run.classnames, args.shots, args.seed, _dataset_root(args))
    size = write_bundle(run.output, dataclasses.replace(manifest, metrics=metrics), tensors)
    result = {"bundle": str(run.output), "bytes": size, "method": args.method, **metrics,
              "seconds": round(time.perf_counter() - getattr(args, "started", started), 2)}
    _report_path(run.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _report_path(output: Path) -> Path:
    """Where a run's full result (history, metrics) goes: OUTPUT.json, next to the bundle."""
    return output.with_name(output.name + ".json")


def train_summary(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """One line — method, accuracy, bundle bytes, wall-clock seconds — or the full result with --json."""
    if args.json:
        return json_report(args, result)
    if "hm" in result:
        accuracy = f"base {result['base']:.1f}% novel {result['novel']:.1f}% HM {result['hm']:.1f}%"
    elif "top1" in result:
        accuracy = f"top-1 {result['top1']:.1f}%"
    else:
        accuracy = f"no {args.eval_split} split scored"
    targets = "".join(f"; {path} top-1 {t['top1']:.1f}%" for path, t in result.get("targets", {}).items())
    kept = f"; kept epoch {result['kept_epoch']} (held-out)" if "kept_epoch" in result else ""
    report = _report_path(Path(result["bundle"]))
    return (f"{result['method']}: {accuracy}{targets}{kept}; bundle {result['bytes']:,} bytes; "
            f"{result['seconds']:.1f} s; wrote {result['bundle']} (full results: {report})")


def check_writable(path: Path, flag: str) -> Path:
    """`path` as a file the run can create or replace: not a folder, inside a folder it may write (or create)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path such as {path}/task.safetensors")
    folder = path.parent
    while not folder.exists():  # atomic_write creates the missing folders: the nearest existing one must allow it
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {folder} (permission denied); choose another path")
    if folder == path.parent:
        try:  # os.access trusts permission bits; a read-only mount or a full disk only shows on writing
            fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot write in {folder} ({exc.strerror}); choose another path") from exc
    return path


def _weights(args: argparse.Namespace) -> str | None:
    """The weights to load: --pretrained, the default model's own tag, or None (--random-weights); a path that
    does not exist is refused here, a tag the model lacks when open_clip loads (`_backbone`)."""
    if args.random_weights:
        return None
    pretrained = args.pretrained or (DEFAULT_PRETRAINED if args.model == DEFAULT_MODEL else None)
    if pretrained is None:
        raise ValueError(NO_WEIGHTS)
    if _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise ValueError(f"--pretrained {pretrained}: no such checkpoint file")
    return pretrained


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in CHECKPOINT_SUFFIXES


def _check_method_args(args: argparse.Namespace) -> MethodSpec[Any]:
    """The method's spec, once the flags that depend on the method agree with it (before torch loads)."""
    spec = method(args.method)
    if args.pretrained is not None and args.random_weights:
        raise ValueError("--pretrained and --random-weights exclude each other: pass one")
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


def _descriptions(spec: MethodSpec[Any], samples: list[Any], args: argparse.Namespace) -> list[str | None]:
    """Each training image's description, if the method trains on them (else all None)."""
    from trainer.descriptions import descriptions_for, read_descriptions

    if not spec.trains_on_descriptions:
        return [None] * len(samples)
    table = read_descriptions(args.descriptions) if args.descriptions else {}
    return descriptions_for(samples, table, args.allow_missing_descriptions)


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


def _train_config(args: argparse.Namespace) -> Any:
    """The method's recipe under the training flags given (`trainer.fit.recipe`)."""
    from trainer.configs import TrainConfig, recipe

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return recipe(args.method, **given)  # --seed and --no-progress fill the fields the CLI does not list


def _train_metrics(args: argparse.Namespace, fitted: Any, cfg: Any) -> dict[str, Any]:
    metrics = {
        "protocol": args.protocol,
        "shots": args.shots,
        "seed": args.seed,
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
        "epochs": [{"loss": round(s.loss, 5), "train_acc": round(s.accuracy, 3)}
                   | ({"held_out_acc": round(s.held_out, 3)} if s.held_out is not None else {})
                   for s in fitted.history],
        "train_seconds": round(fitted.seconds, 2),
    }
    if fitted.held_out:
        metrics |= {"held_out_images": fitted.held_out, "kept_epoch": fitted.kept_epoch}
    return metrics


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
    dataset = _load_dataset(args.data, args.layout, args.split_file)  # data and file checks first: no torch yet
    if not Path(args.bundle).is_file():
        raise ValueError(f"--bundle {args.bundle}: no such file")
    from service.bundle.codec import read_bundle
    from trainer.evaluate import evaluate, evaluate_base_novel

    bundle = read_bundle(args.bundle)
    ref = bundle.manifest.backbone
    backbone = _backbone(ref.model, args.pretrained or ref.pretrained, args.weights_seed, args.device, args.threads)
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


def _backbone(model: str, pretrained: str | None, seed: int, device: str, threads: int | None = None) -> Any:
    import torch

    from service.core.backbone import BackboneSpec, load_backbone

    if threads:
        torch.set_num_threads(threads)
    _check_tag(model, pretrained)
    return load_backbone(BackboneSpec(model, pretrained, device=device, seed=seed))


def _check_tag(model: str, pretrained: str | None) -> None:
    """Refuse, in one line naming the tags the model has, a --pretrained that is neither a file nor its tag."""
    import open_clip

    from service.core.backbone import EMBEDDED_WEIGHTS

    if pretrained is None or Path(pretrained).is_file() or model not in open_clip.list_models():
        return  # random weights, a checkpoint file, or an unknown model (load_backbone names it)
    tags = sorted({t for m, t in EMBEDDED_WEIGHTS if m == model and t} | set(open_clip.list_pretrained_tags_by_model(
        model)))
    if pretrained not in tags:
        raise ValueError(f"--pretrained {pretrained!r}: model {model} has no such tag; its tags: "
                         f"{', '.join(tags) or 'none (pass a checkpoint file)'}")
