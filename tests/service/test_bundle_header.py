"""The torch-free half of the bundle contract: one method table split in two halves that must agree."""

from __future__ import annotations

import dataclasses

import pytest

from service.bundle import METHODS
from service.bundle_header import METHOD_INFO, MethodInfo
from service.manifest import NoOptions


def test_the_manifest_table_and_the_tensor_table_name_the_same_methods() -> None:
    assert set(METHOD_INFO) == set(METHODS)
    assert all(METHODS[name].info is info for name, info in METHOD_INFO.items())


def test_a_method_said_to_be_vision_side_must_have_vision_prompts() -> None:
    with pytest.raises(TypeError, match="vision prompts exactly when"):
        dataclasses.replace(METHODS["coop"], info=MethodInfo(True, NoOptions, vision_side=True))
    with pytest.raises(TypeError, match="vision prompts exactly when"):
        dataclasses.replace(METHODS["maple"], info=METHOD_INFO["coop"])
