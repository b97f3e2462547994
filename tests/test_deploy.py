"""No Docker engine runs here, so the Dockerfile and compose file are checked against the repository:
they parse, and every path, port, module, route and setting they name exists."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instructions(kind: str) -> list[str]:
    return [args for k, args in dockerfile_instructions() if k == kind]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def app_routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def test_dockerfile_uses_only_known_instructions_and_starts_from_an_overridable_base():
    known = {"ARG", "FROM", "ENV", "WORKDIR", "RUN", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD"}
    assert {k for k, _ in dockerfile_instructions()} <= known
    assert dockerfile_instructions()[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert instructions("FROM") == ["${BASE_IMAGE}"]


def test_every_copied_path_exists():
    for args in instructions("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"


def test_the_image_copies_every_package_the_project_installs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = (\[.*?\])", pyproject)
    copied = {shlex.split(args)[0] for args in instructions("COPY")}
    assert include and {name.rstrip("*") for name in json.loads(include.group(1))} <= copied


def test_command_and_healthcheck_name_real_modules_routes_and_settings(app_routes):
    cmd = json.loads(instructions("CMD")[0])
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None
    health = instructions("HEALTHCHECK")[0]
    path = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert path and path.group(2) in app_routes
    env = dict(re.findall(r"(PROMPTSERVE_\w+)=(\S+)", " ".join(instructions("ENV"))))
    assert set(env) <= {f"PROMPTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert path.group(1) == env["PROMPTSERVE_PORT"] == instructions("EXPOSE")[0]


def test_compose_builds_this_dockerfile_with_a_registry_volume_and_healthcheck(compose, app_routes):
    api = compose["services"]["api"]
    context = (ROOT / "deploy" / api["build"]["context"]).resolve()
    assert context == ROOT and (context / api["build"]["dockerfile"]).is_file()
    volume, mount = api["volumes"][0].split(":")
    assert volume in compose["volumes"]
    assert mount == api["environment"]["PROMPTSERVE_REGISTRY"]
    host_port, container_port = api["ports"][0].split(":")
    assert container_port == api["environment"]["PROMPTSERVE_PORT"] == instructions("EXPOSE")[0]
    health_path = re.search(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(api["healthcheck"]["test"])).group(1)
    assert health_path in app_routes


def test_compose_takes_the_admin_token_from_the_environment_and_names_real_settings(compose):
    env = compose["services"]["api"]["environment"]
    assert env["PROMPTSERVE_ADMIN_TOKEN"].startswith("${PROMPTSERVE_ADMIN_TOKEN:?")
    assert set(env) <= {f"PROMPTSERVE_{name.upper()}" for name in Settings.model_fields}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = commands[1].strip().splitlines()[-1]
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "make serve" in commands[0]
