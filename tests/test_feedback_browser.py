"""A real browser against the real server: Playwright driving Debian's headless Chromium (/usr/bin/chromium).

A rater signs in with their link, labels three items (one by click, two by keys), undoes the last, labels it again
by key, and the database holds exactly those three choices, mapped back through the stored display order. Every
item carries a completion with <script> and an onerror handler: it shows as text and nothing of it runs.
Skipped, saying why, where Chromium or the playwright package is missing (scripts/install_browser.sh installs it).
"""

import os

import pytest

from tether.feedback.app import BackgroundServer, create_app
from tether.feedback.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> end'

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh")


@pytest.fixture
def served(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    store.add_items([{"prompt": f"prompt {i}", "responses": [f"good {i}", f"{XSS} {i}"]} for i in range(4)])
    token = store.add_rater("carol")
    with BackgroundServer(create_app(store)) as server:
        yield store, f"{server.url}/login?token={token}"


def shown(page) -> dict:
    """The item on the page: its id and which text is A."""
    return {"id": int(page.get_attribute("#item", "data-item")), "a": page.inner_text("#response-a")}


def expect_saved(page, done: int) -> None:
    page.wait_for_selector(f'#progress[data-done="{done}"]')


def test_rater_labels_by_click_and_key_undoes_one_and_nothing_runs(served):
    store, link = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(link)  # the link shows a sign-in form; its same-origin POST sets the session
            page.click("#sign-in")
            page.wait_for_url("**/label")
            expected = {}

            first = shown(page)  # 1: by click on "A is better"
            page.click("#choose-a")
            expect_saved(page, 1)
            expected[first["id"]] = ("A", "")
            assert page.inner_text("#notice") == "Saved."

            second = shown(page)  # 2: by key "2" (B)
            page.keyboard.press("2")
            expect_saved(page, 2)
            expected[second["id"]] = ("B", "")

            third = shown(page)  # 3: a reason, then key "4" (both bad); typing "4" in the reason is only text
            page.fill("#reason", "both ramble ")
            page.locator("#reason").press("4")
            assert page.input_value("#reason") == "both ramble 4" and len(store.labels()) == 2
            page.locator("#prompt").click()
            page.keyboard.press("4")
            expect_saved(page, 3)
            assert [(r["item_id"], r["choice"], r["reason"]) for r in store.labels()][-1] == (
                third["id"], "bad", "both ramble 4")

            page.keyboard.press("u")  # undo the third: it comes back
            page.wait_for_selector('#progress[data-done="2"]')
            assert page.inner_text("#notice").startswith("Undone")
            assert shown(page)["id"] == third["id"]
            page.keyboard.press("3")  # tie this time
            expect_saved(page, 3)
            expected[third["id"]] = ("tie", "")

            text_a, text_b = page.inner_text("#response-a"), page.inner_text("#response-b")
            assert "<script>window.__pwned = 1</script>" in text_a + text_b
            assert page.evaluate("window.__pwned") is None
            assert page.locator("#item script, #item img").count() == 0
            assert errors == []
        finally:
            browser.close()
    rows = store.labels()
    assert {r["item_id"]: (r["choice"], r["reason"]) for r in rows} == expected
    by_id = {r["item_id"]: r for r in rows}
    a_text = {first["id"]: first["a"], second["id"]: second["a"]}
    for item_id, choice in ((first["id"], "A"), (second["id"], "B")):
        r = by_id[item_id]
        chosen = r["response_0"] if r["winner"] == 0 else r["response_1"]
        assert (chosen == a_text[item_id]) == (choice == "A")  # winner follows what was on screen
    assert by_id[third["id"]]["winner"] is None
