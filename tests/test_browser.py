"""The chat page in a real browser (Debian's Chromium driven by Playwright) against real daphne processes."""

import os
import re
import shutil
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


def logged_in(browser, port: int, then: str = "/"):
    """A new browser context logged in through the form, on ``then``."""
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port}/accounts/login/?next={then}")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    return context, page


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
    expect(page.locator("#conversation-list a.active")).to_contain_text("Hello from the browser")
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
