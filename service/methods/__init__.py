"""Every prompt method, registered once by name. Adding a method is one spec module here, one learner in
`trainer/methods/` and one `register` line below; nothing else names a method.

    from service.methods import METHODS, method
    method("coop").kind           # Kind.TEXT
"""

from __future__ import annotations

from typing import Any

from service.methods import coop, maple, qmaple, qprompt, rlp, tgpt, zeroshot
from service.methods.spec import BundleError, ClassPrompt, Kind, MethodSpec, TensorRule

METHODS: dict[str, MethodSpec[Any]] = {}


def register(spec: MethodSpec[Any]) -> MethodSpec[Any]:
    """Make a method known to bundles, the service and the trainer (under `spec.name`)."""
    if spec.name in METHODS:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def method(name: str) -> MethodSpec[Any]:
    """The registered method `name`; a ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


register(zeroshot.SPEC)
register(coop.SPEC)
register(qprompt.SPEC)
register(rlp.SPEC)
register(maple.SPEC)
register(qmaple.SPEC)
register(tgpt.SPEC)

__all__ = ["METHODS", "BundleError", "ClassPrompt", "Kind", "MethodSpec", "TensorRule", "method", "register",
           "unregister"]
