"""Every config dataclass the trainer has: the methods' (their fields and metadata are the CLI's method flags)
and the training loop's. Torch-free, so `promptserve-train train --help` builds its flags without loading torch;
each method module (`trainer.methods.*`) re-exports its own config beside its learner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.manifest import CLASS_TOKEN_POSITIONS, FIXED_TOKENS, RLP_FORMATS

EXPORT_DTYPE_NAMES = ("float16", "float32")  # torch dtypes of these names: trainer.methods.base.EXPORT_DTYPES
OPTIMIZERS = ("sgd", "adamw")


def _check_export_dtype(name: str) -> None:
    if name not in EXPORT_DTYPE_NAMES:
        raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPE_NAMES)}, got {name!r}")


# --- text-side prompts -------------------------------------------------------------------------------


@dataclass
class PromptConfig:
    n_ctx: int = field(default=4, metadata={"help": "number of learned context tokens"})
    ctx_init: str | None = field(
        default="a photo of a", metadata={"help": "text whose token embeddings start the context; '' = N(0, init_std)"}
    )
    class_token_position: str = field(
        default="end", metadata={"help": "where the class name goes", "choices": CLASS_TOKEN_POSITIONS}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random init when ctx_init is None"})

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be ≥ 1, got {self.n_ctx}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {self.class_token_position!r}"
            )


@dataclass
class CoOpConfig(PromptConfig):
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the exported ctx",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_export_dtype(self.export_dtype)


@dataclass
class QuantizerConfig:
    bits: int = field(default=1, metadata={"help": "bits per prompt value, 1..8 (2^bits centroids)"})
    min_steps: int = field(default=10, metadata={"help": "t: fewest steps between two clusterings"})
    kl_threshold: float = field(
        default=0.001, metadata={"help": "T_KL per degree of freedom: re-cluster when KL > kl_threshold·(2^b − 1)"}
    )
    kmeans_iters: int = field(default=25, metadata={"help": "Lloyd iterations per clustering"})

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, got {self.bits}")
        if self.min_steps < 0 or self.kl_threshold < 0:
            raise ValueError("min_steps and kl_threshold must be ≥ 0")

    @property
    def effective_kl_threshold(self) -> float:
        """T_KL at this bit width: the per-degree-of-freedom threshold times 2^b − 1 (see trainer.methods.quantizer)."""
        return self.kl_threshold * (2**self.bits - 1)


@dataclass
class QPromptConfig(PromptConfig):
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig, metadata={"help": "bits, t, T_KL"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)


@dataclass
class RLPConfig(PromptConfig):
    rank: int = field(default=1, metadata={"help": "rank r of the update A·B"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the low-rank branch (training only)"})
    factor_std: float | None = field(default=None, metadata={"help": "std of B's init (A is 0); None = 1/sqrt(d)"})
    init_seed: int = field(default=1, metadata={"help": "seed of B's random init", "cli": False})  # from --seed
    export_format: str = field(default="factorized", metadata={"help": "'factorized' (A, B fp16) or 'merged' ctx",
                                                               "choices": RLP_FORMATS})
    export_dtype: str = field(default="float32", metadata={"help": "dtype of the merged ctx",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init:
            raise ValueError("RLP starts from a hand-written prompt: set ctx_init (e.g. 'a photo of a')")
        if not 1 <= self.rank <= self.n_ctx:
            raise ValueError(f"rank must be from 1 to n_ctx={self.n_ctx}, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.export_format not in RLP_FORMATS:
            raise ValueError(f"export_format must be one of {list(RLP_FORMATS)}, got {self.export_format!r}")
        _check_export_dtype(self.export_dtype)


# --- deep (vision-side) prompts ----------------------------------------------------------------------


@dataclass
class MaPLeConfig(PromptConfig):
    n_ctx: int = field(default=2, metadata={"help": "prompt tokens per layer and tower"})
    depth: int = field(default=9, metadata={"help": "J: layers that get prompts (clamped to the towers' depth)"})
    deep_std: float = field(default=0.02, metadata={"help": "std of the deep text prompts' N(0, std) init"})
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the merged prompts",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {self.depth}")
        if self.class_token_position != "end":
            raise ValueError("MaPLe puts the class name after the context: class_token_position must be 'end'")
        if self.ctx_init and len(self.ctx_init.split()) < self.n_ctx:
            raise ValueError(f"ctx_init {self.ctx_init!r} has fewer than n_ctx={self.n_ctx} words")
        _check_export_dtype(self.export_dtype)


@dataclass
class QMaPLeConfig(MaPLeConfig):
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(bits=4),
                                       metadata={"help": "bits (default 4), t, T_KL"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)


# --- image-conditioned prompts -----------------------------------------------------------------------

CATEGORY_TEMPLATE = "a photo of a {}."
# The reference's optimizer: AdamW (eps 1e-7, wd 1e-4), batch 8, 100 warm-up steps at 1e-5, cosine.
TGPT_TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 1e-4, "adam_eps": 1e-7,
                       "warmup_steps": 100, "batch_size": 8}


@dataclass
class TGPTConfig:
    category_queries: int = field(default=32, metadata={"help": "category prompt rows (nq + 3 ≤ context length)"})
    content_queries: int = field(default=64, metadata={"help": "content prompt rows (nq + 3 ≤ context length)"})
    heads: int = field(default=8, metadata={"help": "self-attention heads of each Bonder"})
    ctx_init: str | None = field(default="a photo of a", metadata={"help": "text whose embeddings start the "
                                                                           "first category queries"})
    init_std: float = field(default=0.02, metadata={"help": "std of the queries' N(0, std) init"})
    label_smoothing: float = field(default=0.1, metadata={"help": "of the token cross-entropy"})
    vocab_chunk: int = field(default=8192, metadata={"help": "vocabulary rows per chunk of the token loss"})
    templates: tuple[str, ...] = field(default=(CATEGORY_TEMPLATE,), metadata={"help": "zero-shot head init"})
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the exported tensors",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        if self.category_queries < 1 or self.content_queries < 1:
            raise ValueError("category_queries and content_queries must be ≥ 1")
        if not 0 <= self.label_smoothing < 1 or self.vocab_chunk < 1:
            raise ValueError("label_smoothing must be in [0, 1) and vocab_chunk ≥ 1")
        _check_export_dtype(self.export_dtype)
        self.templates = tuple(self.templates)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("templates must be a non-empty list, each with exactly one '{}'")

    def check_context(self, context_length: int) -> None:
        for name in ("category_queries", "content_queries"):
            count = getattr(self, name)
            if count + FIXED_TOKENS > context_length:
                raise ValueError(
                    f"{name} = {count}: the prompt [SOT, {count} rows, '.', EOT] needs {count + FIXED_TOKENS} tokens "
                    f"but the text tower's context length is {context_length}; use at most "
                    f"{context_length - FIXED_TOKENS} (e.g. 8 category / 24 content queries on a 32-token tower)")


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
