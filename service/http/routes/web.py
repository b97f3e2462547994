"""The web page: plain HTML, JS and CSS shipped in the package (no CDN, no build step), served at /ui/."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

WEB_ROOT = Path(__file__).parents[2] / "assets" / "web"


def add_web_page(app: FastAPI) -> None:
    """Serve the page at /ui/ and send / there."""
    app.mount("/ui", StaticFiles(directory=WEB_ROOT, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/")
