"""The frozen open_clip backbone: loading, identity (fingerprints), sizes, and its three image forwards.

The backbone is loaded once per process and shared by every task. Its fingerprint hashes the text
tower's weights so that a bundle trained against other weights is refused instead of silently
producing wrong answers. Every image forward goes through it: the plain one (on the chosen backend), the
prompted one (vision-side prompts, torch) and the one that also returns the image tokens (image-conditioned
prompts, torch). The plain forward may run in bf16 or int8 on CPU once it has passed the agreement check against
fp32 (`service.core.precision`); the prompted and token forwards always run in fp32 (fp16 on CUDA).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from service.core.image_encoders import (
    IMAGE_BACKENDS,
    ImageEncoder,
    OnnxImageEncoder,
    TorchImageEncoder,
    export_onnx,
    quantize_int8,
)
from service.core.open_clip_compat import (
    ClipModel,
    deep_prompt_depth_limit,
    image_tower_width,
    prompt_capable_vit,
    text_cast_dtype,
    text_embed_dim,
    vit_pooled_and_tokens,
)
from service.core.precision import (
    IMAGE_PRECISIONS,
    INT8_FLAGS,
    PrecisionChoice,
    PrecisionTrial,
    agreement,
    calibration_images,
    calibration_labels,
    cpu_flags,
    fast_precisions,
    timed_features,
)
from service.core.records import BackboneRef, BackboneSizes
from service.core.text_encoder import PromptTextEncoder

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parents[1] / "assets"
# The embedded tiny CLIP (trainer/world/pretrain.py made it); open_clip names a config file by its stem.
open_clip.add_model_config(ASSETS / "tiny_clip" / "promptserve-tiny.json")

# Weights shipped inside the package, by (model, tag): a bundle records the tag, never a local path.
EMBEDDED_WEIGHTS: dict[tuple[str, str | None], Path] = {
    ("promptserve-tiny", "world-v1"): ASSETS / "tiny_clip" / "weights.safetensors",
}


@dataclass(frozen=True)
class BackboneSpec:
    """Which open_clip model to load.

    `pretrained` is an open_clip tag (e.g. "openai"), an embedded tag (`EMBEDDED_WEIGHTS`), a local
    checkpoint path, or None for random weights drawn from `seed` (deterministic, so restarts keep the
    same fingerprint).
    """

    model: str
    pretrained: str | None = None
    device: str = "auto"
    seed: int = 0
    image_backend: str = "torch"
    image_precision: str = "fp32"  # the service's setting defaults to auto (service/config.py)
    onnx_cache_dir: str = "var/onnx"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def text_tower_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every non-vision weight (names, shapes and fp32 values), in name order."""
    return _fingerprint(model, lambda name: not name.startswith("visual."))


def image_tower_fingerprint(model: torch.nn.Module) -> str:
    return _fingerprint(model, lambda name: name.startswith("visual."))


