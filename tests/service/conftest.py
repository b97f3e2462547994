"""Fixtures shared by the service tests: the service running in its own uvicorn process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.process import ServiceProcess
from tests.helpers import TOKEN


@pytest.fixture(scope="session")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`python -m service` on a free port: embedded tiny CLIP, demo tasks shapes/colours, admin token set."""
    service = ServiceProcess(tmp_path_factory.mktemp("live") / "registry", admin_token=TOKEN)
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
