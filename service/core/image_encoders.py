"""Image encoder backends: torch (CPU in fp32 or bf16, or CUDA in fp16) and ONNX Runtime (CPU, fp32 or int8).

Each backend maps a preprocessed batch [B, 3, H, W] to L2-normalized float32 features on the CPU, so
the rest of the request path does not care which one runs or at which precision.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from service.core.vision_prompts import prompted_features

log = logging.getLogger(__name__)

IMAGE_BACKENDS = ("auto", "torch", "onnx")  # auto: ONNX Runtime on CPU, torch on CUDA


PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ImageEncoder(Protocol):
    name: str
    precision: str  # fp32, fp16, bf16 or int8

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class TorchImageEncoder:
    """open_clip's own image tower in fp32, or a copy in `dtype` (fp16 on CUDA by default; bf16 on CPU): the fp32
    model stays for training and for the forwards that stay fp32.

    Besides the plain forward it runs the one only torch can: with vision prompts.
    """

    def __init__(self, visual: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        self.visual = visual if self.dtype == torch.float32 else copy.deepcopy(visual).to(self.dtype)
        self.precision = PRECISION_NAMES[self.dtype]
        self.name = "torch" if self.dtype == torch.float32 else f"torch-{self.precision}"

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return _normalized(self.visual(pixels.to(self.device, self.dtype)))

    @torch.inference_mode()
    def prompted(self, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Normalized features [B, D] under per-row vision prompts [B, J, n, d_v] (MaPLe)."""
        return prompted_features(self.visual, pixels.to(self.device, self.dtype), prompts).cpu()


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1).cpu()


class OnnxImageEncoder:
    """The image tower exported to ONNX (`export_onnx`, or `quantize_int8` of that export), run by ORT."""

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        self.precision = precision
        self.name = "onnx" if precision == "fp32" else f"onnx-{precision}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"pixels": pixels.float().numpy()})
        return F.normalize(torch.from_numpy(np.asarray(features)), dim=-1)


@contextlib.contextmanager
def _written_atomically(path: Path) -> Iterator[str]:
    """A temp path beside `path`, renamed to it when the block succeeds: a crash leaves no stub to load later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def export_onnx(visual: torch.nn.Module, image_size: int, path: Path) -> None:
    """Export with a dynamic batch axis."""
    log.info("exporting the image tower to ONNX at %s (once per backbone)", path)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused attention kernel that eval-mode MultiheadAttention picks has no ONNX form.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _written_atomically(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                visual.float().cpu().eval(), (torch.zeros(1, 3, image_size, image_size),), tmp, dynamo=False,
                input_names=["pixels"], output_names=["features"], opset_version=17,
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def quantize_int8(fp32_path: Path, path: Path, reduce_range: bool = False) -> None:
    """ONNX Runtime's dynamic int8 quantization of an fp32 export: weights int8 per tensor, activations quantized per
    batch as they come (so no calibration set bounds what inputs it handles well). Only the weight matrix products
    (MatMul, Gemm) are quantized: the patch convolution's integer kernel is slower than its fp32 one here.
    `reduce_range` (7-bit weights) avoids the int16 overflow of u8×s8 products on CPUs without VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing the image tower to int8 at %s (once per backbone)", path)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs every tensor it skips to the root logger
    try:
        with _written_atomically(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32_path, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                             reduce_range=reduce_range)
    finally:
        logging.disable(previous)
