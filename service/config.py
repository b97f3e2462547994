"""Service settings, read once from PROMPTSERVE_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.backbone import BackboneSpec

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", frozen=True)

    model: str = Field("promptserve-tiny", description="open_clip model name (or local-dir:PATH)")
    pretrained: str | None = Field("world-v1", description="open_clip tag, embedded tag or checkpoint path; "
                                   "empty = seeded random weights")
    seed: int = Field(0, description="seed for random weights when `pretrained` is unset")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    image_backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="image encoder: auto (onnx on CPU, torch on CUDA), torch, or onnx (CPU)")
    onnx_cache_dir: str = Field("var/onnx", description="where exported ONNX image towers are cached")
    registry: str = Field("var/registry", description="directory that stores bundles and active versions")
    demo: bool = Field(True, description="seed zero-shot demo tasks (shapes, colours) into an empty registry")

    admin_token: SecretStr | None = Field(None, description="bearer token for uploads and deletes")
    classify_token: SecretStr | None = Field(None, description="if set, classify needs this (or the admin) token")

    max_bundle_bytes: int = Field(64 * MiB, gt=0)
    max_image_bytes: int = Field(16 * MiB, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="refuse larger images (decompression bombs)")
    max_images_per_request: int = Field(32, gt=0)
    max_classes: int = Field(2000, gt=0)

    batch_max_images: int = Field(32, gt=0, description="most rows (image forwards) in one micro-batch")
    batch_max_wait_ms: float = Field(10.0, ge=0, description="longest a batch waits for requests being decoded")
    batch_max_queued_images: int = Field(256, gt=0, description="queued rows beyond which classify answers 503")

    host: str = "127.0.0.1"
    port: int = 8000

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(model=self.model, pretrained=self.pretrained or None, device=self.device, seed=self.seed,
                            image_backend=self.image_backend, onnx_cache_dir=self.onnx_cache_dir)

    @property
    def max_classify_body_bytes(self) -> int:
        # Room for every allowed image plus multipart framing.
        return self.max_images_per_request * self.max_image_bytes + MiB
