"""The chat page in a real browser (Debian's Chromium driven by Playwright) against real daphne processes."""

import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.llm_server import CITED_REPLY
from tests.servers import PASSWORD, USERNAME
from tests.test_retrieval import ALICE_PUMP

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"), reason="apt-get install chromium"),
]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", Path(__file__).resolve().parent.parent / "var" / "screenshots"))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def logged_in(browser, port: int, then: str = "/", **options):
    """A new browser context (``options``: Playwright's, a desktop window by default) logged in
    through the form, on ``then``."""
    context = browser.new_context(**{"viewport": {"width": 1100, "height": 700}, **options})
    return context, log_in(context.new_page(), port, then)


def log_in(page, port: int, then: str = "/"):
    page.goto(f"http://127.0.0.1:{port}/accounts/login/?next={then}")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()  # the page's scripts run: keys typed before would not reach them
    return page


def test_log_in_chat_stream_reload_and_other_tab(site, browser):
    port_a, port_b = site.ports
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port_a}/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.screenshot(path=SCREENSHOTS / "login.png")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()  # the page's scripts run: keys typed before would not reach them
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator(".model-note")).to_contain_text("test-model")
    page.screenshot(path=SCREENSHOTS / "welcome.png")

    page.fill("#input", "Hello from the browser [tokens=30][delay=0.05]")
    page.keyboard.press("Enter")
    expect(page.locator(".message.user .body")).to_have_text("Hello from the browser [tokens=30][delay=0.05]")
    reply = page.locator(".message.assistant .body").last
    # Mid-stream: some text is there, the stop button shows.
    expect(reply).to_contain_text("t0 t1")
    expect(page.locator("#stop")).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "streaming.png")
    expect(reply).to_have_text(" ".join(f"t{i}" for i in range(30)) + " ")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    expect(page.locator("#conversation-list .active a")).to_contain_text("Hello from the browser")
    page.screenshot(path=SCREENSHOTS / "chat.png")

    # Reload: the conversation comes back from the database.
    page.reload()
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator(".message.assistant .body")).to_have_text(" ".join(f"t{i}" for i in range(30)) + " ")

    # The same conversation open in a second tab on the other server process sees a new reply stream in.
    other = context.new_page()
    other.goto(page.url.replace(str(port_a), str(port_b)))
    expect(other.locator(".message")).to_have_count(2)
    page.fill("#input", "Second question [tokens=10][delay=0.05]")
    page.keyboard.press("Enter")
    expect(other.locator(".message.user .body").last).to_have_text("Second question [tokens=10][delay=0.05]")
    expect(other.locator(".message.assistant .body").last).to_have_text(" ".join(f"t{i}" for i in range(10)) + " ")

    # Stop from the browser.
    page.fill("#input", "A long one [tokens=300][delay=0.05]")
    page.keyboard.press("Enter")
    expect(page.locator(".message.assistant .body").last).to_contain_text("t3")
    page.click("#stop")
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "stopped")
    expect(page.locator(".message.assistant .meta").last).to_have_text("Stopped")
    page.screenshot(path=SCREENSHOTS / "stopped.png")

    # Logged out in the other tab: this tab's next message takes it to the login page, which says why.
    other.click("text=Log out")
    page.fill("#input", "Am I still in?")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?session=ended&next=%2Fc%2F\d+%2F"))
    expect(page.locator(".notice")).to_have_text("Your session has ended. Log in again to go on.")
    page.screenshot(path=SCREENSHOTS / "session-ended.png")
    context.close()


def test_documents_page_uploads_several_files_and_shows_live_progress(site, browser, tmp_path):
    port = site.ports[0]
    site.start_worker()
    try:
        documents_page(site, browser, tmp_path, port)
    finally:
        site.stop_workers()


