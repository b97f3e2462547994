"""Fixtures of the HTTP tests: the app in-process on the micro backbone and a registry directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.core.backbone import Backbone
from tests.helpers import running, settings_for


@pytest.fixture
async def client(backbone: Backbone, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(backbone, settings_for(tmp_path)) as client:
        yield client
