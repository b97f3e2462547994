"""`promptserve-train`: train a prompt bundle, evaluate one on a dataset split, or inspect one.

    promptserve-train train --method coop --data $DATA/oxford_pets --shots 16 --protocol base2novel \\
        --model ViT-B-16 --pretrained openai --output pets-coop.safetensors
    promptserve-train train --method tgpt --data $DATA/oxford_pets --descriptions pets-captions.tsv \\
        --model ViT-B-16 --pretrained openai --output pets-tgpt.safetensors
    promptserve-train eval --bundle pets-coop.safetensors --data $DATA/oxford_pets --protocol base2novel
    promptserve-train inspect pets-coop.safetensors

This module parses arguments only; `trainer.run` runs the commands. torch and open_clip are imported inside the
runs that use them (and the method flags are added to the `train` parser only when `train` is parsed), so
`--help` answers without loading either.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from trainer import run
from trainer.data import LAYOUTS, DataError


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # the summary's seconds are wall-clock, from here
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = args.run(args)
    except (DataError, ValueError, OSError) as exc:  # BundleError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.report(args, result))
    return 0


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
    _add_verbose(parser, default=False)
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_LazyParser)
    commands.add_parser("train", help="learn a prompt bundle on a few-shot dataset", populate=_add_train,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Method options apply to the methods in [brackets]; the defaults are each "
                                    "method's own recipe (its reference paper's).")
    commands.add_parser("eval", help="accuracy of a bundle on a dataset split", populate=_add_eval)
    inspect = commands.add_parser("inspect", help="a bundle's manifest, size and parameter count")
    _add_verbose(inspect)
    inspect.add_argument("bundle")
    inspect.set_defaults(run=run.inspect_bundle, report=run.json_report)
    return parser


def _add_verbose(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """-v before or after the command (a command's own -v leaves the top-level value alone when absent)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log per-epoch loss/accuracy")


def _add_data(p: argparse.ArgumentParser) -> None:
    _add_verbose(p)
    p.add_argument("--data", required=True, help="dataset folder (coop, imagefolder) or CSV file")
    p.add_argument("--layout", choices=LAYOUTS, default="coop",
                   help="coop: split_zhou_*.json in --data; imagefolder: train/<class>/, test/<class>/; "
                        "csv: path,label[,split] (default: %(default)s)")
    p.add_argument("--split-file", help="CoOp split_zhou_*.json (default: the one in --data)")
    p.add_argument("--protocol", choices=run.PROTOCOLS, default="all",
                   help="base2novel: train on the first half; crossdataset, domaingen: also score --eval-data "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="seed of the random weights of --random-weights (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; on a busy shared CPU, 1 "
                                               "avoids threads waiting on each other)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_train(p: argparse.ArgumentParser) -> None:
    from trainer.configs import TrainConfig
    from trainer.methods import method_options, trainable
    from trainer.options import add_options, config_options

    methods = trainable()
    _add_data(p)
    group = p.add_argument_group("run")
    group.add_argument("--method", choices=sorted(methods), required=True)
    group.add_argument("--output", required=True, help="bundle file to write (atomically, only on success); the "
                                                     "full results go to OUTPUT.json")
    group.add_argument("--model", default=run.DEFAULT_MODEL, help="open_clip model name (default: %(default)s, the "
                                                              "service's default backbone)")
    group.add_argument("--pretrained", help=f"open_clip tag or checkpoint path (default: {run.DEFAULT_PRETRAINED} "
                                            "with the default --model; other models need it or --random-weights)")
    group.add_argument("--random-weights", action="store_true",
                     help="train on seeded random weights (--weights-seed): for tests and timing only")
    group.add_argument("--shots", type=int, default=16, help="images per class (default: %(default)s)")
    group.add_argument("--seed", type=int, default=1, help="seeds the shots, training and random inits "
                                                         "(default: %(default)s)")
    group.add_argument("--save-split", help="where to save the few-shot split (default: OUTPUT.split.json)")
    group.add_argument("--load-split", help="repeat a run: train on a saved few-shot split")
    group.add_argument("--eval-split", default="test", help="split scored after training, skipped if absent "
                                                          "(default: %(default)s)")
    group.add_argument("--eval-data", action="append", help="crossdataset/domaingen: a target dataset (repeatable)")
    group.add_argument("--eval-layout", choices=LAYOUTS, help="layout of the --eval-data datasets (default: --layout)")
    group.add_argument("--descriptions", help="tgpt: TSV of relative/path<TAB>description[<TAB>class] (paths "
                                            "relative to the TSV's folder)")
    group.add_argument("--allow-missing-descriptions", action="store_true",
                     help="tgpt: train images without a description without the content loss (logged)")
    group.add_argument("--json", action="store_true", help="print the full result as JSON instead of one line")
    train = {k: dataclasses.replace(s, defaults={name: spec.train_defaults.get(k, s.defaults[""])
                                                 for name, spec in methods.items()})  # each method's own recipe
             for k, s in config_options(TrainConfig).items()}
    add_options(p.add_argument_group("training (each method's reference recipe)"), train, owners=len(methods))
    add_options(p.add_argument_group("method options"), method_options(), owners=len(methods))
    p.set_defaults(run=run.train, report=run.train_summary)


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--bundle", required=True)
    p.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    p.add_argument("--pretrained", help="weights path, if not the bundle's recorded tag")
    p.set_defaults(run=run.evaluate_bundle, report=run.json_report)


if __name__ == "__main__":
    sys.exit(main())