def documents_page(site, browser, tmp_path, port: int) -> None:
    good = tmp_path / "garden.md"
    good.write_text("# Garden\n\nWater tomatoes deeply twice a week.\n\n## Soil\n\nLoam holds water well.\n")
    broken = tmp_path / "scan.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not really a PDF")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context, page = logged_in(browser, port, "/documents/")
    expect(page.locator("#documents-page")).to_contain_text("up to 20.0")  # the limit, stated up front
    page.set_input_files("#file-input", [str(good), str(broken)])
    good_row = page.locator("#document-list tr", has_text="garden.md").or_(
        page.locator("#document-list tr", has_text="Garden")
    )
    # Progress arrives over the socket: the row ends "Ready" with its chunks, without a reload.
    expect(page.locator('#document-list tr[data-status="ready"]')).to_have_count(1, timeout=60_000)
    expect(good_row.locator(".badge")).to_have_text("Ready")
    expect(good_row.locator(".chunks")).to_have_text("2")
    failed = page.locator('#document-list tr[data-status="failed"]')
    expect(failed.locator(".reason")).to_contain_text("damaged", timeout=60_000)
    # First versions: there is no previous version to speak of, on either row.
    expect(good_row.locator(".note")).to_be_hidden()
    expect(failed.locator(".note")).to_be_hidden()
    page.screenshot(path=SCREENSHOTS / "documents.png")
    # Delete, with the button's accessible name.
    page.get_by_role("button", name="Delete Garden").click()
    expect(page.locator("#document-list tr", has_text="Garden")).to_have_count(0)
    context.close()


def test_citations_open_their_passage_and_a_missing_source_is_not_a_link(site, browser, tmp_path):
    notes = tmp_path / "pump.md"
    notes.write_bytes(ALICE_PUMP)
    site.manage("ingest", str(notes), "--user", USERNAME)
    try:
        context, page = logged_in(browser, site.ports[0])
        expect(page.locator("#use-documents")).to_be_checked()
        page.fill("#input", "my pump leaks at the front: which seal part do I need? [cite]")
        page.keyboard.press("Enter")
        reply = page.locator(".message.assistant").last
        expect(reply.locator(".body")).to_have_text(CITED_REPLY)
        expect(reply).to_have_attribute("data-status", "complete")
        # [1] and [2] name the reply's two sources; [9] names none, so it stays text.
        expect(reply.locator("a.cite")).to_have_text(["[1]", "[2]"])
        expect(reply.locator(".sources li")).to_have_count(2)
        expect(reply.locator(".sources li").first).to_contain_text("Garden pump")
        reply.locator("a.cite").first.click()
        passage = page.locator("#passage")
        expect(passage).to_be_visible()
        expect(passage.locator("#passage-title")).to_have_text("[1] Garden pump")
        expect(passage.locator("mark")).to_contain_text("replace the seal with part A-17")
        page.screenshot(path=SCREENSHOTS / "citation.png")
        passage.get_by_role("button", name="Close").click()
        expect(passage).to_be_hidden()
        # After a reload, from the saved sources.
        page.reload()
        expect(page.locator(".message.assistant").last.locator("a.cite")).to_have_count(2)
        context.close()
    finally:
        site.forget_documents()


