"""`promptserve`: serve the API (the default), or talk to a running service.

    promptserve [serve] [--host H] [--port P]          (serve --help lists every PROMPTSERVE_* setting)
    promptserve health | models | tasks | task NAME
    promptserve upload TASK FILE | create TASK --labels a,b,c [--template T] | delete TASK
    promptserve versions TASK | activate TASK VERSION
    promptserve aliases TASK | alias TASK NAME VERSION | unalias TASK NAME
    promptserve classify FILE... --task T [--task U@canary] [--task V:3] [--top-k K]
    promptserve zero-shot FILE... --labels a,b,c [--template T] [--top-k K]
    promptserve embed TEXT... | embed --image FILE...

Client commands take --url and --token (env PROMPTSERVE_URL, PROMPTSERVE_ADMIN_TOKEN) and --json.
Only `serve` imports the service itself (torch, open_clip); the others need just httpx.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import httpx

from promptserve_client import Client, ImageAnswer, ImagePredictions, PromptserveError, TaskSummary
from promptserve_client.client import DEFAULT_URL

TOKEN_HINT = "pass --token, or set PROMPTSERVE_ADMIN_TOKEN"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "serve" or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return serve(argv[1:] if argv and argv[0] == "serve" else argv)
    args = parser().parse_args(argv)
    try:
        with Client(args.url, args.token) as client:
            answer = COMMANDS[args.command](client, args)
    except PromptserveError as exc:
        hint = f" ({TOKEN_HINT})" if exc.status in (401, 403) and exc.code != "admin_disabled" else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(_plain(answer), indent=2) if args.json else HUMAN[args.command](answer))
    return 0


def serve(argv: list[str]) -> int:
    """Serve the configured backbone and registry with uvicorn (torch and the app load only here)."""
    from pydantic import ValidationError

    from service.config import Settings
    from service.http.app import create_app
    from service.http.observability import configure_logging
    from service.http.server import serve as run_server

    try:
        settings = Settings()
    except ValidationError as exc:  # refuse to start, saying which PROMPTSERVE_* setting is wrong
        problems = "; ".join(f"{'PROMPTSERVE_' + str(e['loc'][0]).upper() if e['loc'] else 'settings'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        print(f"error: {problems}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="promptserve serve", description="serve the promptserve API",
                                     epilog=settings_help(Settings),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    configure_logging(settings.log_format)
    run_server(create_app(settings), settings, args.host, args.port)
    return 0


def settings_help(settings: type[Any]) -> str:
    """Every setting as its environment variable, default and description (`serve --help`)."""
    prefix = settings.model_config["env_prefix"]
    lines = ["settings (environment variables):"]
    for name, info in settings.model_fields.items():
        default = "" if info.default_factory is None and info.default is None else \
            f" [default: {info.get_default(call_default_factory=True)}]"
        lines.append(f"  {prefix}{name.upper()}{default}")
        if info.description:
            lines.append(f"      {info.description}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("PROMPTSERVE_URL", DEFAULT_URL),
                        help="the service (env PROMPTSERVE_URL; default %(default)s)")
    common.add_argument("--token", default=os.environ.get("PROMPTSERVE_ADMIN_TOKEN"),
                        help="bearer token (env PROMPTSERVE_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="print the answer as JSON")
    root = argparse.ArgumentParser(prog="promptserve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="serve the API (the default; `promptserve serve -h` for its options)")

    def command(name: str, help_text: str, *positionals: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text)
        for positional in positionals:
            sub.add_argument(positional)
        return sub

    command("health", "the service's readiness")
    command("models", "the models /v1/embeddings takes (the backbone)")
    command("tasks", "list the active tasks")
    command("task", "describe a task", "name")
    command("upload", "upload a bundle as a task's new version", "task", "file")
    labels_options(command("create", "make a zero-shot task (or its new version) from labels", "task"))
    command("delete", "delete a task and its versions", "task")
    command("versions", "a task's stored versions and aliases", "task")
    command("activate", "make a stored version (number or alias) active", "task", "version")
    command("aliases", "a task's aliases", "task")
    command("alias", "point an alias (e.g. canary) at a version number or another alias", "task", "alias", "version")
    command("unalias", "remove an alias", "task", "alias")
    classify = command("classify", "classify image files with tasks")
    classify.add_argument("files", nargs="+", metavar="FILE")
    classify.add_argument("--task", dest="tasks", action="append", required=True,
                          help="task to answer, repeatable; pin a version with TASK@ALIAS or TASK:N")
    classify.add_argument("--top-k", type=int, default=3, help="predictions per image and task (default %(default)s)")
    zero_shot = command("zero-shot", "classify image files against labels given now")
    zero_shot.add_argument("files", nargs="+", metavar="FILE")
    labels_options(zero_shot)
    zero_shot.add_argument("--top-k", type=int, help="predictions per image (default: every label)")
    embed = command("embed", "embed texts, or image files with --image (L2-normalized)")
    embed.add_argument("inputs", nargs="+", metavar="TEXT_OR_FILE")
    embed.add_argument("--image", action="store_true", help="the inputs are image files")
    return root


def labels_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--labels", required=True, type=_comma_list, help="class names, comma-separated")
    sub.add_argument("--template", dest="templates", action="append",
                     help='a template with one {} for the label, repeatable (default "a photo of a {}.")')


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "health": lambda client, args: client.health(),
    "models": lambda client, args: client.models(),
    "tasks": lambda client, args: client.tasks(),
    "task": lambda client, args: client.task(args.name),
    "upload": lambda client, args: client.upload(args.task, args.file),
    "create": lambda client, args: client.create(args.task, args.labels, args.templates),
    "delete": lambda client, args: _delete(client, args.task),
    "versions": lambda client, args: client.versions(args.task),
    "activate": lambda client, args: client.activate(args.task, args.version),
    "aliases": lambda client, args: client.aliases(args.task),
    "alias": lambda client, args: client.set_alias(args.task, args.alias, args.version),
    "unalias": lambda client, args: client.delete_alias(args.task, args.alias),
    "classify": lambda client, args: client.classify(args.files, args.tasks, args.top_k),
    "zero-shot": lambda client, args: client.zero_shot(args.files, args.labels, args.templates, args.top_k),
    "embed": lambda client, args: _embed(client, args.inputs, args.image),
}


def _embed(client: Client, inputs: list[str], images: bool) -> list[dict[str, Any]]:
    vectors = client.embed(inputs, modality="image" if images else "text")
    return [{"input": item, "embedding": vector} for item, vector in zip(inputs, vectors, strict=True)]


def _delete(client: Client, task: str) -> dict[str, str]:
    client.delete(task)
    return {"deleted": task}


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _tasks_table(tasks: list[TaskSummary]) -> str:
    return _table([("TASK", "METHOD", "VERSION", "CLASSES")] + [(t.name, t.method, str(t.version),
                                                                 "-" if t.num_classes is None else str(t.num_classes))
                                                                for t in tasks])


def _task_text(task: dict[str, Any]) -> str:
    backbone = task["backbone"]
    return "\n".join([
        f"{task['name']}: {task['method']}, version {task['version']}, {task['bundle_bytes']} bytes",
        f"backbone: {backbone['model']} {backbone['pretrained'] or ''} ({backbone['fingerprint'][:12]})",
        f"classes ({task['num_classes']}): {', '.join(task['classnames'])}",
    ])


def _uploaded_text(task: dict[str, Any]) -> str:
    return f"{task['name']}: version {task['version']} active ({task['method']}, {task['num_classes']} classes)"


def _versions_text(listing: dict[str, Any]) -> str:
    return _table([("VERSION", "ACTIVE", "METHOD", "BYTES", "SHA256", "ALIASES")] + [
        (str(v["version"]), "*" if v["active"] else "", v["method"], str(v["size"]), v["sha256"][:12],
         ",".join(v["aliases"])) for v in listing["versions"]])


def _answers_text(images: list[ImageAnswer]) -> str:
    lines = []
    for image in images:
        lines.append(image.filename)
        for answer in image.answers:
            top = ", ".join(f"{p.label} {p.probability:.3f}" for p in answer.predictions)
            lines.append(f"  {answer.task} v{answer.version}: {top}")
    return "\n".join(lines)


def _health_text(health: dict[str, Any]) -> str:
    backbone = health["backbone"]
    lines = [f"{'ready' if health['ready'] else 'not ready'}: {health['tasks']} tasks on "
             f"{backbone.get('model')} {backbone.get('pretrained') or ''}".rstrip()]
    lines += [f"failed to restore {name}: {why}" for name, why in health["failed_tasks"].items()]
    lines += [f"waiting for the registry {name}: {why}" for name, why in health.get("waiting_tasks", {}).items()]
    return "\n".join(lines)


def _aliases_text(aliases: dict[str, int]) -> str:
    return _table([("ALIAS", "VERSION")] + [(name, str(version)) for name, version in sorted(aliases.items())])


def _zero_shot_text(images: list[ImagePredictions]) -> str:
    return "\n".join(f"{image.filename}: " + ", ".join(f"{p.label} {p.probability:.3f}" for p in image.predictions)
                     for image in images)


def _embeddings_text(items: list[dict[str, Any]]) -> str:
    return "\n".join(f"{item['input']}: [{', '.join(f'{x:.4f}' for x in item['embedding'][:4])}, ...] "
                     f"({len(item['embedding'])} dims)" for item in items)


def _models_text(models: list[dict[str, Any]]) -> str:
    return _table([("MODEL", "DIMENSIONS", "MODALITIES")] + [
        (m["id"], str(m.get("embedding_dimensions", "")), ",".join(m.get("modalities", []))) for m in models])


HUMAN: dict[str, Callable[[Any], str]] = {
    "tasks": _tasks_table, "task": _task_text, "upload": _uploaded_text, "create": _uploaded_text,
    "classify": _answers_text, "delete": lambda answer: f"deleted {answer['deleted']}", "health": _health_text,
    "versions": _versions_text, "activate": _uploaded_text, "aliases": _aliases_text, "alias": _aliases_text,
    "unalias": _aliases_text, "zero-shot": _zero_shot_text, "embed": _embeddings_text, "models": _models_text,
}


def _plain(answer: Any) -> Any:
    if isinstance(answer, list):
        return [_plain(item) for item in answer]
    return asdict(answer) if is_dataclass(answer) and not isinstance(answer, type) else answer


if __name__ == "__main__":
    sys.exit(main())
