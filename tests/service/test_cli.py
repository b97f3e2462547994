"""`promptserve` subcommands end to end against the service in its own uvicorn process."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from promptserve_client import AsyncClient, Client, ImageAnswer
from service.cli import COMMANDS, main, parser
from service.config import Settings
from tests.helpers import SAMPLES, TOKEN, coop_bundle_for

pytestmark = pytest.mark.slow
SAMPLE_FILES = sorted(SAMPLES.glob("*.png"))


@pytest.fixture
def cli(live_service, capsys, monkeypatch):
    """Run `promptserve ARGS...` in-process against the live service; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("PROMPTSERVE_URL", live_service.url)
    monkeypatch.delenv("PROMPTSERVE_ADMIN_TOKEN", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def expected(path) -> dict[str, str]:
    colour, shape = path.stem.split("_")
    return {"shapes": shape, "colours": colour}


def test_health_and_tasks_read_the_running_service(cli):
    code, out, _ = cli("health")
    assert code == 0 and out.startswith("ready: ") and "promptserve-tiny world-v1" in out
    code, out, _ = cli("tasks")
    assert code == 0 and out.splitlines()[0].split() == ["TASK", "METHOD", "VERSION", "CLASSES"]
    assert {"shapes zeroshot 1 16", "colours zeroshot 1 16"} <= {" ".join(line.split()) for line in out.splitlines()}
    code, out, _ = cli("tasks", "--json")
    assert {"name": "shapes", "method": "zeroshot", "version": 1, "num_classes": 16, "warm": True} in json.loads(out)


def test_classify_names_each_samples_shape_and_colour(cli):
    code, out, _ = cli("classify", *map(str, SAMPLE_FILES), "--task", "shapes", "--task", "colours", "--top-k", "2")
    assert code == 0, out
    lines = iter(out.splitlines())
    for path in SAMPLE_FILES:
        assert next(lines) == path.name
        for task in ("shapes", "colours"):
            name, _, top = next(lines).strip().partition(": ")
            assert name == f"{task} v1" and top.split()[0] == expected(path)[task] and top.count(",") == 1
    code, out, _ = cli("classify", str(SAMPLE_FILES[0]), "--task", "shapes", "--top-k", "1", "--json")
    [image] = json.loads(out)
    assert image["answers"][0]["predictions"][0]["label"] == expected(SAMPLE_FILES[0])["shapes"]


def test_upload_task_delete_round_trip_with_the_admin_token(cli, live_service, tmp_path, monkeypatch):
    backbone = httpx.get(f"{live_service.url}/readyz").json()["backbone"]
    bundle = tmp_path / "things.bundle"
    bundle.write_bytes(coop_bundle_for(backbone, ["cube", "ball", "cone"], seed=3))

    code, _, err = cli("upload", "cli-things", str(bundle))
    assert code == 1 and "401 missing_token" in err and "pass --token, or set PROMPTSERVE_ADMIN_TOKEN" in err
    code, out, _ = cli("upload", "cli-things", str(bundle), "--token", TOKEN)
    assert code == 0 and out.strip() == "cli-things: version 1 active (coop, 3 classes)"
    code, out, _ = cli("task", "cli-things")
    assert code == 0 and "classes (3): cube, ball, cone" in out
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", TOKEN)  # the token from the environment
    code, out, _ = cli("delete", "cli-things")
    assert code == 0 and out.strip() == "deleted cli-things"
    code, _, err = cli("task", "cli-things", "--json")
    assert code == 1 and "404 unknown_task" in err


def test_versions_lists_every_version_and_activate_rolls_back(cli, live_service, tmp_path, monkeypatch):
    backbone = httpx.get(f"{live_service.url}/readyz").json()["backbone"]
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", TOKEN)
    for seed, classes in ((1, ["cube", "ball"]), (2, ["cube", "ball", "cone"])):
        (tmp_path / f"v{seed}.bundle").write_bytes(coop_bundle_for(backbone, classes, seed=seed))
        assert cli("upload", "cli-versions", str(tmp_path / f"v{seed}.bundle"))[0] == 0

    code, out, _ = cli("versions", "cli-versions")
    lines = [line.split() for line in out.splitlines()]
    assert code == 0 and lines[0] == ["VERSION", "ACTIVE", "METHOD", "BYTES", "SHA256", "ALIASES"]
    assert [row[:3] for row in lines[1:]] == [["1", "coop", str(len((tmp_path / "v1.bundle").read_bytes()))],
                                              ["2", "*", "coop"]]
    code, out, _ = cli("activate", "cli-versions", "1")
    assert code == 0 and out.strip() == "cli-versions: version 1 active (coop, 2 classes)"
    code, out, _ = cli("versions", "cli-versions", "--json")
    assert json.loads(out)["active"] == 1
    code, _, err = cli("activate", "cli-versions", "9")
    assert code == 1 and "404" in err
    assert cli("delete", "cli-versions")[0] == 0


def test_an_unreachable_service_is_a_one_line_error(cli):
    code, _, err = cli("tasks", "--url", "http://127.0.0.1:9")
    assert code == 1 and err.startswith("error: cannot reach http://127.0.0.1:9")


def test_the_client_returns_typed_answers(live_service):
    with Client(live_service.url) as client:
        [answer] = client.classify([("star.png", SAMPLE_FILES[0].read_bytes())], ["colours"], top_k=3)
    assert isinstance(answer, ImageAnswer) and answer.filename == "star.png"
    assert answer.answers[0].predictions[0].label == expected(SAMPLE_FILES[0])["colours"]
    assert len(answer.answers[0].predictions) == 3


def test_the_console_script_module_runs_without_loading_the_service(live_service):
    """`promptserve` is `service.cli:main`; client commands must not pay for torch (`serve` alone loads it)."""
    env = os.environ | {"PROMPTSERVE_URL": live_service.url}
    probe = "import sys; from service.cli import main; code = main(['health', '--json']); " \
            "sys.exit(code or ('torch' in sys.modules) * 3)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ready"] is True


