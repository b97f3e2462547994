"""`promptserve`: serve the API (the default), or talk to a running service.

    promptserve [serve] [--host H] [--port P]
    promptserve tasks | task NAME | upload TASK FILE | delete TASK | health
    promptserve classify FILE... --task T [--task U] [--top-k K]

Client commands take --url and --token (env PROMPTSERVE_URL, PROMPTSERVE_ADMIN_TOKEN) and --json.
Only `serve` imports the service itself (torch, open_clip); the others need just httpx.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import httpx

from promptserve_client import Client, ImageAnswer, PromptserveError, TaskSummary
from promptserve_client.client import DEFAULT_URL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "serve" or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return serve(argv[1:] if argv and argv[0] == "serve" else argv)
    args = parser().parse_args(argv)
    try:
        with Client(args.url, args.token) as client:
            answer = COMMANDS[args.command](client, args)
    except PromptserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
    from service.http.server import serve as run_server

    try:
        settings = Settings()
    except ValidationError as exc:  # refuse to start, saying which PROMPTSERVE_* setting is wrong
        problems = "; ".join(f"{'PROMPTSERVE_' + str(e['loc'][0]).upper() if e['loc'] else 'settings'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        print(f"error: {problems}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="promptserve serve", description="serve the promptserve API")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(create_app(settings), settings, args.host, args.port)
    return 0


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
    commands.add_parser("tasks", parents=[common], help="list the active tasks")
    commands.add_parser("task", parents=[common], help="describe a task").add_argument("name")
    upload = commands.add_parser("upload", parents=[common], help="upload a bundle as a task's new version")
    upload.add_argument("task")
    upload.add_argument("file")
    commands.add_parser("delete", parents=[common], help="delete a task and its versions").add_argument("task")
    commands.add_parser("versions", parents=[common], help="a task's stored versions and aliases").add_argument("task")
    activate = commands.add_parser("activate", parents=[common], help="make a stored version (number or alias) active")
    activate.add_argument("task")
    activate.add_argument("version")
    classify = commands.add_parser("classify", parents=[common], help="classify image files")
    classify.add_argument("files", nargs="+", metavar="FILE")
    classify.add_argument("--task", dest="tasks", action="append", required=True, help="task to answer, repeatable")
    classify.add_argument("--top-k", type=int, default=3, help="predictions per image and task (default %(default)s)")
    commands.add_parser("health", parents=[common], help="the service's readiness")
    return root


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "tasks": lambda client, args: client.tasks(),
    "task": lambda client, args: client.task(args.name),
    "upload": lambda client, args: client.upload(args.task, args.file),
    "delete": lambda client, args: _delete(client, args.task),
    "versions": lambda client, args: client.versions(args.task),
    "activate": lambda client, args: client.activate(args.task, args.version),
    "classify": lambda client, args: client.classify(args.files, args.tasks, args.top_k),
    "health": lambda client, args: client.health(),
}


def _delete(client: Client, task: str) -> dict[str, str]:
    client.delete(task)
    return {"deleted": task}


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _tasks_table(tasks: list[TaskSummary]) -> str:
    return _table([("TASK", "METHOD", "VERSION", "CLASSES")] + [(t.name, t.method, str(t.version), str(t.num_classes))
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


HUMAN: dict[str, Callable[[Any], str]] = {
    "tasks": _tasks_table, "task": _task_text, "upload": _uploaded_text, "classify": _answers_text,
    "delete": lambda answer: f"deleted {answer['deleted']}", "health": _health_text, "versions": _versions_text,
    "activate": _uploaded_text,
}


def _plain(answer: Any) -> Any:
    if isinstance(answer, list):
        return [_plain(item) for item in answer]
    return asdict(answer) if is_dataclass(answer) and not isinstance(answer, type) else answer


if __name__ == "__main__":
    sys.exit(main())
