"""Image encoder backends: torch (CPU, or CUDA in fp16) and ONNX Runtime (CPU).

Each backend maps a preprocessed batch [B, 3, H, W] to L2-normalized float32 features on the CPU, so
the rest of the request path does not care which one runs.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from service.core.vision_prompts import prompted_features

log = logging.getLogger(__name__)

IMAGE_BACKENDS = ("auto", "torch", "onnx")  # auto: ONNX Runtime on CPU, torch on CUDA


class ImageEncoder(Protocol):
    name: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class TorchImageEncoder:
    """open_clip's own image tower; on CUDA a half-precision copy (the fp32 model stays for training).

    Besides the plain forward it runs the one only torch can: with vision prompts.
    """

    def __init__(self, visual: torch.nn.Module, device: torch.device):
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.visual = copy.deepcopy(visual).half() if self.dtype == torch.float16 else visual
        self.name = "torch-fp16" if self.dtype == torch.float16 else "torch"

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
    """The image tower exported once to ONNX (cached on disk by its weights' fingerprint), run by ORT."""

    name = "onnx"

    def __init__(self, visual: torch.nn.Module, image_size: int, model_path: Path, threads: int | None = None):
        import onnxruntime as ort

        if not model_path.is_file():
            export_onnx(visual, image_size, model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"pixels": pixels.float().numpy()})
        return F.normalize(torch.from_numpy(np.asarray(features)), dim=-1)


def export_onnx(visual: torch.nn.Module, image_size: int, path: Path) -> None:
    """Export with a dynamic batch axis; written to a temp file and renamed, so a crash leaves no stub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting the image tower to ONNX at %s (once per backbone)", path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused attention kernel that eval-mode MultiheadAttention picks has no ONNX form.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                visual.float().cpu().eval(), (torch.zeros(1, 3, image_size, image_size),), tmp, dynamo=False,
                input_names=["pixels"], output_names=["features"], opset_version=17,
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        Path(tmp).unlink(missing_ok=True)
