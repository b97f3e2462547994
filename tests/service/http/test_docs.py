"""Swagger UI and ReDoc come from the package: every asset URL is local and answers."""

import re

import pytest

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_local_assets_that_exist(client, page):  # noqa: F811
    response = await client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", response.text)
    assert urls, response.text
    assert not [u for u in urls if "//" in u], f"{page} reaches outside the service: {urls}"
    assert "cdn" not in response.text.lower() and "googleapis" not in response.text
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200 and asset.content, url
