"""Swagger UI (/docs) and ReDoc (/redoc) from files shipped in a Python package: no CDN, so the pages work in
air-gapped clusters. The assets come from `fastapi-offline` (MIT; Swagger UI is Apache-2.0, ReDoc MIT)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
ASSET_DIR = files("fastapi_offline") / "static"


def add_docs_pages(app: FastAPI) -> None:
    """For an app made with docs_url=None and redoc_url=None (and an OpenAPI document, which the pages show)."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the docs pages show the OpenAPI document: make the app with an openapi_url")
    app.mount(ASSETS, StaticFiles(directory=str(ASSET_DIR)), name="docs-assets")
    title, favicon = f"{app.title} API", f"{ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=title, swagger_favicon_url=favicon,
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=title, redoc_favicon_url=favicon,
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js", with_google_fonts=False)
