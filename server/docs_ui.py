"""/docs (Swagger UI) served entirely by this server, so it works on a host without internet.

FastAPI's own /docs page loads Swagger UI's JavaScript and CSS from a CDN and its favicon from
fastapi.tiangolo.com: on an air-gapped host the page stays blank. Here the same page points at three
fixed routes that serve the files of the `swagger-ui-bundle-v2` package (Swagger UI 5, which reads
the OpenAPI 3.1 spec FastAPI writes). Fixed paths, no path parameter: no route reads a file a
request names. ReDoc (/redoc) is not served: no maintained package ships it.
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
# route -> (file in the package, media type)
ASSETS = {
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
    "/docs/swagger-ui.css": ("swagger-ui.css", "text/css"),
    "/docs/favicon.png": ("favicon-32x32.png", "image/png"),
}


@cache
def _read(name: str) -> bytes:
    return (swagger_ui_path / name).read_bytes()


def _asset_route(name: str, media_type: str):
    """A route without parameters that answers one fixed file of the package."""

    async def asset() -> Response:
        return Response(_read(name), media_type=media_type, headers={"cache-control": "public, max-age=86400"})

    return asset


def docs_router(title: str, openapi_url: str = "/openapi.json") -> APIRouter:
    """/docs, its OAuth2 redirect page and its assets, all from this server."""
    router = APIRouter(include_in_schema=False)

    @router.get(DOCS)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a prefix (Ray Serve, a proxy)
        js, css, icon = (root + route for route in ASSETS)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{title} - Swagger UI", swagger_js_url=js, swagger_css_url=css,
            swagger_favicon_url=icon, oauth2_redirect_url=root + OAUTH2_REDIRECT,
            swagger_ui_parameters={"validatorUrl": None},  # the default asks validator.swagger.io
        )

    @router.get(OAUTH2_REDIRECT)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    for route, (name, media_type) in ASSETS.items():
        router.add_api_route(route, _asset_route(name, media_type), methods=["GET"])
    return router
