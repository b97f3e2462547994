"""The training loop's config (its fields and metadata are the CLI's training flags). Torch-free, so
`promptserve-train train --help` builds its flags without loading torch; each method's own config lives with
its spec in `service.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPTIMIZERS = ("sgd", "adamw")


# --- the training loop -------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata={"help": "passes over the few-shot images"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd has momentum 0.9", "choices": OPTIMIZERS})
    lr: float = field(default=0.002, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    warmup_epochs: int = field(default=1, metadata={"help": "epochs at the constant warm-up rate (the CLI lowers "
                                                            "its default to epochs - 1 when that is fewer)"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "learning rate during warm-up"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up in steps (overrides warmup_epochs)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon (TGP-T uses 1e-7)"})
    seed: int = field(default=1, metadata={"help": "seeds torch, numpy, random and the data order", "cli": False})
    deterministic: bool = field(default=False, metadata={"help": "torch deterministic algorithms"})
    progress: bool = field(default=False, metadata={"help": "show tqdm progress bars", "cli": False})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_epochs < 0:
            raise ValueError("epochs and batch_size must be ≥ 1 and warmup_epochs ≥ 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs and self.warmup_steps is None:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
