"""The training loop's config (its fields and metadata are the CLI's training flags). Torch-free, so
`promptserve-train train --help` builds its flags without loading torch; each method's own config lives with
its spec in `service.methods`, and each method's *recipe* (its reference paper's optimizer, schedule, batch
and length, under the user's flags) is its spec's `train_defaults`.

The defaults here are CoOp's reference recipe (`configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml` in
KaiyangZhou/CoOp: SGD lr 0.002, batch 32, 50 epochs, cosine, 1 constant warm-up epoch at 1e-5, random resized
crop + flip), which QPrompt and RLP build on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from service.methods import method as method_spec

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
WARMUPS = ("constant", "linear")
Warmup = Literal["constant", "linear"]


# --- the training loop -------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    epochs: int = field(default=50, metadata={"help": "passes over the few-shot images"})
    iterations: int | None = field(default=None, metadata={"help": "optimizer steps in all, whatever the epochs "
                                                                    "(TGP-T's reference counts iterations)"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd has momentum 0.9", "choices": OPTIMIZERS})
    lr: float = field(default=0.002, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    warmup: Warmup = field(default="constant", metadata={"help": "constant: warmup_lr throughout the warm-up "
                                                                 "(CoOp, MaPLe); linear: from warmup_lr up to lr "
                                                                 "(TGP-T)", "choices": WARMUPS})
    warmup_epochs: int = field(default=1, metadata={"help": "warm-up length in epochs (the CLI lowers its default "
                                                            "to epochs - 1 when that is fewer)"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "learning rate the warm-up starts at"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up in steps (overrides warmup_epochs)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon (TGP-T uses 1e-7)"})
    views: int = field(default=8, metadata={"help": "training views per image: 0 = a fresh random resized crop + "
                                                    "flip every step (the image tower runs every step, as the "
                                                    "references train); 1 = the clean images only; K > 1 = the "
                                                    "clean view and K-1 augmented views, encoded once per image "
                                                    "(methods that leave the image tower frozen)"})
    crop_scale: float = field(default=0.08, metadata={"help": "smallest share of the image area a random resized "
                                                              "crop keeps (the references' 0.08, for 224-px photos)"})
    holdout: float = field(default=0.0, metadata={"help": "share of each class's shots held out of training to "
                                                          "pick the epoch whose weights are exported, by accuracy "
                                                          "on them (0: keep the last epoch)"})
    seed: int = field(default=1, metadata={"help": "seeds torch, numpy, random and the data order", "cli": False})
    deterministic: bool = field(default=False, metadata={"help": "torch deterministic algorithms"})
    progress: bool = field(default=False, metadata={"help": "show a tqdm progress bar", "cli": False})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {self.warmup!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_epochs < 0:
            raise ValueError("epochs and batch_size must be ≥ 1 and warmup_epochs ≥ 0")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be ≥ 1, got {self.iterations}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs and self.warmup_steps is None:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        if self.views < 0:
            raise ValueError(f"views must be ≥ 0, got {self.views}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")

    def held_out_shots(self, shots: int) -> int:
        """Shots per class held out for selection: ⌊holdout·shots⌋, leaving at least one to train on."""
        return min(int(self.holdout * shots), shots - 1)


def recipe(method: str, **overrides: Any) -> TrainConfig:
    """The method's reference recipe (its spec's `train_defaults` over `TrainConfig`'s, CoOp's) under `overrides`.
    An `epochs` override replaces a recipe counted in iterations (TGP-T's); unless set, the warm-up is lowered to
    epochs − 1 when the run is shorter than it (so one epoch trains)."""
    values = dict(method_spec(method).train_defaults) | overrides
    if "epochs" in overrides and "iterations" not in overrides:
        values.pop("iterations", None)
    epochs = values.get("epochs", TrainConfig.epochs)
    if "warmup_epochs" not in values and TrainConfig.warmup_epochs >= epochs:
        values["warmup_epochs"] = epochs - 1
        log.info("warm-up lowered to %d epoch(s) for %d epoch(s)", epochs - 1, epochs)
    return TrainConfig(**values)


def recipe_table(methods: list[str]) -> str:
    """The methods' recipes as the Markdown table docs/trainer.md shows (a test holds the doc to it)."""
    lines = ["| method | optimizer | lr | batch | length | warm-up | views | checkpoint |", "|" + "---|" * 8]
    for name in methods:
        r = recipe(name)
        length = f"{r.iterations} iterations" if r.iterations else f"{r.epochs} epochs"
        warmup = f"{r.warmup_steps} steps" if r.warmup_steps is not None else f"{r.warmup_epochs} epoch"
        views = {0: "fresh crop + flip every step", 1: "clean"}.get(r.views, f"{r.views} cached (clean + crops)")
        keep = f"best on {r.holdout:.0%} held out" if r.holdout else "last"
        lines.append(f"| {name} | {r.optimizer} (wd {r.weight_decay:g}) | {r.lr:g} | {r.batch_size} | {length} "
                     f"| {r.warmup} from {r.warmup_lr:g}, {warmup} | {views} | {keep} |")
    return "\n".join(lines)
