"""The rating web app: FastAPI, server-rendered HTML (Jinja2, autoescaped) and a little plain JavaScript.

    tether label serve --candidates cand.jsonl --db feedback.sqlite      # http://127.0.0.1:8000
    app = create_app(Store("feedback.sqlite"))                           # for tests: TestClient(app)

Routes (every one but /login needs a valid rater or admin token, else 401 with nothing behind it):
    GET  /login?token=T   a "Sign in as NAME" page whose form POSTs the token; sets no session, only a one-time
                          sign-in nonce cookie (HttpOnly, SameSite=Strict, Path=/login, 10 minutes)
    POST /login           form: token, nonce -> sets the session cookie (HttpOnly, SameSite=Lax) and 303 to /label or
                          /admin; 403 when Sec-Fetch-Site is sent and is not same-origin, when Origin (else Referer)
                          is another origin, or when the nonce does not match its cookie (login CSRF: another site
                          cannot sign a rater into the attacker's session)
    GET  /                redirects to /label (raters) or /admin (the admin)
    GET  /label           the rater's current comparison: prompt, A and B side by side, buttons / keys 1-4, reason,
                          undo, progress; after a choice it says whether the choice was saved
    POST /label           form: csrf, item_id, choice (A | B | tie | bad), reason -> 303 to /label
    POST /undo            form: csrf -> deletes the rater's last choice; its item comes back
    GET  /admin           labels per rater, throughput, agreement (percent, Cohen's kappa), gold accuracy (admin only)
    GET  /api/next        JSON {item, progress, csrf}: the same queue for scripts and custom front ends
    POST /api/label       JSON {item_id, choice, reason?} with header X-CSRF-Token -> {label_id, stored}
    POST /api/undo        header X-CSRF-Token -> {undone: item_id | null}
    GET  /static/NAME     app.js, app.css
A token comes from the cookie or an `Authorization: Bearer` header.

Untrusted text: completions and prompts are only ever rendered through autoescaped templates, and the
Content-Security-Policy allows scripts from /static only, so even markup that got through could not run.
Request bodies: BodyGuard (outside the app) refuses a body over MAX_BODY (1 MiB; /login: LOGIN_MAX_BODY, 4 KiB) with
413 before reading it (Content-Length over the cap), or as soon as a chunked body passes the cap, and answers a
request with a body that has no valid token with 401 before reading any of it; the app never sees either.
Item ids are checked at the edge: not an integer -> 400, an integer no item can have (< 1 or >= 2^63) -> 404.
Cross-site requests: every POST carries a CSRF token (HMAC of the session's token hash with a per-database secret)
in a form field or the X-CSRF-Token header, and a POST whose Origin (or Referer) is another site is refused; the
cookie is SameSite=Lax as well. Errors: HTTP errors render a one-line page, anything unexpected a generic 500 page;
tracebacks go to the server log, never to the client. The access log is off because /login URLs carry tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from fastapi import Body, Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from tether.feedback import stats
from tether.feedback.store import CHOICES, NotAssigned, Rater, Store

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "tether_session"
LOGIN_COOKIE = "tether_login"  # the sign-in page's nonce (see POST /login)
MAX_REASON = 2000
MAX_BODY = 1 << 20  # every route's forms and JSON are a few KiB at most (a 2,000-character reason, escaped)
LOGIN_MAX_BODY = 4096  # POST /login is read without a session: a token and a nonce
MAX_ITEM_ID = 2**63 - 1  # SQLite's largest integer; ids start at 1
SCOPE_RATER = "tether.rater"  # the rater BodyGuard found for a request with a body, so the app need not look again
SIGN_IN = "Open your personal link to sign in."
NO_ITEM = "No such item."
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
NOTICES = {"saved": "Saved.", "repeat": "Already saved (stored once).", "undone": "Undone: choose again.",
           "nothing": "Nothing to undo."}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: then Chromium sends `Origin: null` on POSTs
    "Cache-Control": "no-store",
}
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
LOGIN_PAGE = TEMPLATES.from_string("""{% extends "base.html" %}
{% block title %}sign in · tether feedback{% endblock %}
{% block body %}
<main class="message">
  <h1>Sign in as {{ name }}</h1>
  <p>Continue only if this is your own personal link.</p>
  <form id="login" method="post" action="/login">
    <input type="hidden" name="token" value="{{ token }}">
    <input type="hidden" name="nonce" value="{{ nonce }}">
    <button type="submit" id="sign-in">Sign in</button>
  </form>
