"""Every route of the rating app through FastAPI's TestClient: auth (401 / 403), CSRF and Origin checks, bad input
(400 / 404 / 409), double submission stored once, undo, escaping of untrusted text, the admin numbers, no tracebacks,
login CSRF (the link only shows a form; a cross-site sign-in POST is refused). Body caps go through the real server
(uvicorn on loopback) with raw sockets, so that what is sent, and when the answer comes, is under the test's control."""

import json
import re
import socket
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from tether.feedback.app import LOGIN_MAX_BODY, MAX_BODY, BackgroundServer, create_app
from tether.feedback.store import Store

SECRET_PROMPT = "prompt-only-raters-may-see"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
ROUTES = [("get", "/"), ("get", "/label"), ("get", "/admin"), ("get", "/api/next"), ("get", "/static/app.js"),
          ("post", "/label"), ("post", "/undo"), ("post", "/api/label"), ("post", "/api/undo")]


@pytest.fixture
def env(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    store.add_items([{"prompt": SECRET_PROMPT, "responses": [XSS, "plain answer"], "critiques": ["c0 <b>", "c1"]},
                     {"prompt": "second prompt", "responses": ["one", "two"]}])
    tokens = {"alice": store.add_rater("alice"), "bob": store.add_rater("bob"), "admin": store.add_rater("admin", True)}
    return store, TestClient(create_app(store), raise_server_exceptions=False), tokens


def login_nonce(client, token):
    """Open the personal link: a page with a form (and no session yet); returns the form's nonce."""
    page = client.get("/login", params={"token": token}, follow_redirects=False)
    assert page.status_code == 200 and "tether_session" not in page.headers.get("set-cookie", "")
    return re.search(r'name="nonce" value="([^"]*)"', page.text).group(1)


def login(client, token, headers=None):
    """Open the link and submit its form, as a browser on this site does."""
    nonce = login_nonce(client, token)
    headers = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"} if headers is None else headers
    response = client.post("/login", data={"token": token, "nonce": nonce}, headers=headers, follow_redirects=False)
    assert response.status_code == 303
    return response


def session_cookie(response) -> str:
    (cookie,) = [c for c in response.headers.get_list("set-cookie") if c.startswith("tether_session=")]
    return cookie.lower()


def form_fields(html):
    return {name: value for name, value in re.findall(r'name="(csrf|item_id)" value="([^"]*)"', html)}


@pytest.mark.parametrize("method, path", ROUTES)
def test_without_a_valid_token_every_route_is_401_and_shows_nothing(env, method, path):
    store, client, _ = env
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "tether_session=forged"}):
        response = getattr(client, method)(path, headers=headers, follow_redirects=False)
        assert response.status_code == 401, (path, headers)
        assert SECRET_PROMPT not in response.text and "plain answer" not in response.text
    assert client.get("/login", params={"token": "nope"}).status_code == 401
    assert store.labels() == []


