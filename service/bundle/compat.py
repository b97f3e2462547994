"""Whether a bundle fits a backbone: the same weights it was trained on, and sizes its method can run on.

One check for the service (before a bundle is activated) and the trainer's evaluator (before it scores one).
Nothing here touches a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bundle.header import BundleHeader
from service.methods import BundleError

if TYPE_CHECKING:
    from service.bundle.codec import Bundle
    from service.core.backbone import Backbone


def check_compatible(b: Bundle | BundleHeader, backbone: Backbone) -> None:
    """Refuse (BundleError) a bundle trained for another backbone, or one its method cannot run on here."""
    ref, spec = b.manifest.backbone, b.spec
    if ref.model != backbone.spec.model:
        raise BundleError("backbone.model", f"bundle is for {ref.model!r}, this backbone is {backbone.spec.model!r}")
    if ref.fingerprint != backbone.fingerprint:
        raise BundleError("backbone.fingerprint", "bundle was trained on other text-tower weights than this "
                          f"backbone's ({ref.fingerprint[:19]}… vs {backbone.fingerprint[:19]}…); retrain it on "
                          "this backbone")
    if spec.kind.needs_image_fingerprint and ref.image_fingerprint != backbone.image_fingerprint:
        raise BundleError("backbone.image_fingerprint", "bundle was trained on another image tower than this "
                          f"backbone's ({ref.image_fingerprint} vs {backbone.image_fingerprint[:19]}…); retrain it "
                          "on this backbone")
    sizes, prompt = backbone.sizes, b.prompt
    if prompt.ctx_dim not in (0, sizes.text_width):
        raise BundleError("prompt.ctx_dim", f"is {prompt.ctx_dim}, the text width is {sizes.text_width}")
    if prompt.n_ctx + 2 > sizes.context_length:  # start and end tokens take two slots
        raise BundleError("prompt.n_ctx", f"is {prompt.n_ctx}; the text context holds {sizes.context_length} tokens")
    spec.check_backbone(b, sizes)