</main>
{% endblock %}""")  # autoescaped too (select_autoescape escapes templates from strings); no script, no style


def fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"  # NaN -> dash


def pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.0f}%"


def prompt_text(prompt) -> str:
    """A prompt for display: the string, or one "role: content" line per chat turn."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def page(name: str, code: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(fmt=fmt, pct=pct, **context), status_code=code)


def message(status: int, text: str) -> HTMLResponse:
    return page("message.html", status, status=status, message=text, styled=False)


# The 500 page is a constant, so that an error while rendering templates cannot turn into a traceback.
SERVER_ERROR = "Something went wrong on the server; your confirmed choices are safe."
SERVER_ERROR_PAGE = f"<!doctype html><title>500</title><h1>500</h1><p>{SERVER_ERROR}</p>"


def error_response(path: str, status: int, text: str):
    """JSON {"error": text} under /api/, else the one-line message page."""
    return JSONResponse({"error": text}, status) if path.startswith("/api/") else message(status, text)


def token_of(conn: HTTPConnection) -> str | None:
    """The token of a request: `Authorization: Bearer T`, else the session cookie."""
    auth = conn.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else conn.cookies.get(COOKIE)


def same_text(supplied, expected: str) -> bool:
    """Constant-time comparison of a client's value with ours (bytes: compare_digest refuses non-ASCII str)."""
    return isinstance(supplied, str) and hmac.compare_digest(supplied.encode(), expected.encode())


def parse_item_id(value) -> int:
    """An item id from a form field (decimal ASCII digits) or JSON (an integer, not a bool or float): 400 when it
    is not an integer, 404 when it is one that no item can have (below 1 or past SQLite's 2^63 - 1)."""
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        if not (digits.isascii() and digits.isdigit()):
            raise HTTPException(400, "item_id must be an integer.")
        if text.startswith("-") or len(digits.lstrip("0")) > 19:  # 19 digits: never past int() limits either
            raise HTTPException(404, NO_ITEM)
        value = int(digits)
    elif not isinstance(value, int) or isinstance(value, bool):
        raise HTTPException(400, "item_id must be an integer.")
    if not 1 <= value <= MAX_ITEM_ID:
        raise HTTPException(404, NO_ITEM)
    return value