def test_login_cookie_roles_and_headers(env):
    _, client, tokens = env
    response = login(client, tokens["alice"])
    assert response.headers["location"] == "/label"
    cookie = session_cookie(response)
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/admin").status_code == 403
    assert client.get("/", follow_redirects=False).headers["location"] == "/label"
    page = client.get("/label")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "same-origin"
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/static/../store.py").status_code == 404
    assert client.get("/static/store.py").status_code == 404
    admin = TestClient(client.app)
    assert login(admin, tokens["admin"]).headers["location"] == "/admin"
    assert admin.get("/label").status_code == 403 and admin.get("/api/next").status_code == 403
    bearer = TestClient(client.app, headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert bearer.get("/api/next").json()["item"] is not None


def test_label_page_escapes_untrusted_text(env):
    _, client, tokens = env
    login(client, tokens["alice"])
    html = ""
    for _ in range(2):  # the XSS item is one of two; label until it was shown
        html = client.get("/label").text
        if "plain answer" in html:
            break
        fields = form_fields(html)
        client.post("/label", data={**fields, "choice": "tie"})
    assert SECRET_PROMPT in html
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html and "<script>window" not in html
    assert "<img src=x" not in html and "c0 &lt;b&gt;" in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js">']


def test_choice_is_stored_once_and_undo_reopens(env):
    store, client, tokens = env
    login(client, tokens["alice"])
    fields = form_fields(client.get("/label").text)
    first = client.post("/label", data={**fields, "choice": "A", "reason": "clearer"}, follow_redirects=False)
    assert (first.status_code, first.headers["location"]) == (303, "/label?notice=saved")
    again = client.post("/label", data={**fields, "choice": "B"}, follow_redirects=False)
    assert again.headers["location"] == "/label?notice=repeat"
    (label,) = store.labels()
    assert (label["item_id"], label["choice"], label["reason"], label["rater"]) == (
        int(fields["item_id"]), "A", "clearer", "alice")
    page = client.get("/label?notice=saved").text
    assert "Saved." in page and "1 labelled · 1 left" in page
    undone = client.post("/undo", data={"csrf": fields["csrf"]}, follow_redirects=False)
    assert undone.headers["location"] == "/label?notice=undone" and store.labels() == []
    assert form_fields(client.get("/label").text)["item_id"] == fields["item_id"]  # the same item again
    assert client.post("/undo", data={"csrf": fields["csrf"]}, follow_redirects=False).headers["location"] == \
        "/label?notice=nothing"


def test_posts_need_the_csrf_token_and_same_origin(env):
    store, client, tokens = env
    login(client, tokens["alice"])
    fields = form_fields(client.get("/label").text)
    good = {**fields, "choice": "A"}
    assert client.post("/label", data={**good, "csrf": ""}).status_code == 403
    assert client.post("/label", data={**good, "csrf": "0" * 64}).status_code == 403
    bob = TestClient(client.app)
    login(bob, tokens["bob"])
    bob_csrf = form_fields(bob.get("/label").text)["csrf"]
    assert client.post("/label", data={**good, "csrf": bob_csrf}).status_code == 403  # per-session token
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        assert client.post("/label", data=good, headers=headers).status_code == 403, headers
    assert client.post("/api/label", json={"item_id": int(fields["item_id"]), "choice": "A"}).status_code == 403
    assert client.post("/api/undo").status_code == 403
    assert store.labels() == []
    ok = client.post("/label", data=good, headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert ok.status_code == 303 and len(store.labels()) == 1


def test_bad_input_is_400_or_409_with_a_short_message(env):
    store, client, tokens = env
    login(client, tokens["alice"])
    fields = form_fields(client.get("/label").text)
    item, csrf = int(fields["item_id"]), fields["csrf"]
    cases = [({**fields, "choice": "C"}, 400, "choice must be one of"),
             ({**fields, "choice": ""}, 400, "choice"),
             ({**fields, "item_id": "abc", "choice": "A"}, 400, "item_id must be an integer"),
             ({**fields, "item_id": str(item + 100), "choice": "A"}, 409, "not in your queue"),
             ({**fields, "choice": "A", "reason": "x" * 2001}, 400, "at most 2000")]
    for data, status, text in cases:
        response = client.post("/label", data=data)
        assert response.status_code == status and text in response.text, data
    api = {"X-CSRF-Token": csrf}
    assert client.post("/api/label", content=b"{not json", headers={**api, "Content-Type": "application/json"}
                       ).status_code == 400
    assert client.post("/api/label", json=[1, 2], headers=api).status_code == 400
    for bad_id in (True, 1.5, "1e3", None):
        assert client.post("/api/label", json={"item_id": bad_id, "choice": "A"}, headers=api).status_code == 400
    assert client.post("/api/label", json={"item_id": item, "choice": "A", "reason": 5}, headers=api).status_code == 400
    assert client.post("/api/label", json={"item_id": item, "choice": "nope"}, headers=api).json() == {
        "error": "choice must be one of A, B, tie, bad."}
    assert store.labels() == []


def test_json_api_round_trip(env):
    store, client, tokens = env
    login(client, tokens["bob"])
    first = client.get("/api/next").json()
    assert first["progress"] == {"done": 0, "left": 2} and first["item"]["prompt"] in (SECRET_PROMPT, "second prompt")
    headers = {"X-CSRF-Token": first["csrf"]}
    stored = client.post("/api/label", json={"item_id": first["item"]["id"], "choice": "tie"}, headers=headers).json()
    assert stored["stored"] is True
    repeat = client.post("/api/label", json={"item_id": first["item"]["id"], "choice": "A"}, headers=headers).json()
    assert repeat == {"label_id": stored["label_id"], "stored": False}
    assert client.post("/api/undo", headers=headers).json() == {"undone": first["item"]["id"]}
    assert client.post("/api/undo", headers=headers).json() == {"undone": None}
    assert client.get("/api/next").json()["item"]["id"] == first["item"]["id"]
    assert store.labels() == []


def test_admin_page_numbers(env):
    store, client, tokens = env
    store.set_meta("raters_per_item", "2")
    store.add_items([{"prompt": "gold prompt", "responses": ["right", "wrong"], "gold": 0}])
    # canonical verdicts: first item alice 0 / bob 1, second 1 / 1, gold 0 / 0 (both right) -> p_o = 2/3;
    # alice has 0,1,0 and bob 1,1,0: p_e = (2·1 + 1·2)/9 = 4/9 -> κ = (2/3 − 4/9)/(1 − 4/9) = 0.4
    plan = {SECRET_PROMPT: {"alice": 0, "bob": 1}, "second prompt": {"alice": 1, "bob": 1},
            "gold prompt": {"alice": 0, "bob": 0}}
    for name in ("alice", "bob"):
        rater = store.rater_for_token(tokens[name])
        while (item := store.next_item(rater.id)) is not None:
            store.submit(rater.id, item.id, "A" if int(item.swapped) == plan[item.prompt][name] else "B")
    login(client, tokens["admin"])
    html = client.get("/admin").text
    assert "3 items (1 gold) · 2 raters per item" in html and "2 items fully labelled · 6 labels" in html
    assert re.search(r"<td>alice / bob</td><td>3</td><td>66.67%</td><td>0.40</td>", html)
    assert re.search(r"<td>alice</td><td>3</td><td>3</td><td>[0-9.]+</td>\s*<td>1</td><td>100%</td>", html)


def test_errors_never_leak_a_traceback(env, monkeypatch):
    store, client, tokens = env
    login(client, tokens["alice"])

    def boom(*args, **kwargs):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(store, "next_item", boom)
    for path in ("/label", "/api/next"):
        response = client.get(path)
        assert response.status_code == 500
        assert "Traceback" not in response.text and "internal detail" not in response.text
        assert "Something went wrong" in response.text


# --- login CSRF -----------------------------------------------------------------------------------------------------
def test_the_login_link_only_shows_a_form_and_signs_nobody_in(env):
    _, client, tokens = env
    for headers in ({}, {"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/"}):
        page = client.get("/login", params={"token": tokens["alice"]}, headers=headers, follow_redirects=False)
        assert page.status_code == 200 and "Sign in as alice" in page.text
        assert '<form id="login" method="post" action="/login">' in page.text and "<script" not in page.text
        (nonce_cookie,) = page.headers.get_list("set-cookie")  # the nonce only, never the session
        assert nonce_cookie.startswith("tether_login=") and "samesite=strict" in nonce_cookie.lower()
        assert "httponly" in nonce_cookie.lower() and "path=/login" in nonce_cookie.lower()
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        assert "tether_session" not in client.cookies
        assert client.get("/label").status_code == 401
    assert client.get("/login", params={"token": "nope"}).headers.get("set-cookie") is None


def test_a_cross_site_login_post_is_refused_and_a_same_origin_one_signs_in(env):
    _, client, tokens = env
    token = tokens["alice"]
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "none"}, {"Origin": "null"},
                    {"Referer": "https://evil.example/page"},
                    {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}):
        nonce = login_nonce(client, token)  # even with this browser's own nonce
        response = client.post("/login", data={"token": token, "nonce": nonce}, headers=headers,
                               follow_redirects=False)
        assert response.status_code == 403 and "Cross-site sign-in refused" in response.text, headers
        assert "tether_session" not in response.headers.get("set-cookie", "")
        assert client.get("/label").status_code == 401
    # An attacker's page cannot know this browser's nonce (an HttpOnly, SameSite=Strict cookie of our site): a
    # browser that sends neither Origin nor Sec-Fetch-Site still needs it; so does a script
    other = TestClient(client.app)
    their_nonce = login_nonce(other, token)
    login_nonce(client, token)
    for data in ({"token": token}, {"token": token, "nonce": their_nonce}):
        response = client.post("/login", data=data, follow_redirects=False)
        assert response.status_code == 403 and "expired" in response.text
    fresh = TestClient(client.app)
    assert fresh.post("/login", data={"token": token, "nonce": their_nonce}).status_code == 403  # no nonce cookie
    nonce = login_nonce(client, token)
    assert client.post("/login", data={"token": "nope", "nonce": nonce}).status_code == 401
    assert client.post("/login", json={"token": token, "nonce": nonce}).status_code == 403  # form only
    ok = login(client, token)  # Origin: http://testserver, Sec-Fetch-Site: same-origin
    assert ok.headers["location"] == "/label" and "samesite=lax" in session_cookie(ok)
    assert any(c.startswith('tether_login=""') for c in ok.headers.get_list("set-cookie"))  # the nonce is spent
    assert client.get("/label").status_code == 200
    plain = TestClient(client.app)
    assert login(plain, tokens["admin"], headers={}).headers["location"] == "/admin"  # no headers, right nonce
    assert plain.get("/admin").status_code == 200