def test_markdown_code_xss_actions_feedback_theme_and_drawer(site, browser):
    port = site.ports[0]
    context, page = logged_in(browser, port)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=f"http://127.0.0.1:{port}")

    # Markdown streams in and renders: heading, list, table, link, highlighted code with its language.
    page.fill("#input", "Show me how to read a file [markdown][delay=0.03]")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").last
    expect(reply.locator("h3")).to_have_text("Reading a file")
    expect(reply).to_have_attribute("data-status", "streaming")
    page.screenshot(path=SCREENSHOTS / "markdown-streaming.png")
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator("ol li")).to_have_count(3)
    expect(reply.locator("table td").first).to_have_text("r")
    expect(reply.locator("a[href='https://docs.python.org/3/']")).to_have_attribute(
        "rel", "noopener noreferrer nofollow"
    )
    expect(reply.locator(".code-lang")).to_have_text("python")
    expect(reply.locator("code.hljs .hljs-keyword").first).to_have_text("def")
    reply.get_by_role("button", name="Copy code").click()
    expect(reply.get_by_role("button", name="Copy code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").startswith("def read(path):\n    with open(path)")
    reply.get_by_role("button", name="Copy reply").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("### Reading a file")
    page.screenshot(path=SCREENSHOTS / "markdown-light.png")

    # Whatever HTML the model sends renders inert.
    page.fill("#input", "Try to break the page [xss]")
    page.keyboard.press("Enter")
    evil = page.locator(".message.assistant").last
    expect(evil).to_have_attribute("data-status", "complete")
    expect(evil.locator(".body")).to_contain_text("done")
    assert evil.locator("script, img, iframe, [onerror], [onmouseover]").count() == 0
    assert all(
        not (href or "").lower().startswith("javascript")
        for href in evil.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    )
    evil.locator(".body").hover()
    assert page.evaluate("window.xssRan") is None

    # Regenerate: a second reply to the same message, and ‹ › between them.
    page.get_by_role("button", name="Regenerate reply").last.click()
    shown = page.locator(".message.assistant:not([hidden])").last  # of the replies to the last message
    expect(shown.locator(".variant")).to_have_text("2/2")
    expect(shown).to_have_attribute("data-status", "complete")
    shown.get_by_role("button", name="Previous reply").click()
    expect(shown.locator(".variant")).to_have_text("1/2")
    expect(shown.locator(".body")).to_contain_text("done")  # the first reply again
    shown.get_by_role("button", name="Next reply").click()
    expect(shown.locator(".variant")).to_have_text("2/2")

    # A reply that fails says why on the message and offers a retry (the provider fails again here).
    page.fill("#input", "This will fail [status=500]")
    page.keyboard.press("Enter")
    failed = page.locator(".message.assistant:not([hidden])").last
    expect(failed).to_have_attribute("data-status", "error")
    expect(failed.locator(".meta")).not_to_be_empty()
    failed.get_by_role("button", name="Retry reply").click()
    retried = page.locator(".message.assistant:not([hidden])").last
    expect(retried.locator(".variant")).to_have_text("2/2")
    expect(retried).to_have_attribute("data-status", "error")
    page.screenshot(path=SCREENSHOTS / "retry.png")

    # Feedback with a comment, then seen in admin.
    first = page.locator(".message.assistant").first
    first.get_by_role("button", name="Good reply").click()
    expect(first.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    first.get_by_label("Feedback comment").fill("Clear and short")
    first.get_by_label("Feedback comment").press("Enter")
    expect(page.locator(".toast")).to_have_text("Thank you for the comment.")
    page.reload()  # the rating comes back with the history
    expect(page.locator(".message.assistant").first.get_by_role("button", name="Good reply")).to_have_attribute(
        "aria-pressed", "true"
    )

    # Dark theme, kept across a reload.
    page.get_by_role("button", name="Dark theme").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(page.locator(".message.assistant").first.locator("h3")).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "markdown-dark.png")
    context.close()

    staff = "staff-" + USERNAME
    make_staff = f"User.objects.create_superuser({staff!r}, password={PASSWORD!r})"
    site.manage("shell", "-c", "from django.contrib.auth.models import User; "
                f"User.objects.filter(username={staff!r}).exists() or {make_staff}")  # fmt: skip
    admin_context = browser.new_context()
    admin = admin_context.new_page()
    admin.goto(f"http://127.0.0.1:{port}/admin/chat/feedback/")
    admin.fill("#id_username", staff)
    admin.fill("#id_password", PASSWORD)
    admin.click("input[type=submit]")
    expect(admin.locator("#result_list")).to_contain_text("Clear and short")
    expect(admin.locator("#feedback-per-model")).to_contain_text("test-model")
    expect(admin.locator("#changelist-filter")).to_contain_text("By rating")
    admin_context.close()

    # At 375 px: no sideways scroll, and the sidebar is a drawer behind a visible button.
    for theme in ("light", "dark"):
        phone, page = logged_in(browser, port, viewport={"width": 375, "height": 740}, color_scheme=theme)
        page.goto(f"http://127.0.0.1:{port}" + page.locator("#conversation-list a").first.get_attribute("href"))
        expect(page.locator(".message.assistant").first.locator("h3")).to_be_visible()
        expect(page.locator("html")).to_have_attribute("data-theme", theme)  # the system's, with no choice made
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        menu = page.get_by_role("button", name="Conversations")
        expect(menu).to_have_attribute("aria-expanded", "false")
        expect(page.locator("#sidebar")).to_be_hidden()
        page.screenshot(path=SCREENSHOTS / f"phone-{theme}.png")
        menu.click()
        expect(menu).to_have_attribute("aria-expanded", "true")
        expect(page.get_by_role("link", name="+ New chat")).to_be_in_viewport(ratio=1)
        page.wait_for_timeout(300)  # the slide-in
        page.screenshot(path=SCREENSHOTS / f"phone-drawer-{theme}.png")
        page.keyboard.press("Escape")
        expect(menu).to_have_attribute("aria-expanded", "false")
        phone.close()


def test_sidebar_groups_searches_renames_and_deletes(site, browser):
    port = site.ports[0]
    context, page = logged_in(browser, port)
    for text in ("Plan the garden party [tokens=3]", "Fix the bicycle brakes [tokens=3]"):
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#input", text)
        page.keyboard.press("Enter")
        expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete")
    page.reload()
    sidebar = page.locator("#conversation-list")
    expect(sidebar.locator("h2.day").first).to_have_text("Today")
    expect(sidebar.locator(".conversation a").first).to_have_text("Fix the bicycle brakes [tokens=3]")

    # Search, on the server: titles and message text, by word prefix.
    page.get_by_label("Search conversations").fill("gard")
    expect(sidebar.locator(".conversation a")).to_have_text(["Plan the garden party [tokens=3]"])
    page.get_by_label("Search conversations").fill("nothing like this")
    expect(sidebar).to_contain_text("No conversation matches.")
    page.get_by_label("Search conversations").fill("")
    expect(sidebar.locator(".conversation a").first).to_have_text("Fix the bicycle brakes [tokens=3]")

    # Rename in place (Enter saves), kept after a reload, and shown live in another tab.
    other = context.new_page()
    other.goto(page.url.replace(str(port), str(site.ports[1])))  # on the other server process
    expect(other.locator("#connection-state")).to_have_text("Connected")
    page.get_by_role("button", name="Rename Fix the bicycle brakes [tokens=3]").click()
    page.get_by_label("New title").fill("Bicycle")
    page.get_by_label("New title").press("Enter")
    expect(sidebar.locator(".conversation a").first).to_have_text("Bicycle")
    expect(page.locator("#topbar-title")).to_have_text("Bicycle")  # the open conversation
    expect(other.locator("#conversation-list .conversation a").first).to_have_text("Bicycle")
    expect(other.locator("#topbar-title")).to_have_text("Bicycle")
    other.close()
    page.screenshot(path=SCREENSHOTS / "sidebar.png")
    page.reload()
    expect(sidebar.locator(".conversation a").first).to_have_text("Bicycle")

    # Delete, after a confirmation; deleting the open conversation goes to a new chat.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete Bicycle").click()
    expect(page).to_have_url(f"http://127.0.0.1:{port}/")
    expect(sidebar.locator(".conversation a", has_text="Bicycle")).to_have_count(0)
    expect(sidebar.locator(".conversation a", has_text="garden")).to_have_count(1)
    context.close()


def test_model_titles_and_edit_and_resend_show_live_in_every_tab(site, browser):
    port_a, port_b = site.ports
    context, page = logged_in(browser, port_a)
    other = context.new_page()
    other.goto(f"http://127.0.0.1:{port_b}/")  # another tab, on the other server process
    expect(other.locator("#connection-state")).to_have_text("Connected")
    for text in ("Plan a trip [tokens=3][title=Trip_planning]", "Add a museum [tokens=2]"):
        page.fill("#input", text)
        page.keyboard.press("Enter")
        expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete")
    # The model's title replaces the first message, here and in the other tab's sidebar.
    expect(page.locator("#topbar-title")).to_have_text("Trip planning")
    expect(page.locator("#conversation-list .conversation a").first).to_have_text("Trip planning")
    expect(other.locator("#conversation-list .conversation a").first).to_have_text("Trip planning")
    other.goto(page.url.replace(str(port_a), str(port_b)))  # the same conversation, on the other process
    expect(other.locator(".message.user .body")).to_have_count(2)

    # Up in the empty composer edits the last message; Esc leaves it as it was.
    page.locator("#input").focus()
    page.keyboard.press("ArrowUp")
    editor = page.get_by_label("Edit message", exact=True).and_(page.locator("textarea"))
    expect(editor).to_have_value("Add a museum [tokens=2]")
    page.screenshot(path=SCREENSHOTS / "edit.png")
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # the editor fits a phone
    page.screenshot(path=SCREENSHOTS / "edit-phone.png")
    page.set_viewport_size({"width": 1100, "height": 700})
    page.keyboard.press("Escape")
    expect(editor).to_have_count(0)
    expect(page.locator(".message.user .body").last).to_have_text("Add a museum [tokens=2]")

    # Editing the first message replaces it and everything after it, here and in the other tab.
    page.locator(".message.user").first.get_by_role("button", name="Edit message").click()
    editor.fill("Plan a trip to Rome [tokens=4]")
    editor.press("Enter")
    expect(page.locator(".message.user .body")).to_have_text(["Plan a trip to Rome [tokens=4]"])
    expect(page.locator("#topbar-title")).to_have_text("Trip planning")  # an edit keeps the title
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(page.locator(".message.assistant .body")).to_have_text("t0 t1 t2 t3 ")
    expect(other.locator(".message.user .body")).to_have_text(["Plan a trip to Rome [tokens=4]"])
    expect(other.locator(".message.assistant .body")).to_have_text(["t0 t1 t2 t3 "])
    page.reload()
    expect(page.locator(".message.user .body")).to_have_text(["Plan a trip to Rome [tokens=4]"])
    expect(page.locator(".message.assistant .body")).to_have_text(["t0 t1 t2 t3 "])
    context.close()


def test_a_refused_message_says_why_and_is_sent_again_with_retry(site, browser):
    """Three replies being written at once is a user's limit (CHAT_LIMIT_CONCURRENT_REPLIES): a fourth
    tab's message is refused inline, with a Retry that works once one of them has finished."""
    port = site.ports[0]
    context, first = logged_in(browser, port)
    tabs = [first] + [context.new_page() for _ in range(3)]
    for tab in tabs[1:]:
        tab.goto(f"http://127.0.0.1:{port}/")
        expect(tab.locator("#connection-state")).to_have_text("Connected")
    for tab in tabs[:3]:
        tab.fill("#input", "Keep writing [tokens=60][delay=0.05]")
        tab.keyboard.press("Enter")
        expect(tab.locator(".message.assistant").last).to_have_attribute("data-status", "streaming")
    fourth = tabs[3]
    fourth.fill("#input", "One more [tokens=2]")
    fourth.keyboard.press("Enter")
    mine = fourth.locator(".message.user").last
    expect(mine).to_have_attribute("data-status", "error")
    expect(mine.locator(".meta")).to_contain_text("replies being written already")
    retry = mine.get_by_role("button", name="Retry sending")
    expect(retry).to_be_visible()
    fourth.screenshot(path=SCREENSHOTS / "refused.png")
    for tab in tabs[:3]:
        expect(tab.locator(".message.assistant").last).to_have_attribute("data-status", "complete", timeout=20000)
    expect(retry).to_be_enabled()
    retry.click()
    expect(fourth.locator(".message.assistant").last).to_have_text("t0 t1 ")
    expect(mine).to_have_attribute("data-status", "complete")
    expect(fourth).to_have_url(re.compile(r"/c/\d+/$"))
    context.close()


class Elsewhere:
    """Another origin: an HTTP server on another loopback address that answers every GET with a
    1x1 GIF and records the path, so a test sees whatever a page fetched from it."""

    GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(outer.GIF)))
                self.end_headers()
                self.wfile.write(outer.GIF)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def saw(self, wanted: set[str], page, timeout: float = 10) -> set[str]:
        """The wanted paths asked for, once all were (or when ``timeout`` is up). Waits on ``page``,
        so that Playwright delivers the page's events meanwhile."""
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.paths) and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        page.wait_for_timeout(100)
        return wanted & set(self.paths)


