"""`python -m service` (or `promptserve serve`): serve the configured backbone and registry with uvicorn."""

from __future__ import annotations

import argparse
import logging

from service.app import create_app
from service.config import Settings
from service.server import serve


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(create_app(settings), settings, args.host, args.port)


if __name__ == "__main__":  # `python -m service` is the `promptserve` command: serve by default, or a subcommand
    from service.cli import main as cli

    raise SystemExit(cli())