def same_origin(request: Request, strict: bool = False) -> bool:
    """False when the browser says the request comes from another site (Origin, else Referer, Sec-Fetch-Site).
    strict (sign-in): Sec-Fetch-Site, when sent, must be same-origin (same-site and none are refused too)."""
    site = request.headers.get("sec-fetch-site")
    if site == "cross-site" or (strict and site not in (None, "same-origin")):
        return False
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is None and request.headers.get("referer"):
        parts = urlsplit(request.headers["referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin is None or origin == own  # non-browser clients send neither; they still need the CSRF token


def create_app(store: Store) -> SecurityHeaders:
    """The app over one store (see the module docstring for the routes)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    secret = (store.meta("secret") or "").encode()

    def csrf_for(rater: Rater) -> str:
        return hmac.new(secret, rater.token_hash.encode(), hashlib.sha256).hexdigest()

    def session(request: Request) -> Rater:
        rater = request.scope.get(SCOPE_RATER) or store.rater_for_token(token_of(request))
        if rater is None:
            raise HTTPException(401, SIGN_IN)
        return rater

    def rater_session(request: Request) -> Rater:
        rater = session(request)
        if rater.is_admin:
            raise HTTPException(403, "This is the admin account; the admin page is /admin.")
        return rater

    def checked_post(request: Request, rater: Rater, supplied: str | None) -> None:
        if not same_origin(request):
            raise HTTPException(403, "Cross-site request refused.")
        if not same_text(supplied, csrf_for(rater)):
            raise HTTPException(403, "Missing or wrong form token; reload the page.")

    def parse_choice(item_id, choice, reason) -> tuple[int, str, str]:
        item = parse_item_id(item_id)
        if choice not in CHOICES:
            raise HTTPException(400, f"choice must be one of {', '.join(CHOICES)}.")
        reason = "" if reason is None else reason
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise HTTPException(400, f"reason must be text of at most {MAX_REASON} characters.")
        return item, choice, reason.strip()

    def submit(rater: Rater, item_id, choice, reason) -> tuple[int, bool]:
        item, choice, reason = parse_choice(item_id, choice, reason)
        try:
            return store.submit(rater.id, item, choice, reason)
        except NotAssigned:
            raise HTTPException(409, "That item is not in your queue.") from None

    # --- errors and headers -------------------------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, exc: RequestValidationError):
        return http_error(request, HTTPException(400, "Malformed request."))

    @app.exception_handler(Exception)
    def server_error(request: Request, exc: Exception):
        log.exception("error serving %s %s", request.method, request.url.path)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": SERVER_ERROR}, 500)
        return HTMLResponse(SERVER_ERROR_PAGE, 500)

    # --- pages --------------------------------------------------------------------------------------------------
    @app.get("/login")
    def login_page(token: str = ""):
        # No session here: a cross-site link or redirect to this URL must not sign anyone in. The rater confirms
        # on our own page, whose POST carries a nonce that only this browser has (its cookie) and only this page
        # shows (the response is no-store and cannot be framed or read by another site).
        rater = store.rater_for_token(token)
        if rater is None:
            raise HTTPException(401, "This link is not valid.")
        nonce = secrets.token_urlsafe(24)
        response = HTMLResponse(LOGIN_PAGE.render(name=rater.name, token=token, nonce=nonce, styled=False))
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=600, path="/login", httponly=True, samesite="strict")
        return response

    @app.post("/login")
    def login_post(request: Request, token: str = Form(""), nonce: str = Form("")):
        if not same_origin(request, strict=True):
            raise HTTPException(403, "Cross-site sign-in refused: open your personal link yourself.")
        if not nonce or not same_text(nonce, request.cookies.get(LOGIN_COOKIE) or ""):
            raise HTTPException(403, "This sign-in page has expired: open your personal link again.")
        rater = store.rater_for_token(token)
        if rater is None:
            raise HTTPException(401, "This link is not valid.")
        response = RedirectResponse("/admin" if rater.is_admin else "/label", 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="lax", max_age=30 * 24 * 3600)
        response.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict")
        return response

    @app.get("/")
    def home(rater: Rater = Depends(session)):
        return RedirectResponse("/admin" if rater.is_admin else "/label", 303)

    @app.get("/label")
    def label_page(notice: str = "", rater: Rater = Depends(rater_session)):
        item = store.next_item(rater.id)
        return page("label.html", rater=rater.name, item=item, prompt=prompt_text(item.prompt) if item else "",
                    progress=store.progress(rater.id), csrf=csrf_for(rater), notice=NOTICES.get(notice, ""),
                    max_reason=MAX_REASON, styled=True)

    @app.post("/label")
    def label_post(request: Request, rater: Rater = Depends(rater_session), csrf: str = Form(""),
                   item_id: str = Form(""), choice: str = Form(""), reason: str = Form("")):
        checked_post(request, rater, csrf)
        _, stored = submit(rater, item_id, choice, reason)
        return RedirectResponse(f"/label?notice={'saved' if stored else 'repeat'}", 303)

    @app.post("/undo")
    def undo_post(request: Request, rater: Rater = Depends(rater_session), csrf: str = Form("")):
        checked_post(request, rater, csrf)
        undone = store.undo(rater.id)
        return RedirectResponse(f"/label?notice={'nothing' if undone is None else 'undone'}", 303)

    @app.get("/admin")
    def admin(rater: Rater = Depends(session)):
        if not rater.is_admin:
            raise HTTPException(403, "The admin page needs the admin link.")
        labels, items, now = store.labels(), store.item_rows(), time.time()
        counts: dict[int, int] = {}
        for label in labels:
            counts[label["item_id"]] = counts.get(label["item_id"], 0) + 1
        r = store.raters_per_item
        overview = {"total": len(items), "gold": sum(i["gold"] is not None for i in items),
                    "complete": sum(counts.get(i["id"], 0) >= r for i in items if i["gold"] is None)}
        return page("admin.html", items=overview, raters_per_item=r, total=stats.throughput(labels, now),
                    raters=stats.rater_table(labels, now), agreement=stats.agreement_table(labels), styled=True)

    @app.get("/static/{name}")
    def static(name: str, rater: Rater = Depends(session)):
        if name not in STATIC:
            raise HTTPException(404, "Not found.")
        return FileResponse(HERE / "static" / name, media_type=STATIC[name])

    # --- JSON -----------------------------------------------------------------------------------------------------
    @app.get("/api/next")
    def api_next(rater: Rater = Depends(rater_session)):
        item = store.next_item(rater.id)
        shown = None if item is None else {"id": item.id, "prompt": item.prompt, "a": item.a, "b": item.b,
                                           "critique_a": item.critique_a, "critique_b": item.critique_b}
        return {"item": shown, "progress": store.progress(rater.id), "csrf": csrf_for(rater)}

    @app.post("/api/label")
    def api_label(request: Request, rater: Rater = Depends(rater_session), payload: dict = Body(...)):
        checked_post(request, rater, request.headers.get("x-csrf-token"))
        label_id, stored = submit(rater, payload.get("item_id"), payload.get("choice"), payload.get("reason"))
        return {"label_id": label_id, "stored": stored}

    @app.post("/api/undo")
    def api_undo(request: Request, rater: Rater = Depends(rater_session)):
        checked_post(request, rater, request.headers.get("x-csrf-token"))
        return {"undone": store.undo(rater.id)}

    return SecurityHeaders(BodyGuard(app, store))


class BodyGuard:
    """ASGI wrapper that bounds request bodies before the app reads any of them (FastAPI reads a route's whole body
    before its dependencies, the session check included, would run):
    - the cap is MAX_BODY, LOGIN_MAX_BODY on /login; a Content-Length over it -> 413 at once, nothing read;
    - a request with a body (Content-Length > 0, Transfer-Encoding, or any method but GET / HEAD / OPTIONS) outside
      /login needs a valid token first -> else 401 (the app's page or JSON), nothing read;
    - then the body is read here, counting bytes as they arrive (chunked bodies have no length to check), -> 413 as
      soon as it passes the cap; else the app gets it in one message.
    Refusals close the connection (the unread rest of the body is not drained); the app is not called for them."""

    def __init__(self, app, store: Store):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        login = scope["path"] == "/login"
        limit = LOGIN_MAX_BODY if login else MAX_BODY
        length = conn.headers.get("content-length")

        async def refuse(response) -> None:
            response.headers["connection"] = "close"
            await response(scope, receive, send)

        def too_large():
            return JSONResponse({"error": f"Request body too large: at most {limit} bytes."}, 413)

        if length is not None:
            length = length.strip()
            if not (length.isascii() and length.isdigit()):
                return await refuse(JSONResponse({"error": "Bad Content-Length."}, 400))
            if len(length) > 18 or int(length) > limit:
                return await refuse(too_large())
        has_body = bool(int(length or 0)) or "transfer-encoding" in conn.headers
        if not has_body and scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)  # nothing to read: the app checks the session itself
        if not login:
            rater = await run_in_threadpool(self.store.rater_for_token, token_of(conn))
            if rater is None:
                return await refuse(error_response(scope["path"], 401, SIGN_IN))
            scope = {**scope, SCOPE_RATER: rater}
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await refuse(too_large())
            if not event.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class SecurityHeaders:
    """ASGI wrapper adding HEADERS to every response (plain ASGI: Starlette's BaseHTTPMiddleware would add a task
    and a body stream to every request)."""

    def __init__(self, app):
        self.app = app
        self.extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self.extra}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


# --- running it -----------------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn in a daemon thread (the loop's human rounds, tests): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the feedback server did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground until interrupted."""
    print(json.dumps({"serving": f"http://{host}:{port}", "db": store.path}), flush=True)
    uvicorn.run(create_app(store), host=host, port=port, log_level="warning", access_log=False)
