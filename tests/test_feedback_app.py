"""Every route of the rating app through FastAPI's TestClient: auth (401 / 403), CSRF and Origin checks, bad input
(400 / 409), double submission stored once, undo, escaping of untrusted text, the admin numbers, no tracebacks."""

import re

import pytest
from fastapi.testclient import TestClient

from tether.feedback.app import create_app
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


def login(client, token):
    response = client.get("/login", params={"token": token}, follow_redirects=False)
    assert response.status_code == 303
    return response


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
    cookie = response.headers["set-cookie"].lower()
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