def test_serve_refuses_to_start_with_an_empty_token(monkeypatch, capsys):
    """An empty PROMPTSERVE_CLASSIFY_TOKEN would lock every client out: the service says so and does not start."""
    monkeypatch.setenv("PROMPTSERVE_CLASSIFY_TOKEN", "")
    assert main(["serve", "--port", "9"]) == 2
    assert "PROMPTSERVE_CLASSIFY_TOKEN" in capsys.readouterr().err


def test_create_from_labels_then_aliases_pin_classify(cli, monkeypatch):
    code, out, _ = cli("create", "cli-labels", "--labels", "red,blue", "--token", TOKEN)
    assert code == 0 and out.strip() == "cli-labels: version 1 active (zeroshot, 2 classes)"
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", TOKEN)
    code, out, _ = cli("create", "cli-labels", "--labels", "red, blue ,green", "--template", "a {} shape.")
    assert code == 0 and "version 2" in out
    code, out, _ = cli("alias", "cli-labels", "canary", "1")
    assert code == 0 and out.split() == ["ALIAS", "VERSION", "canary", "1"]
    assert json.loads(cli("aliases", "cli-labels", "--json")[1]) == {"canary": 1}
    code, out, _ = cli("classify", str(SAMPLE_FILES[0]), "--task", "cli-labels@canary", "--task", "cli-labels:2",
                       "--top-k", "3", "--json")
    answers = json.loads(out)[0]["answers"]
    assert [(a["version"], len(a["predictions"])) for a in answers] == [(1, 2), (2, 3)]
    assert cli("unalias", "cli-labels", "canary")[0] == 0
    assert json.loads(cli("aliases", "cli-labels", "--json")[1]) == {}
    assert cli("delete", "cli-labels")[0] == 0


def test_zero_shot_embed_and_models(cli):
    code, out, _ = cli("zero-shot", *map(str, SAMPLE_FILES), "--labels", "star,circle,triangle,heart", "--top-k", "1")
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == [p.name for p in SAMPLE_FILES]
    tops = [line.split(": ")[1].split()[0] for line in out.splitlines()]
    assert tops == [expected(p)["shapes"] for p in SAMPLE_FILES]
    code, out, _ = cli("embed", "a red star", "a blue circle", "--json")
    vectors = [item["embedding"] for item in json.loads(out)]
    assert code == 0 and len(vectors) == 2 and abs(sum(x * x for x in vectors[0]) - 1) < 1e-4
    code, out, _ = cli("embed", "--image", str(SAMPLE_FILES[0]))
    assert code == 0 and out.startswith(f"{SAMPLE_FILES[0]}: [") and out.strip().endswith("dims)")
    code, out, _ = cli("models")
    assert code == 0 and out.splitlines()[1].split()[0] == "promptserve-tiny"


def test_usage_lists_every_subcommand_and_serve_help_every_setting(capsys):
    usage = parser().format_help()
    for name in (*COMMANDS, "serve"):
        assert f"promptserve {name}" in usage or f" | {name} " in usage or f"| {name}" in usage, name
        assert f"    {name}" in usage  # and in argparse's list
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for field in Settings.model_fields:
        assert f"PROMPTSERVE_{field.upper()}" in help_text


@pytest.mark.anyio
async def test_the_async_client_is_the_sync_clients_twin(live_service, monkeypatch):
    public = {name for name in vars(Client) if not name.startswith("_")}
    assert public == {name for name in vars(AsyncClient) if not name.startswith("_")}
    monkeypatch.setenv("PROMPTSERVE_URL", live_service.url)  # the default URL
    async with AsyncClient(token=TOKEN) as client:
        assert (await client.health())["ready"] is True
        assert {"shapes", "colours"} <= {t.name for t in await client.tasks()}
        created = await client.create("async-labels", ["star", "circle"])
        [image] = await client.classify([SAMPLE_FILES[0]], ["async-labels:1"], top_k=1)
        [zero_shot] = await client.zero_shot([SAMPLE_FILES[0]], ["star", "circle"])
        [vector] = await client.embed(["a star"])
        [model] = await client.models()
        assert await client.set_alias("async-labels", "prod", 1) == {"prod": 1}
        assert (await client.versions("async-labels"))["aliases"] == {"prod": 1}
        await client.delete("async-labels")
    assert created["version"] == 1 and image.answers[0].version == 1
    shape = expected(SAMPLE_FILES[0])["shapes"]
    assert zero_shot.predictions[0].label == image.answers[0].predictions[0].label == shape
    assert len(vector) == model["embedding_dimensions"]
