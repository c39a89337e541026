"""The operator's dashboard over HTTP: ``/dashboard`` and its panels, for tokens with ``admin``.

The page is rendered on the server (Jinja templates in ``templates/``) and complete without
JavaScript; a small inline script re-fetches each panel's HTML fragment every few seconds, only
while the tab is visible. Every panel is also JSON (``/dashboard/panels/{panel}``).

A browser cannot send a bearer header when it navigates, so ``POST /dashboard/login`` takes the
token from a form and keeps it in an HttpOnly, SameSite=Strict cookie scoped to ``/dashboard``.
Every dashboard request goes through the service's one :func:`authorize` step with that token
(the ``Authorization`` header wins when both are present); other routes never read the cookie.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from faas.service._api import ErrorBody
from faas.service._dashboard import PANELS, logs_of, provenance_of
from faas.service._tenant import Tenant, authorize, authorize_request
from runtime import AuthError, ForbiddenError

COOKIE = "faas_dashboard"
COOKIE_SECONDS = 8 * 3600
REFRESH_MS = 2000
Panel = Literal["models", "queues", "tenants", "invocations", "triggers"]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (401, "Missing or wrong token (header or the dashboard's cookie)"),
        (403, "The token lacks the admin scope"),
        (404, "No such invocation (or no provenance yet)"),
    )
}
_HTML: dict[int | str, dict[str, Any]] = {200: {"content": {"text/html": {"schema": {"type": "string"}}}}}
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["ago"] = lambda when, now: f"{max(0.0, now - when):.0f}s" if when else ""
_templates.filters["secs"] = lambda s: "" if s is None else f"{s:.2f}"
_templates.filters["pct"] = lambda x: "—" if x is None else f"{100 * x:.0f}%"


def _admin(request: Request) -> Tenant:
    """The request's tenant (bearer header, else the dashboard cookie), which must have ``admin``."""
    header = request.headers.get("authorization", "")
    cookie = request.cookies.get(COOKIE)
    if not header and cookie:
        header = f"Bearer {cookie}"
    who = authorize(request.app.state.core.auth, header, "GET", request.url.path)
    if not who.may("admin"):
        raise ForbiddenError(
            f"The dashboard is for operators: tenant {who.name!r}'s token lacks 'admin'.", 403
        )
    return who


Admin = Annotated[Tenant, Depends(_admin)]


def render_page(core: Any) -> str:
    """The whole dashboard page, every panel rendered now."""
    now = time.time()
    panels = {name: gather(core) for name, gather in PANELS.items()}
    return _templates.get_template("dashboard.html").render(panels=panels, now=now, refresh_ms=REFRESH_MS)


def render_panel(name: str, data: dict[str, Any]) -> str:
    """One panel's HTML fragment (what the page's script swaps in)."""
    macros = _templates.get_template("panels.html").module
    return str(getattr(macros, name)(data, time.time()))


def install_dashboard_routes(app: FastAPI, core: Any) -> None:
    """Serve ``/dashboard``, its panels, its login and its links to logs and provenance."""

    @app.get("/dashboard/login", tags=["dashboard"], response_class=HTMLResponse)
    def login_form() -> HTMLResponse:
        """The dashboard's login form (it asks for an admin token; it shows nothing else)."""
        return HTMLResponse(_templates.get_template("login.html").render(error=None))

    @app.post(
        "/dashboard/login",
        tags=["dashboard"],
        status_code=303,
        response_class=RedirectResponse,
        responses={
            **_ERRORS,
            303: {"description": "Logged in: the cookie is set, on to /dashboard"},
            400: {"model": ErrorBody, "description": "Not a login form"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string"}},
                            "required": ["token"],
                        }
                    }
                },
            }
        },
    )
    async def login(request: Request) -> Response:
        """Check an admin token from the form and keep it in the dashboard's cookie."""
        try:
            form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
        except ValueError as exc:  # too many fields
            return JSONResponse({"error": {"type": "InvalidParameterError", "message": str(exc)}}, 400)
        token = (form.get("token") or [""])[0].strip()[:4096]
        try:
            who = await authorize_request(core.auth, f"Bearer {token}" if token else "", "GET", "/dashboard")
            if not who.may("admin"):
                raise ForbiddenError(f"Tenant {who.name!r}'s token lacks 'admin'.", 403)
        except (AuthError, ForbiddenError) as exc:
            status = 403 if isinstance(exc, ForbiddenError) else 401
            page = _templates.get_template("login.html").render(error=str(exc))
            if "text/html" in request.headers.get("accept", ""):
                return HTMLResponse(page, status)
            return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status)
        response = RedirectResponse("/dashboard", 303)
        response.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_SECONDS,
            path="/dashboard",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.get("/dashboard", tags=["dashboard"], response_class=HTMLResponse, responses={**_ERRORS, **_HTML})
    def dashboard(who: Admin) -> HTMLResponse:
        """The operator's page: models and replicas, queues, tenants' shares, invocations, triggers."""
        return HTMLResponse(render_page(core), headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/panels/{panel}", tags=["dashboard"], responses={**_ERRORS, **_HTML})
    def panel(
        who: Admin, request: Request, panel: Panel, fragment: Annotated[bool, Query()] = False
    ) -> Response:
        """One panel as JSON, or as the page's HTML fragment (``fragment=true`` or ``Accept: text/html``)."""
        data = PANELS[panel](core)
        accept = request.headers.get("accept", "")
        if fragment or accept.startswith("text/html"):
            return HTMLResponse(render_panel(panel, data), headers={"Cache-Control": "no-store"})
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    @app.get(
        "/dashboard/invocations/{invocation_id}/logs",
        tags=["dashboard"],
        response_class=PlainTextResponse,
        responses=_ERRORS,
    )
    def invocation_logs(who: Admin, invocation_id: str) -> PlainTextResponse:
        """Any tenant's invocation's captured stdout and stderr."""
        return PlainTextResponse(logs_of(core, invocation_id))

    @app.get("/dashboard/invocations/{invocation_id}/provenance", tags=["dashboard"], responses=_ERRORS)
    def invocation_provenance(who: Admin, invocation_id: str) -> dict[str, Any]:
        """Any tenant's invocation's provenance record (model, weights, engine, seeds, digests)."""
        return provenance_of(core, invocation_id)
