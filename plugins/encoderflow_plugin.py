"""Airflow 3 plugin: the "Encoderflow runs" page, served by the api-server and linked in the navigation.

Airflow mounts a plugin's FastAPI app beside its own API but does not put it behind Airflow's
authentication: every route here asks the configured auth manager itself. A request must carry
the UI's session cookie or an ``Authorization: Bearer`` token of a user allowed to read the DAG's
runs; anything else gets 401 (no or bad credentials) or 403 (not allowed), and no run data.

Every Airflow component imports this module, so it imports only FastAPI at load time; Airflow's
API internals, the metadata DB and MLflow are touched only when a page is served.
"""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Any

import encoderflow_runs_page as page
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from encoderflow import layout, runs

log = logging.getLogger(__name__)
URL_PREFIX = "/encoderflow"

app = FastAPI(title="Encoderflow runs", docs_url=None, redoc_url=None, openapi_url=None)


class NotSignedIn(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


async def reader(request: Request) -> Any:
    """The signed-in user, if the auth manager lets them read encoder_pretraining's runs."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    try:
        user = await resolve_user_from_token(token)
    except HTTPException as exc:
        raise NotSignedIn(401, str(exc.detail)) from None
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        allowed = await asyncio.to_thread(
            get_auth_manager().is_authorized_dag,
            method="GET",
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=page.DAG_ID),
            user=user,
        )
    except (OperationalError, DBAPIError) as exc:
        # With PostgreSQL down the page was a bare 500 (and a second traceback from the middleware).
        raise Unavailable(f"Airflow's metadata database does not answer ({type(exc.orig).__name__})") from None
    if not allowed:
        raise NotSignedIn(403, f"{user.get_name()} may not read {page.DAG_ID} runs")
    return user


class Unavailable(Exception):
    def __init__(self, detail: str):
        self.detail = detail


@app.exception_handler(Unavailable)
async def _unavailable(request: Request, exc: Unavailable):
    detail = (
        f"{exc.detail}: who may read runs cannot be checked. `encoderflow runs` on the Airflow host reads the run "
        "folders without it; `make stack-status` says which part is down."
    )
    if "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "30"})
    body = f"<!doctype html><title>Encoderflow runs: unavailable</title><p>{html.escape(detail)}</p>"
    return HTMLResponse(body, status_code=503, headers={"Retry-After": "30"})


@app.exception_handler(NotSignedIn)
async def _refuse(request: Request, exc: NotSignedIn):
    if "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)
    from airflow.api_fastapi.app import get_auth_manager

    login = get_auth_manager().get_url_login(next_url=str(request.url))
    body = (
        f"<!doctype html><title>Sign in</title><p>{html.escape(exc.detail)}. "
        f"<a target='_top' href='{html.escape(login)}'>Sign in to Airflow</a> to see Encoderflow runs.</p>"
    )
    return HTMLResponse(body, status_code=exc.status)


def _dag_runs(limit: int = 200) -> list[dict[str, Any]]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from encoderflow.runs import mark_stopped

    with create_session() as session:
        rows = session.scalars(
            select(DagRun).where(DagRun.dag_id == page.DAG_ID).order_by(DagRun.id.desc()).limit(limit)
        ).all()
        return mark_stopped(
            [
                {
                    "run_id": r.run_id,
                    "state": str(r.state.value if hasattr(r.state, "value") else r.state),
                    # A clear resets start_date: the page orders by run_after, as `encoderflow runs` does.
                    "run_after": r.run_after.isoformat() if r.run_after else None,
                    "start_date": r.start_date.isoformat() if r.start_date else None,
                    "end_date": r.end_date.isoformat() if r.end_date else None,
                    "conf": dict(r.conf or {}),
                }
                for r in rows
            ]
        )


def _snapshot(model: str) -> dict[str, Any]:
    home = layout.home()
    try:
        dag_runs = _dag_runs()
    except Exception as exc:  # noqa: BLE001 - the folders still tell most of the story
        log.warning("encoderflow runs page: cannot read DAG runs: %s", exc)
        dag_runs = []
    return {
        "model": model,
        # Newest first by date, as `encoderflow runs` lists them: a folder no Airflow knows (a reset DB,
        # a run pruned from Airflow by `airflow db clean`) sorts by its run id's date, not last.
        "runs": runs.newest_first(runs.collect_runs(home, dag_runs)),
        "registry": page.registry_state(home, model),
        "mlflow_ui": page.mlflow_ui_url(),
    }


@app.get("/", response_class=HTMLResponse)
def runs_page(request: Request, user=Depends(reader), model: str = page.DEFAULT_MODEL) -> Response:
    if not request.url.path.endswith("/"):  # the page's links are relative to <prefix>/encoderflow/
        return RedirectResponse(request.url.path + "/" + (f"?{request.url.query}" if request.url.query else ""))
    snap = _snapshot(model)
    return HTMLResponse(
        page.render(snap["runs"], snap["registry"], model, snap["mlflow_ui"], user.get_name()),
        headers={"Cache-Control": "no-store"},
    )


@app.get("/runs.json")
def runs_json(user=Depends(reader), model: str = page.DEFAULT_MODEL) -> JSONResponse:
    # Strict JSON (JSONResponse refuses NaN): a NaN a run recorded is null here, not a 500.
    return JSONResponse(runs.jsonable(_snapshot(model)), headers={"Cache-Control": "no-store"})


@app.get("/runs/{folder}/data_docs/{rel:path}")
def data_docs(folder: str, rel: str, user=Depends(reader)) -> FileResponse:
    path = page.data_docs_file(layout.home(), folder, rel)
    if path is None:
        raise HTTPException(404, "no such Data Docs file")
    return FileResponse(path, headers=DATA_DOCS_HEADERS)


# Data Docs print the validated data's values (a label, a sentence) into HTML as they are: a row holding
# a <script> ran with the signed-in user's Airflow session (the API takes its cookie). The pages are
# read, not run: no script, plugin, form or <base> of theirs is let do anything on Airflow's origin.
DATA_DOCS_HEADERS = {
    "Content-Security-Policy": "script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}


class PageWithoutSlash:
    """ASGI middleware on Airflow's root app: ``<base>/encoderflow`` (no slash) is outside the mounted app
    and got the UI's "404 Page Not Found"; it is sent to the page. Nothing else is touched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path in (URL_PREFIX, scope.get("root_path", "") + URL_PREFIX):
            query = scope.get("query_string", b"").decode("latin-1")
            await RedirectResponse(path + "/" + (f"?{query}" if query else ""))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class EncoderflowPlugin(AirflowPlugin):
    name = "encoderflow"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Encoderflow runs"}]
    fastapi_root_middlewares = [{"middleware": PageWithoutSlash, "name": "encoderflow page without slash"}]
    # url_route: shown inside the Airflow UI (an iframe under /plugin/encoderflow-runs), with the
    # UI's navigation around it. The relative href keeps it working under a base_url prefix.
    external_views = [
        {
            "name": "Encoderflow runs",
            "href": "encoderflow/",
            "url_route": "encoderflow-runs",
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
