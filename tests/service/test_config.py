"""Settings refuse what would lock clients out or never admit a request, and the defaults fit the container."""

import pytest
import yaml
from pydantic import ValidationError

from service.config import Settings
from tests.helpers import ROOT

# The default model's server, started and warmed up (docs/soak.md: 1130 MiB at start, 1205 MiB after 3 minutes).
PROCESS_BYTES = 1280 * 2**20


def _container_memory_limit() -> int:
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "promptserve"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    return int(limit[:-2]) * 2**30


def test_the_default_limits_fit_the_default_container_memory():
    """In-flight bodies × parse factor (capped by the body budget) + decoding + the process + the warm tasks'
    features: docs/serving.md."""
    worst = PROCESS_BYTES + Settings().request_memory_bound() + Settings().feature_memory_bytes
    assert worst <= _container_memory_limit(), f"{worst / 2**30:.2f} GiB"


def test_the_body_budget_bounds_memory_whatever_the_in_flight_cap():
    small, large = Settings(max_inflight_requests=8), Settings(max_inflight_requests=10_000)
    assert large.request_memory_bound() == small.request_memory_bound()  # both at the body budget


@pytest.mark.parametrize("name", ["admin_token", "classify_token"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_refused_at_start(name, value):
    with pytest.raises(ValidationError, match="empty"):
        Settings(**{name: value})


def test_a_body_budget_smaller_than_the_largest_request_is_refused():
    with pytest.raises(ValidationError, match="never admitted"):
        Settings(max_inflight_body_bytes=Settings().max_classify_body_bytes - 1)
