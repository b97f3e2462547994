"""`python -m service` (or `promptserve`): serve the configured backbone and registry with uvicorn."""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin: request threads decode images on the same cores (set before
# torch loads its OpenMP runtime, which reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402

import uvicorn  # noqa: E402

from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