# --- item ids -------------------------------------------------------------------------------------------------------
def test_out_of_range_or_odd_item_ids_are_404_or_400_never_500(env):
    store, client, tokens = env
    login(client, tokens["alice"])
    fields = form_fields(client.get("/label").text)
    api = {"X-CSRF-Token": fields["csrf"]}
    for item_id in (2**63, -1, 0, 2**64 + 5, -(2**63) - 1, 10**30):
        response = client.post("/api/label", json={"item_id": item_id, "choice": "A"}, headers=api)
        assert (response.status_code, response.json()) == (404, {"error": "No such item."}), item_id
        response = client.post("/label", data={**fields, "item_id": str(item_id), "choice": "A"})
        assert response.status_code == 404 and "No such item." in response.text, item_id
    for text in ("9" * 5000, "-0", " 00018446744073709551616 "):
        assert client.post("/label", data={**fields, "item_id": text, "choice": "A"}).status_code == 404, text
    for text in ("\u00b2", "\u0661", "1_0", "+1", "0x1", "1.0", ""):  # superscript two, Arabic-Indic one: not ASCII
        response = client.post("/label", data={**fields, "item_id": text, "choice": "A"})
        assert response.status_code == 400 and "item_id must be an integer" in response.text, text
    assert client.post("/api/label", json={"item_id": 2**63 - 1, "choice": "A"}, headers=api).status_code == 409
    assert client.post("/api/label", content=b'{"item_id": 1' + b"0" * 5000 + b', "choice": "A"}',
                       headers={**api, "Content-Type": "application/json"}).status_code == 400
    assert client.post("/label", data={**fields, "csrf": "\u00e9" * 64, "choice": "A"}).status_code == 403
    assert store.labels() == []