@pytest.fixture
def elsewhere():
    server = Elsewhere()
    yield server
    server.close()


def watch_requests(context) -> list[str]:
    """Every URL the context's pages ask for, as the browser sends it."""
    asked: list[str] = []
    context.on("request", lambda request: asked.append(request.url))
    return asked


def rewrite_render_js(context, replacements: dict[str, str]) -> None:
    """Serve static/chat/render.js with ``replacements`` made (each must be there), to take one of
    the page's defences away in a test."""

    def handle(route) -> None:
        response = route.fetch()
        body = response.text()
        for old, new in replacements.items():
            assert old in body, f"render.js no longer has {old!r}"
            body = body.replace(old, new)
        route.fulfill(response=response, body=body)

    context.route("**/static/chat/render.js", handle)


def reply_to(page, text: str):
    page.fill("#input", text)
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-status", "complete")
    return reply


def test_a_markdown_image_in_a_reply_is_a_link_and_is_never_fetched(site, browser, elsewhere):
    """The renderer alone: DOMPurify is made to keep <img src> and the page's CSP is bypassed, so an
    <img> made from the markdown would be fetched; the image rule makes it a link instead."""
    context, page = logged_in(browser, site.ports[0], bypass_csp=True)
    asked = watch_requests(context)
    rewrite_render_js(
        context, {"ALLOWED_TAGS: [": 'ALLOWED_TAGS: ["img", ', "ALLOWED_ATTR: [": 'ALLOWED_ATTR: ["src", '}
    )
    page.reload()
    url = f"{elsewhere.url}/cat.png?q=what+the+conversation+said"
    reply = reply_to(page, f"Look: ![a cat]({url}) and more")
    page.wait_for_timeout(1000)
    assert elsewhere.paths == []
    link = reply.locator("a.image-link")
    expect(link).to_have_text("Image: a cat")
    expect(link).to_have_attribute("href", url)
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(reply.locator("img")).to_have_count(0)
    page.screenshot(path=SCREENSHOTS / "image-as-link.png")
    # The control: in this context, an <img> that reaches the page is fetched, and would be seen.
    page.evaluate("url => document.body.append(Object.assign(new Image(), {src: url}))", f"{elsewhere.url}/control")
    assert elsewhere.saw({"/control"}, page) == {"/control"}
    assert elsewhere.paths == ["/control"]
    assert [u for u in asked if u.startswith(elsewhere.url)] == [f"{elsewhere.url}/control"]
    context.close()


