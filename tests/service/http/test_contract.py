"""schemathesis against the real app (real backbone, real registry): every operation, fixed seed, bounded
examples; every answer must be documented (status, content type, body schema) and none may be a 5xx. In-process
over the ASGI app (two guard settings), and with schemathesis's own runner over a real uvicorn, every phase
included: examples, coverage (undeclared methods must get a 405 listing the allowed ones), fuzzing, and the
stateful phase, which follows the OpenAPI links from the task list to activate and the alias routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.process import ServiceProcess
from service.config import Settings
from service.http.app import create_app
from service.registry.directory import DirectoryRegistry

TOKEN = "contract-admin-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# per operation: 40 keeps the whole run well under a minute on two cores; CONTRACT_EXAMPLES=200 digs deeper
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "40"))


# as configured in production; then with uploads disabled and classify guarded by a token the client lacks
GUARDS = {"admin": {"admin_token": TOKEN}, "locked": {"classify_token": "another-token"}}


@pytest.fixture(params=GUARDS.values(), ids=GUARDS.keys())
def contract_schema(request, backbone, make_coop_bundle, tmp_path):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    registry.activate("t", registry.store("t", make_coop_bundle(backbone, ["cat", "dog"])))  # one real task
    app = create_app(Settings(model="test-micro", registry=str(root), demo=False, **request.param), backbone=backbone)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.seed = 0
    return schema


def test_every_operation_answers_as_documented(contract_schema):
    # deletes last, so the other operations still find the stored task
    operations = sorted((result.ok() for result in contract_schema.get_all_operations()),
                        key=lambda operation: operation.method.upper() == "DELETE")
    assert len(operations) >= 20
    failures, statuses = {}, Counter()
    for operation in operations:
        try:
            fuzz(operation, statuses)
        except (Exception, FailureGroup) as exc:  # every operation runs; the failures are listed together
            failures[operation.label] = str(exc)
    assert not failures, "\n\n".join(f"{label}: {error}" for label, error in failures.items())
    print("\n".join(f"{label} {status}: {n}" for (label, status), n in sorted(statuses.items())))


def cases(operation) -> st.SearchStrategy:
    """Valid and invalid requests, and valid ones aimed at the stored task so the routes get past the 404."""
    path = {k: v for k, v in {"task": "t", "version": "1"}.items() if k in names(operation.path_parameters)}
    query = {"tasks": ["t"]} if "tasks" in names(operation.query) else {}
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    if path or query:
        strategies += [operation.as_strategy(mode, path_parameters=path or None, query=query or None)
                       for mode in GenerationMode]
    return st.one_of(strategies)


def names(parameters) -> set[str]:
    return {parameter.name for parameter in parameters}


def fuzz(operation, statuses: Counter) -> None:
    @given(case=cases(operation))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
        statuses[operation.label, response.status_code] += 1

    run()


# The live run: `positive_data_acceptance` and `negative_data_rejection` are left out, as above, since the
# documents cannot say which bytes are a bundle or an image. The task list's `cursor` is fixed to one before every
# name, so its first task (a link's source) exists; the stateful phase generates valid requests only.
LIVE_CONFIG = """
[phases.stateful]
max-steps = 20

[phases.stateful.generation]
max-examples = 80
mode = "positive"

[[operations]]
include-name = "GET /v1/tasks"
parameters = { "query.cursor" = "0" }
"""
STATEFUL_TARGETS = {("POST", "/v1/tasks/{task}/versions/{ref}/activate"), ("PUT", "/v1/tasks/{task}/aliases/{alias}"),
                    ("DELETE", "/v1/tasks/{task}/aliases/{alias}")}


@pytest.mark.slow
def test_schemathesis_finds_nothing_over_a_live_uvicorn_and_its_stateful_phase_reaches_activate_and_aliases(
        tmp_path: Path):
    service = ServiceProcess(tmp_path / "registry", admin_token=TOKEN)  # tiny CLIP, demo tasks shapes and colours
    config = tmp_path / "schemathesis.toml"
    config.write_text(LIVE_CONFIG)
    try:
        service.wait_ready()
        run = subprocess.run([
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
            "run", f"{service.url}/openapi.json",
            "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "10", "--generation-deterministic",
            "--header", f"Authorization: Bearer {TOKEN}", "--workers", "1", "--no-color",  # hypothesis: one thread
            "--request-timeout", "60",  # the suite shares two cores: a slow answer is not a fault
            "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
            "--report", "ndjson", "--report-ndjson-path", str(tmp_path / "events.ndjson")],
            capture_output=True, text=True, timeout=300)
    finally:
        service.stop()
    failures = run.stdout[run.stdout.find("=== FAILURES"):] if "=== FAILURES" in run.stdout else run.stdout[-12000:]
    assert run.returncode == 0, failures[:12000] + run.stderr[-2000:]
    reached = stateful_successes(tmp_path / "events.ndjson")
    assert STATEFUL_TARGETS <= reached, f"the stateful phase answered 2xx only for {sorted(reached)}"


def stateful_successes(events: Path) -> set[tuple[str, str]]:
    """(method, path template) of every 2xx answer in the stateful phase."""
    reached = set()
    for line in events.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        if not finished or finished.get("phase") != "stateful":
            continue
        recorder = finished["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            if 200 <= interaction["response"]["status_code"] < 300:
                reached.add((case["method"], case["path"]))
    return reached
