"""/docs works on a host without internet: the page and everything it loads come from this server."""

from __future__ import annotations

import re
import socket

import pytest

from tests.server.conftest import make_client


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection from this process fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_docs_and_every_asset_it_loads_are_served_locally(tiny_checkpoint, no_network):
    with make_client(tiny_checkpoint, warmup=False) as client:  # in-process: no socket is needed
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert sorted(urls) == ["/docs/favicon.png", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css",
                                "/openapi.json"]
        kinds = {"/docs/swagger-ui-bundle.js": "text/javascript", "/docs/swagger-ui.css": "text/css",
                 "/docs/favicon.png": "image/png", "/openapi.json": "application/json"}
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kinds[url]), url
        bundle = client.get("/docs/swagger-ui-bundle.js").text
        assert "SwaggerUIBundle" in bundle and len(bundle) > 500_000  # the real Swagger UI, not a stub
        assert '"validatorUrl": null' in html  # Swagger UI would otherwise call validator.swagger.io
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")  # what Swagger UI 5 reads
        assert client.get("/docs/oauth2-redirect").status_code == 200
        assert client.get("/redoc").status_code == 404  # no offline ReDoc: not offered


def test_docs_behind_a_prefix_points_at_the_prefixed_assets(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False) as client:
        html = client.get("/docs").text
        client.app.root_path = "/exitserve"
        prefixed = client.get("/docs").text
    assert 'src="/docs/swagger-ui-bundle.js"' in html
    assert 'src="/exitserve/docs/swagger-ui-bundle.js"' in prefixed and "url: '/exitserve/openapi.json'" in prefixed