# Markup that makes a browser fetch, each piece from its own path (the Content-Security-Policy
# names the same kinds: img, media, object, frame, style).
FETCHING_MARKUP = {
    "/img": '<img src="{u}/img">',
    "/srcset": '<img srcset="{u}/srcset 1x" alt="s">',
    "/picture": '<picture><source srcset="{u}/picture"><img alt="p"></picture>',
    "/poster": '<video poster="{u}/poster"></video>',
    "/video": '<video src="{u}/video" preload="auto"></video>',
    "/audio": '<audio src="{u}/audio" preload="auto"></audio>',
    "/object": '<object data="{u}/object"></object>',
    "/embed": '<embed src="{u}/embed">',
    "/iframe": '<iframe src="{u}/iframe"></iframe>',
    "/link": '<link rel="stylesheet" href="{u}/link">',
    "/background": '<table background="{u}/background"><tr><td>cell</td></tr></table>',
    "/svg-image": '<svg width="9" height="9"><image href="{u}/svg-image" width="9" height="9"></image></svg>',
    "/style": '<span style="background-image: url({u}/style)">styled</span>',
    "/input": '<input type="image" src="{u}/input" alt="i">',
}


def test_dompurify_alone_lets_nothing_in_a_reply_fetch_from_elsewhere(site, browser, elsewhere):
    """DOMPurify alone: markdown-it's ``html`` is turned on, so the reply's raw HTML reaches DOMPurify
    untouched (the image rule only sees markdown images), and the page's CSP is bypassed."""
    context, page = logged_in(browser, site.ports[0], bypass_csp=True)
    asked = watch_requests(context)
    rewrite_render_js(context, {"markdownit({html: false,": "markdownit({html: true,"})
    page.reload()
    markup = " ".join(piece.format(u=elsewhere.url) for piece in FETCHING_MARKUP.values())
    reply = reply_to(page, f"Here: {markup} <strong>bold</strong> end")
    expect(reply.locator(".body strong")).to_have_text("bold")  # raw HTML reached DOMPurify, which kept this
    page.wait_for_timeout(1000)
    assert elsewhere.paths == []
    assert not [u for u in asked if u.startswith(elsewhere.url)]
    kept = reply.locator(".body img, .body video, .body audio, .body svg, .body [style], .body [background]")
    assert kept.count() == 0
    # The control: the same markup put in the page unsanitised is fetched, every piece of it.
    page.evaluate("html => document.body.insertAdjacentHTML('beforeend', html)", markup)
    assert elsewhere.saw(set(FETCHING_MARKUP), page) == set(FETCHING_MARKUP)
    context.close()