# --- body caps, on the real server ----------------------------------------------------------------------------------
@pytest.fixture
def served(env):
    """The app in uvicorn on loopback, with a spy on the app behind the body guard: which requests reached it."""
    store, _, tokens = env
    app = create_app(store)
    guard, reached = app.app, []
    inner = guard.app

    async def spy(scope, receive, send):
        reached.append((scope["method"], scope["path"]))
        await inner(scope, receive, send)

    guard.app = spy
    with BackgroundServer(app) as server:
        yield store, tokens, server.url, reached


def raw(url, head: str, body=b"", chunks=()) -> tuple[int, dict, bytes]:
    """One request over a socket: the head, then body and chunks as given (chunked framing added, no final chunk);
    stops sending when the server closes; reads the answer to EOF. Returns (status, headers, body)."""
    netloc = urlsplit(url).netloc
    host, port = netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        try:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server answered and closed while we were still sending
            pass
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
        except ConnectionResetError:
            pass
    head_part, _, payload = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def test_oversized_bodies_get_413_before_the_app_reads_them(served):
    store, tokens, url, reached = served
    host = urlsplit(url).netloc
    bearer = f"Authorization: Bearer {tokens['alice']}"
    huge = 250 * 2**20
    # Content-Length over the cap: refused at once; the body is never sent, so the server cannot be holding it
    for auth in (bearer, "Authorization: Bearer not-a-token", "X-No-Auth: 1"):
        status, headers, payload = raw(url, f"POST /api/label HTTP/1.1\nHost: {host}\n{auth}\n"
                                            f"Content-Type: application/json\nContent-Length: {huge}\n")
        assert status == 413 and headers["connection"] == "close", auth
        assert json.loads(payload) == {"error": f"Request body too large: at most {MAX_BODY} bytes."}
    status, _, payload = raw(url, f"POST /label HTTP/1.1\nHost: {host}\n{bearer}\nContent-Length: {MAX_BODY + 1}\n")
    assert status == 413 and b"too large" in payload
    # a chunked body has no length: it is counted as it arrives and refused once past the cap, without waiting for
    # its end (no final chunk is ever sent)
    piece = b"x" * 65536
    status, headers, payload = raw(url, f"POST /api/label HTTP/1.1\nHost: {host}\n{bearer}\n"
                                        "Content-Type: application/json\nTransfer-Encoding: chunked\n",
                                   chunks=[piece] * (MAX_BODY // len(piece) + 2))
    assert status == 413 and headers["connection"] == "close" and b"too large" in payload
    # an endless chunked body: the server closes once past the cap, so the client can push no more than the socket
    # buffers hold (a timeout here would mean the server stopped reading but kept the connection: also a failure)
    sent, mib = 0, b"x" * 2**20
    with socket.create_connection(urlsplit(url).netloc.rsplit(":", 1), timeout=20) as sock:
        sock.sendall(f"POST /api/label HTTP/1.1\r\nHost: {host}\r\n{bearer}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < huge:
                sock.sendall(b"%x\r\n%s\r\n" % (len(mib), mib))
                sent += len(mib)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 64 * 2**20, sent
    # /login is read without a session, so its cap is a few KiB
    status, _, _ = raw(url, f"POST /login HTTP/1.1\nHost: {host}\nContent-Type: application/x-www-form-urlencoded\n"
                            f"Content-Length: {LOGIN_MAX_BODY + 1}\n")
    assert status == 413
    status, _, _ = raw(url, f"POST /login HTTP/1.1\nHost: {host}\nTransfer-Encoding: chunked\n",
                       chunks=[b"t" * 1024] * (LOGIN_MAX_BODY // 1024 + 1))
    assert status == 413
    status, _, _ = raw(url, f"POST /api/label HTTP/1.1\nHost: {host}\n{bearer}\nContent-Length: 12x\n")
    assert status == 400  # uvicorn refuses a malformed length itself
    assert reached == [] and store.labels() == []


def test_a_body_without_a_valid_token_is_refused_before_it_is_read(served):
    store, tokens, url, reached = served
    host = urlsplit(url).netloc
    for path in ("/api/label", "/label", "/undo", "/nowhere"):
        for auth in ("", "Authorization: Bearer not-a-token\n", "Cookie: tether_session=forged\n"):
            # under the cap, but only the head is sent: the 401 comes without the server waiting for the body
            status, headers, payload = raw(url, f"POST {path} HTTP/1.1\nHost: {host}\n{auth}"
                                                f"Content-Length: {MAX_BODY}\n")
            assert status == 401 and headers["connection"] == "close", (path, auth)
            assert b"Open your personal link" in payload
        status, _, _ = raw(url, f"POST {path} HTTP/1.1\nHost: {host}\nTransfer-Encoding: chunked\n")
        assert status == 401
    status, headers, payload = raw(url, f"POST /api/label HTTP/1.1\nHost: {host}\nContent-Length: 9\n")
    assert headers["content-type"] == "application/json" and json.loads(payload) == {
        "error": "Open your personal link to sign in."}
    assert "content-security-policy" in headers  # the guard's answers carry the security headers too
    assert reached == [] and store.labels() == []


def test_bodies_under_the_cap_still_reach_the_app(served):
    import httpx

    store, tokens, url, reached = served
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['bob']}"}, timeout=20) as client:
        first = client.get("/api/next").json()
        headers = {"X-CSRF-Token": first["csrf"], "Content-Type": "application/json"}
        body = json.dumps({"item_id": first["item"]["id"], "choice": "A", "reason": "r"}).encode()
        stored = client.post("/api/label", content=iter([body[:5], body[5:]]), headers=headers)  # chunked
        assert stored.status_code == 200 and stored.json()["stored"] is True
        padded = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"  # exactly the cap
        assert len(padded) == MAX_BODY
        assert client.post("/api/label", content=padded, headers=headers).json()["stored"] is False
        # the login form, through the real server: link, then the same-origin POST
        with httpx.Client(base_url=url, timeout=20, follow_redirects=True) as browser:
            page = browser.get("/login", params={"token": tokens["alice"]})
            nonce = re.search(r'name="nonce" value="([^"]*)"', page.text).group(1)
            signed_in = browser.post("/login", data={"token": tokens["alice"], "nonce": nonce},
                                     headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})
            assert signed_in.status_code == 200 and signed_in.url.path == "/label"
    assert ("POST", "/api/label") in reached and len(store.labels()) == 1