def _fingerprint(model: torch.nn.Module, include: Callable[[str], bool]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not include(name):
            continue
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class ImageTokens:
    """One image forward's outputs for image-conditioned prompts: normalized features (as `encode_images`
    gives them), and on the backbone's device the raw pooled features and the projected tokens."""

    features: torch.Tensor  # [B, D] L2-normalized, float32, CPU
    pooled: torch.Tensor  # [B, D] unnormalized
    tokens: torch.Tensor  # [B, T, width] every last-block token projected before ln_post


class Backbone:
    """A frozen open_clip model with its tokenizer, image transform and prompt-aware text encoder."""

    def __init__(self, spec: BackboneSpec, model: ClipModel, preprocess: Any, tokenizer: Any):
        self.spec = spec
        self.fingerprint = text_tower_fingerprint(model)
        self.device = resolve_device(spec.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.text = PromptTextEncoder(self.model, tokenizer)
        # Forwards with prompts or tokens always run in torch; the plain one runs on the chosen backend and precision.
        self.torch_image_encoder = TorchImageEncoder(self.model.visual, self.device)
        self.image_encoder, self.precision_choice = self._image_encoder()
        # What the plain image forward computes in, as a plain string (fp32, bf16, int8; fp16 on CUDA): stored image
        # features are only comparable between equal precisions.
        self.image_precision: str = self.image_encoder.precision

    def _image_encoder(self) -> tuple[ImageEncoder, PrecisionChoice]:
        backend, precision = self.spec.image_backend, self.spec.image_precision
        if backend not in IMAGE_BACKENDS:
            raise ValueError(f"image backend {backend!r} is unknown; choose one of {list(IMAGE_BACKENDS)}")
        if precision not in IMAGE_PRECISIONS:
            raise ValueError(f"image precision {precision!r} is unknown; choose one of {list(IMAGE_PRECISIONS)}")
        if self.device.type != "cpu":
            return self._cuda_image_encoder(backend, precision)
        runs_on = {"bf16": "torch", "int8": "onnx"}  # the one backend with native kernels for each
        if backend not in ("auto", runs_on.get(precision, backend)):
            raise ValueError(f"the {precision} image precision runs on the {runs_on[precision]} image backend; set "
                             f"the image backend to {runs_on[precision]} or auto")
        # fp32 (and the fallback) on ONNX Runtime unless torch was asked for: it keeps more of its speed under HTTP
        # load on CPU (docs/serving.md).
        fp32: ImageEncoder = self.torch_image_encoder if backend == "torch" else OnnxImageEncoder(self._onnx_export())
        if precision == "fp32":
            return fp32, PrecisionChoice(precision, fp32.precision)
        candidates = [precision] if precision != "auto" else [
            p for p in fast_precisions(cpu_flags()) if backend in ("auto", runs_on[p])]
        if not candidates:
            log.info("image precision auto: this CPU has no native int8 or bf16 kernels for the %s backend, so fp32",
                     backend)
            return fp32, PrecisionChoice(precision, fp32.precision)
        return self._checked_image_encoder(fp32, candidates, precision)

    def _cuda_image_encoder(self, backend: str, precision: str) -> tuple[ImageEncoder, PrecisionChoice]:
        if backend == "onnx":
            raise ValueError("the onnx image backend runs on CPU; use the torch backend on CUDA")
        if precision in ("bf16", "int8"):
            raise ValueError(f"the {precision} image precision is for CPU; on CUDA the image encoder runs fp16 (auto) "
                             "or fp32")
        encoder = self.torch_image_encoder if precision == "auto" else TorchImageEncoder(
            self.model.visual, self.device, torch.float32)
        return encoder, PrecisionChoice(precision, encoder.precision)

    def _checked_image_encoder(self, fp32: ImageEncoder, candidates: list[str], requested: str
                               ) -> tuple[ImageEncoder, PrecisionChoice]:
        """The first candidate precision that agrees with fp32 on the calibration set, else fp32. Its speed in the
        check is reported, not decisive: a timing taken once, under whatever load, would let replicas of one
        fleet pick differently and answer differently. Each trial is logged; the choice keeps them for /readyz."""
        pixels = torch.stack([self.preprocess(image) for image in calibration_images()])
        with torch.inference_mode():
            classes = F.normalize(self.text.encode_texts(calibration_labels()).float(), dim=-1).cpu()
        reference, fp32_seconds = timed_features(fp32, pixels)
        trials = []
        for precision in candidates:
            try:
                encoder = self._reduced_image_encoder(precision)
                features, seconds = timed_features(encoder, pixels)
            except Exception as error:  # a quantizer or runtime that fails must not stop the service: fp32 serves
                first_line = (str(error).strip().splitlines() or [""])[0][:300]  # runtime errors run to pages
                trials.append(PrecisionTrial(precision, False, f"could not run: {type(error).__name__}: {first_line}"))
                log.warning("image precision %s", trials[-1].summary())
                continue
            measured, speedup = agreement(reference, features, classes), fp32_seconds / seconds
            reason = measured.shortfall()
            trials.append(PrecisionTrial(precision, reason is None, reason, measured, speedup))
            if reason is None:
                log.info("image precision %s: serving %s", trials[-1].summary(), precision)
                return encoder, PrecisionChoice(requested, precision, trials)
            log.warning("image precision %s: not serving it (%s)", trials[-1].summary(), reason)
        choice = PrecisionChoice(requested, fp32.precision, trials)
        log.warning("image precision: %s", choice.fallback)
        return fp32, choice

    def _reduced_image_encoder(self, precision: str) -> ImageEncoder:
        if precision == "bf16":
            return TorchImageEncoder(self.model.visual, self.device, torch.bfloat16)
        vnni = bool(cpu_flags() & INT8_FLAGS)
        path = self._onnx_path("int8" if vnni else "int8-7bit")
        if not path.is_file():
            quantize_int8(self._onnx_export(), path, reduce_range=not vnni)
        return OnnxImageEncoder(path, "int8")

    def _onnx_path(self, variant: str = "") -> Path:
        image_size = self.model.visual.image_size[0]
        key = self.image_fingerprint.removeprefix("sha256:")[:32]
        return Path(self.spec.onnx_cache_dir) / f"visual-{image_size}px-{key}{'-' + variant if variant else ''}.onnx"

    def _onnx_export(self) -> Path:
        """The fp32 ONNX export of the image tower, made once and cached by the tower's fingerprint."""
        path = self._onnx_path()
        if not path.is_file():
            export_onnx(self.model.visual, self.model.visual.image_size[0], path)
        return path

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100.0))

    @functools.cached_property
    def sizes(self) -> BackboneSizes:
        """The tower sizes a method's bundle must fit (checked at activation)."""
        vision_width, token_prompts = image_tower_width(self.model.visual)
        depth = 0 if vision_width is None else deep_prompt_depth_limit(self.model)
        return BackboneSizes(self.text.width, self.text.context_length, text_embed_dim(self.text.tower),
                             vision_width, depth, token_prompts)

    @property
    def text_precision(self) -> str:
        """Where and in what dtype the text tower computes (e.g. cpu-float32): stored class text features are only
        reused by a backbone that computes them the same way."""
        return f"{self.device.type}-{str(text_cast_dtype(self.text.tower)).removeprefix('torch.')}"

    @functools.cached_property
    def image_fingerprint(self) -> str:
        """Hash of the image tower's weights (computed on first use: only image-dependent methods need it)."""
        return image_tower_fingerprint(self.model)

    def ref(self, with_image: bool = False) -> BackboneRef:
        """The identity a bundle trained on this backbone records (with the image tower's for methods that
        depend on it)."""
        image = self.image_fingerprint if with_image else None
        return BackboneRef(self.spec.model, self.spec.pretrained, self.fingerprint, image)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec.model,
            "pretrained": self.spec.pretrained,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "text_width": self.text.width,
            "context_length": self.text.context_length,
            "image_backend": self.image_encoder.name,
            "image_precision": self.image_precision,
            "image_precision_check": self.precision_choice.describe(),
        }

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalized image features for a preprocessed batch [B, 3, H, W], as float32 on CPU."""
        return self.image_encoder(pixels)

    def encode_prompted_images(self, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """`encode_images` with per-row vision prompts [B, J, n, d_v] in the image tower (always torch: the
        ONNX export has no prompt inputs)."""
        return self.torch_image_encoder.prompted(pixels, prompts)

    @torch.no_grad()  # not inference_mode: the trainer caches these tensors and trains on them
    def encode_image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        """`encode_images` that also returns the pooled features and projected tokens (fp32 torch tower)."""
        visual = prompt_capable_vit(self.model.visual)
        pooled, tokens = vit_pooled_and_tokens(visual, pixels.to(self.device, torch.float32))
        return ImageTokens(F.normalize(pooled.float(), dim=-1).cpu(), pooled, tokens)


def weights_source(spec: BackboneSpec) -> str | None:
    """What open_clip should load: embedded tags become the packaged file, anything else passes through."""
    embedded = EMBEDDED_WEIGHTS.get((spec.model, spec.pretrained))
    return str(embedded) if embedded else spec.pretrained


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Build the open_clip model named by `spec` (weights by tag, local path, or seeded random)."""
    if spec.model not in open_clip.list_models() and not spec.model.startswith("local-dir:"):
        raise ValueError(
            f"unknown open_clip model {spec.model!r}; known: {', '.join(sorted(open_clip.list_models())[:8])}, ..."
        )
    if spec.pretrained is None:
        torch.manual_seed(spec.seed)
    log.info("loading backbone %s (pretrained=%s)", spec.model, spec.pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=weights_source(spec))
    tokenizer = open_clip.get_tokenizer(spec.model)
    backbone = Backbone(spec, model, preprocess, tokenizer)
    log.info("backbone ready on %s, fingerprint %s, image encoder %s (%s)", backbone.device, backbone.fingerprint[:19],
             backbone.image_encoder.name, backbone.image_precision)
    return backbone