def record_violations(context) -> list[dict]:
    """The Content-Security-Policy violations the context's pages report, and the console's word on them."""
    seen: list[dict] = []
    context.expose_function("reportViolation", lambda violation: seen.append(violation))
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) => window.reportViolation("
        "{page: location.pathname, directive: e.effectiveDirective, blocked: e.blockedURI}))"
    )
    context.on(
        "console",
        lambda message: "Content Security Policy" in message.text and seen.append({"console": message.text}),
    )
    return seen


def test_the_policy_refuses_what_gets_past_and_nothing_the_pages_need(site, browser, elsewhere):
    """With the policy on (no bypass): the pages work with nothing reported (the chat page's socket,
    highlighted code, the documents page, the admin's scripts), and markup put straight into the page
    (past the sanitiser) loads nothing from elsewhere and runs no inline script."""
    port = site.ports[0]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    violations = record_violations(context)
    page = context.new_page()
    response = page.goto(f"http://127.0.0.1:{port}/accounts/login/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    log_in(page, port)
    expect(page.locator("#connection-state")).to_have_text("Connected")  # the socket: connect-src 'self'
    expect(reply_to(page, "Hello under the policy [tokens=5]").locator(".body")).to_have_text("t0 t1 t2 t3 t4 ")
    reply = reply_to(page, "Show me how to read a file [markdown]")
    expect(reply.locator("code.hljs .hljs-keyword").first).to_have_text("def")
    assert reply.locator("code.hljs .hljs-keyword").first.evaluate("e => getComputedStyle(e).color") != (
        reply.locator("code.hljs").evaluate("e => getComputedStyle(e).color")
    )  # the highlight.js style sheet applied
    page.get_by_role("button", name="Dark theme").click()  # the theme script, from its own file
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.screenshot(path=SCREENSHOTS / "csp-chat.png")
    page.goto(f"http://127.0.0.1:{port}/documents/")
    expect(page.locator("#documents-page h1")).to_have_text("Your documents")
    page.screenshot(path=SCREENSHOTS / "csp-documents.png")
    page.goto(f"http://127.0.0.1:{port}/accounts/signup/")
    assert violations == []

    # The policy alone: markup that skipped the sanitiser loads nothing and runs nothing.
    page.goto(f"http://127.0.0.1:{port}/")
    page.evaluate(
        """u => {
            document.body.insertAdjacentHTML("beforeend", `<img src="${u}/img"><iframe src="${u}/frame"></iframe>`
              + `<object data="${u}/object"></object><span style="background: url(${u}/style)">s</span>`);
            const script = document.createElement("script");
            script.textContent = "window.inlineRan = true";
            document.body.append(script);
        }""",
        elsewhere.url,
    )
    expected = {"img-src", "frame-src", "object-src", "script-src-elem", "style-src-attr"}
    deadline = time.monotonic() + 10
    while not expected <= {v.get("directive") for v in violations} and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert {v.get("directive") for v in violations if "directive" in v} == expected
    assert page.evaluate("window.inlineRan") is None
    page.wait_for_timeout(500)
    assert elsewhere.paths == []
    context.close()

    # The admin, its scripts included, works under the same policy.
    staff = "staff-" + USERNAME
    make_staff = f"User.objects.create_superuser({staff!r}, password={PASSWORD!r})"
    site.manage("shell", "-c", "from django.contrib.auth.models import User; "
                f"User.objects.filter(username={staff!r}).exists() or {make_staff}")  # fmt: skip
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    violations = record_violations(context)
    admin = context.new_page()
    admin.goto(f"http://127.0.0.1:{port}/admin/chat/conversation/")
    admin.fill("#id_username", staff)
    admin.fill("#id_password", PASSWORD)
    admin.click("input[type=submit]")
    expect(admin.locator("#result_list")).to_contain_text("Hello under the policy")
    admin.click("#action-toggle")  # actions.js: select all, and the counter says so
    expect(admin.locator(".action-counter")).to_contain_text("selected")
    expect(admin.locator("#result_list .action-select").first).to_be_checked()
    admin.screenshot(path=SCREENSHOTS / "csp-admin-changelist.png")
    # A conversation's change form, with its messages.
    admin.locator("#result_list tbody th a", has_text="Hello under the policy").click()
    expect(admin.locator("#content h1")).to_contain_text("Change conversation")
    expect(admin.locator(".inline-group")).to_contain_text("t0 t1 t2 t3 t4")
    admin.goto(f"http://127.0.0.1:{port}/admin/auth/user/")
    admin.locator("#result_list tbody th a", has_text=staff).click()
    # SelectFilter2.js builds the two-box picker; DateTimeShortcuts.js adds "Today" and "Now".
    expect(admin.locator("#id_user_permissions_filter")).to_be_visible()
    expect(admin.locator(".datetimeshortcuts").first).to_contain_text("Today")
    admin.locator("#id_user_permissions_input").press_sequentially("feedback")  # it filters on keyup
    expect(admin.locator("#id_user_permissions_from option").first).to_contain_text("feedback")
    admin.screenshot(path=SCREENSHOTS / "csp-admin-change-form.png", full_page=True)
    admin.goto(f"http://127.0.0.1:{port}/admin/chat/feedback/")  # the site's own admin template
    expect(admin.locator("#feedback-per-model caption")).to_be_visible()
    admin.screenshot(path=SCREENSHOTS / "csp-admin-feedback.png")
    assert violations == []


def test_a_long_conversation_shows_its_latest_page_and_loads_earlier_ones(site, browser):
    """`history` holds the latest CHAT_HISTORY_PAGE (200) messages; the page asks for earlier pages
    with its button and when scrolled to the top, and keeps them in order."""
    title = f"Long one {time.time_ns()}"
    site.manage("shell", "-c", (
        "from django.contrib.auth.models import User; from chat.models import Conversation, Message; "
        f"c = Conversation.objects.create(owner=User.objects.get(username={USERNAME!r}), title={title!r}); "
        "Message.objects.bulk_create([Message(conversation=c, role='user', content=f'note {i}') for i in range(450)])"
    ))  # fmt: skip
    context, page = logged_in(browser, site.ports[0])
    page.get_by_role("link", name=title).click()
    bodies = page.locator(".message.user .body")
    expect(bodies).to_have_count(200)
    expect(bodies.first).to_have_text("note 250")
    expect(bodies.last).to_have_text("note 449")
    earlier = page.get_by_role("button", name="Load earlier messages")
    expect(earlier).to_be_visible()
    earlier.click()
    expect(bodies).to_have_count(400)
    expect(bodies.first).to_have_text("note 50")
    # Scrolled to the top: the rest comes, and there is nothing earlier to ask for.
    page.locator("#messages").evaluate("el => el.scrollTo(0, 0)")
    expect(bodies).to_have_count(450)
    expect(earlier).to_be_hidden()
    texts = bodies.all_text_contents()
    assert texts == [f"note {i}" for i in range(450)]
    context.close()
