"""schemathesis against the real app (real backbone, real registry): every operation, fixed seed, bounded
examples; every answer must be documented (status, content type, body schema) and none may be a 5xx."""

from __future__ import annotations

import os
from collections import Counter

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
