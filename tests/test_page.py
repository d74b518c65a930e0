"""The web page in a real browser: Chromium driven by Playwright against the server in demo mode
(tests/browser.py says which Chromium, and why these tests skip without one).

What a person does with the page, through the page: make an image with each endpoint (the
inpaint mask painted with the mouse, and with a finger at a phone's width), watch a job's
progress to its end, find it in the gallery, open it, download it and reuse its settings,
cancel a queued job, read a field error beside its field, give the API key when asked. Each
test ends with a screenshot (screenshots/<test>.png) and fails on any error in the console.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from browser import CHROMIUM_ARGS, Session, find_chromium, skip_reason
from helpers import Server, job_folder, png_bytes, wait_until

SKIP = skip_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

if SKIP is None:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    expect.set_options(timeout=30_000)  # a loaded CI machine: wait for states, not for times

KEY = "browser-test-key"
PHONE = {"width": 390, "height": 844}
PAGE_SIZE = 24  # the gallery's (browse.js)
# Slow enough to see a job run (and to cancel one waiting behind it), fast enough for CI.
WATCHABLE = {"SD_SIM_STEP_SECONDS": "0.1"}


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def new_session(chromium: Browser, name: str, **context: Any) -> Session:
    # The test CA is not trusted by Chromium: see tests/browser.py.
    browser_context = chromium.new_context(ignore_https_errors=True, **context)
    page = browser_context.new_page()
    session = Session(page, name)
    page.on("console", lambda m: session.record(m.type, m.text, m.location.get("url", "")))
    page.on("pageerror", lambda error: session.console.append(f"uncaught: {error}"))
    return session


@pytest.fixture
def session(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[Session]:
    """A fresh browser context (empty storage) and page; its screenshot and console check
    come at the end, pass or fail."""
    session = new_session(chromium, request.node.name, viewport={"width": 1280, "height": 900})
    yield session
    finish(session)


@pytest.fixture
def phone(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[Session]:
    session = new_session(
        chromium, request.node.name, viewport=PHONE, is_mobile=True, has_touch=True
    )
    yield session
    finish(session)


def finish(session: Session) -> None:
    try:
        session.screenshot()
        session.assert_clean_console()
    finally:
        session.page.context.close()


# --- helpers ---------------------------------------------------------------------------------


def open_page(page: Page, server: Server) -> None:
    page.goto(f"https://127.0.0.1:{server.port}/")
    expect(page.locator("#connection")).to_have_text("Live")


def start_keyed(make_server: Callable[..., Server]) -> Server:
    server = make_server(["--api-key", KEY], start=False)
    server.start(wait=False)  # wait_ready's GET / would need the key; the page does not
    wait_until(lambda: reachable(server), "the server to answer")
    return server


def reachable(server: Server) -> bool:
    try:
        return server.get("/ui/").status == 200
    except OSError:
        return False


def form(page: Page, endpoint: str) -> Any:
    """The endpoint's form, chosen with its button."""
    page.locator("#picker").get_by_text(
        {"text-to-image": "Text to image", "image-to-image": "Image to image"}.get(
            endpoint, "Inpaint"
        ),
        exact=True,
    ).click()
    return page.locator(f"#form-{endpoint}")


def make(page: Page, endpoint: str) -> str:
    """Press Make and return the id of the job the Latest panel then follows."""
    before = (
        page.locator("#latest .card").get_attribute("data-id")
        if page.locator("#latest .card").count()
        else None
    )
    page.locator(f"#form-{endpoint}").get_by_role("button", name="Make", exact=True).click()
    card = page.locator("#latest .card")
    wait_until(lambda: card.count() and card.get_attribute("data-id") != before, "a new job")
    return card.get_attribute("data-id")


def wait_images_loaded(page: Page, selector: str, count: int) -> list[tuple[int, int]]:
    """The natural sizes of the `count` images at `selector`, once all have loaded."""
    expect(page.locator(selector)).to_have_count(count)
    page.wait_for_function(
        "s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
        arg=selector,
    )
    return [
        tuple(size)
        for size in page.eval_on_selector_all(
            selector, "els => els.map(i => [i.naturalWidth, i.naturalHeight])"
        )
    ]


def status(
    server: Server, endpoint: str, job_id: str, headers: dict[str, str] | None = None
) -> Any:
    return server.get(f"/{endpoint}/{job_id}", headers).json()


# Every state the Latest card shows, in order: its status, its step label and how many images
# it shows (recorded in the page, so that no state is missed however the test is scheduled).
RECORD_PROGRESS = """() => {
  window.__progress = [];
  const record = () => {
    const card = document.querySelector('#latest .card');
    const label = card && card.querySelector('.bars label:first-child span');
    if (!label || !label.textContent) return;
    const state = JSON.stringify(
      [card.dataset.status, label.textContent, card.querySelectorAll('.thumb').length]);
    const last = window.__progress.at(-1);
    if (JSON.stringify(last) !== state) window.__progress.push(JSON.parse(state));
  };
  new MutationObserver(record).observe(
    document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


# --- the tests ---------------------------------------------------------------------------------


def test_text_to_image_watch_browse_reuse(
    make_server: Callable[..., Server], session: Session
) -> None:
    server = make_server(env=WATCHABLE)
    page = session.page
    open_page(page, server)
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("a lighthouse at dusk")
    t2i.get_by_label("Steps").fill("8")
    t2i.get_by_label("Iterations").fill("2")
    page.evaluate(RECORD_PROGRESS)
    job_id = make(page, "text-to-image")

    # Watch: the job runs, then is listed as finished with both its images.
    page.get_by_role("tab", name="Watch").click()
    card = page.locator(f'#watch .card[data-id="{job_id}"]')
    expect(card.locator(".status")).to_have_text("Complete")
    assert wait_images_loaded(page, f'#watch .card[data-id="{job_id}"] .thumb img', 2) == [
        (512, 512),
        (512, 512),
    ]
    assert status(server, "text-to-image", job_id)["status"] == "COMPLETE"
    states = page.evaluate("window.__progress")
    seen = [
        (int(m[1]), int(m[3]))
        for _, text, _ in states
        if (m := re.fullmatch(r"Image (\d) of (\d): (\d+) %", text))
    ]
    assert len(seen) == len(states), states
    assert seen == sorted(seen), states  # never backwards
    assert seen[-1] == (2, 100), states  # to the end
    assert any(index == 1 and 0 < pct < 100 for index, pct in seen), states  # live, mid-image
    assert any(index == 2 and pct < 100 for index, pct in seen), states
    # The first image showed while the second was being made.
    assert ["IN_PROGRESS", 1] in [[status, thumbs] for status, _, thumbs in states], states
    assert states[-1][0] == "COMPLETE", states

    # Browse: newest first, it is the first tile; it opens large with its parameters.
    page.get_by_role("tab", name="Browse").click()
    tile = page.locator("#gallery li").first
    expect(tile).to_have_attribute("data-id", job_id)
    wait_images_loaded(page, "#gallery li img", 1)
    tile.get_by_role("button").click()
    viewer = page.get_by_role("dialog")
    expect(viewer).to_be_visible()
    expect(viewer.get_by_role("heading")).to_have_text("Text to image: image 1 of 2")
    params = page.locator("#viewer-params")
    expect(params).to_contain_text("a lighthouse at dusk")
    expect(params.locator("dt", has_text="Seed").locator("+ dd")).to_have_text("42")
    page.keyboard.press("ArrowRight")
    expect(viewer.get_by_role("heading")).to_have_text("Text to image: image 2 of 2")
    with page.expect_download() as download:
        viewer.get_by_role("link", name="Download").click()
    saved = download.value
    assert saved.suggested_filename == f"sd-rest-{job_id[:8]}-2.png"
    assert Path(saved.path()).read_bytes() == server.get(f"/text-to-image/{job_id}/2.png").body

    # "Use these settings" fills the form that had been reset.
    viewer.get_by_role("button", name="Close").click()
    page.get_by_role("tab", name="Make").click()
    t2i.get_by_role("button", name="Reset to defaults").click()
    expect(t2i.get_by_label("Iterations")).to_have_value("1")
    page.get_by_role("tab", name="Browse").click()
    tile.get_by_role("button").click()
    viewer.get_by_role("button", name="Use these settings").click()
    expect(viewer).to_be_hidden()
    expect(page.get_by_role("tab", name="Make")).to_have_attribute("aria-selected", "true")
    expect(t2i.get_by_label("Prompt")).to_have_value("a lighthouse at dusk")
    expect(t2i.get_by_label("Iterations")).to_have_value("2")
    expect(t2i.get_by_label("Seed", exact=True)).to_have_value("42")
    expect(t2i.get_by_role("button", name="Make", exact=True)).to_be_focused()
    # The same settings are the same job (its id is their hash): the page says so.
    page.keyboard.press("Enter")
    expect(page.locator("#text-to-image-status")).to_contain_text("made before")
    expect(page.locator("#latest .card")).to_have_attribute("data-id", job_id)

    # "Same settings, new seed": the same but the seed, and it makes a new job.
    page.get_by_role("tab", name="Browse").click()
    tile.get_by_role("button").click()
    viewer.get_by_role("button", name="Same settings, new seed").click()
    expect(t2i.get_by_label("Prompt")).to_have_value("a lighthouse at dusk")
    seed = t2i.get_by_label("Seed", exact=True).input_value()
    assert seed != "42"
    page.keyboard.press("Enter")  # the Make button has the focus
    wait_until(lambda: page.locator("#latest .card").get_attribute("data-id") != job_id, "a job")
    second = page.locator("#latest .card").get_attribute("data-id")
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    params = server.get("/jobs?limit=1").json()["items"][0]
    assert (params["id"], params["params"]["seed"]) == (second, int(seed))
    # The gallery takes the new job in at its top by itself.
    page.get_by_role("tab", name="Browse").click()
    expect(page.locator("#gallery li").first).to_have_attribute("data-id", second)
    expect(page.locator("#gallery li")).to_have_count(2)


def test_gallery_pages(make_server: Callable[..., Server], session: Session) -> None:
    server = make_server()
    total = PAGE_SIZE + 2
    urls = []
    for seed in range(total):
        response = server.post_form(
            "text-to-image", {"prompt": f"job {seed}", "steps": "1", "seed": str(seed)}
        )
        assert response.status == 303, response.body
        urls.append(response.headers["Location"])
    for url in urls:
        server.wait_status(url, {"COMPLETE"})
    newest_first = [item["id"] for item in server.get(f"/jobs?limit={total}").json()["items"]]

    page = session.page
    open_page(page, server)
    page.get_by_role("tab", name="Browse").click()
    tiles = page.locator("#gallery li")
    expect(tiles).to_have_count(PAGE_SIZE)
    assert [tiles.nth(i).get_attribute("data-id") for i in range(PAGE_SIZE)] == newest_first[
        :PAGE_SIZE
    ]
    expect(page.locator("#gallery li").first).to_contain_text(f"job {total - 1}")
    pager = page.get_by_role("navigation", name="Gallery pages")
    expect(pager.get_by_role("button", name="Newer")).to_be_disabled()
    pager.get_by_role("button", name="Older").click()
    expect(tiles).to_have_count(2)
    assert [tiles.nth(i).get_attribute("data-id") for i in range(2)] == newest_first[PAGE_SIZE:]
    expect(pager).to_contain_text("Page 2")
    expect(pager.get_by_role("button", name="Older")).to_be_disabled()
    session.screenshot("-page2")
    pager.get_by_role("button", name="Newer").click()
    expect(tiles).to_have_count(PAGE_SIZE)
    expect(tiles.first).to_have_attribute("data-id", newest_first[0])
    # Filtered by endpoint: none of these is an inpaint job.
    page.get_by_label("Show").select_option("inpaint-image")
    expect(page.locator("#browse-status")).to_have_text(
        "Nothing finished yet: make something first."
    )
    expect(tiles).to_have_count(0)
    page.get_by_label("Show").select_option("")
    expect(tiles).to_have_count(PAGE_SIZE)


def test_image_to_image_with_preview(make_server: Callable[..., Server], session: Session) -> None:
    server = make_server()
    page = session.page
    open_page(page, server)
    i2i = form(page, "image-to-image")
    i2i.get_by_label("Image", exact=True).set_input_files(
        {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(520, 390)}
    )
    expect(i2i.locator(".preview")).to_be_visible()
    expect(i2i.locator("#image-to-image-image-size")).to_have_text(
        "520 × 390 pixels, cropped to 512 × 384 by the server."
    )
    i2i.get_by_label("Prompt").fill("the same in autumn")
    i2i.get_by_label("Steps").fill("8")
    job_id = make(page, "image-to-image")
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    assert wait_images_loaded(page, "#latest .thumb img", 1) == [(512, 384)]
    assert status(server, "image-to-image", job_id)["imageUrls"] == [
        f"/image-to-image/{job_id}/1.png"
    ]

    # A result can be the next input.
    page.locator("#latest .thumb").click()
    page.get_by_role("dialog").get_by_role("button", name="Use as input image").click()
    expect(i2i.locator("#image-to-image-image-size")).to_have_text("512 × 384 pixels.")


def test_inpaint_mask_painted_with_the_mouse(
    make_server: Callable[..., Server], session: Session
) -> None:
    server = make_server()
    page = session.page
    open_page(page, server)
    inpaint = form(page, "inpaint-image")
    expect(inpaint.get_by_label("Prompt")).to_have_count(0)  # inpaint takes none
    inpaint.get_by_label("Image", exact=True).set_input_files(
        {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(512, 384)}
    )
    canvas = inpaint.get_by_role("img", name=re.compile("^Mask"))
    expect(canvas).to_be_visible()

    # Nothing painted yet: the page says so at the mask, and sends nothing.
    inpaint.get_by_role("button", name="Make", exact=True).click()
    expect(page.locator("#inpaint-image-mask-error")).to_have_text(
        "Paint over the part of the image to repaint first."
    )

    # A horizontal stroke through the middle, from a quarter to three quarters of the width.
    box = canvas.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.25 + 0.05 * step), y)
    page.mouse.up()
    expect(page.locator("#inpaint-image-mask-error")).to_be_hidden()
    job_id = make(page, "inpaint-image")
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    assert wait_images_loaded(page, "#latest .thumb img", 1) == [(512, 384)]

    # The mask the server stored: white along the stroke, black away from it.
    folder = job_folder(server.output, f"/inpaint-image/{job_id}")
    mask = Image.open(io.BytesIO((folder / "inputs" / "image_mask.png").read_bytes()))
    assert mask.size == (512, 384)
    gray = mask.convert("L")
    assert [gray.getpixel((x, 192)) for x in (140, 256, 370)] == [255, 255, 255]
    assert [gray.getpixel(p) for p in ((20, 20), (256, 40), (500, 370), (60, 192))] == [0] * 4


def test_cancel_a_queued_job(make_server: Callable[..., Server], session: Session) -> None:
    # Slow steps: the first job runs long enough for the second to wait behind it.
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.5"})
    page = session.page
    open_page(page, server)
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("the long one")
    t2i.get_by_label("Steps").fill("100")
    first = make(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("the waiting one")
    t2i.get_by_label("Steps").fill("8")
    second = make(page, "text-to-image")

    page.get_by_role("tab", name="Watch").click()
    expect(page.locator("#watch-count")).to_have_text("2")
    running = page.locator(f'#running .card[data-id="{first}"]')
    expect(running.locator(".status")).to_have_text("Running")
    expect(running.locator(".bars")).to_contain_text("Image 1 of 1")
    waiting = page.locator(f'#queue li[data-id="{second}"]')
    expect(waiting.locator(".position")).to_have_text("1")
    expect(waiting).to_contain_text("the waiting one")
    session.screenshot("-queue")

    waiting.get_by_role("button", name="Cancel the waiting one").click()
    expect(waiting).to_have_count(0)
    expect(page.locator(f'#finished .card[data-id="{second}"] .status')).to_have_text("Canceled")
    assert status(server, "text-to-image", second)["status"] == "CANCELED"
    assert status(server, "text-to-image", first)["status"] == "IN_PROGRESS"

    # The running one can be canceled too.
    running.get_by_role("button", name="Cancel the long one").click()
    expect(page.locator(f'#finished .card[data-id="{first}"] .status')).to_have_text("Canceled")
    assert status(server, "text-to-image", first)["status"] == "CANCELED"
    expect(page.locator("#watch-count")).to_be_hidden()
    expect(page.locator("#running-empty")).to_be_visible()


def test_cancel_a_job_the_stream_told_of_before_its_post_was_answered(
    make_server: Callable[..., Server], session: Session
) -> None:
    """The answer to the second POST is held back until the event stream has surely told the
    page of the job: the page then knows the job only from the stream, which carries no
    resultUrl; cancelling it must still reach the job's own URL."""
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.5"})
    page = session.page
    open_page(page, server)
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("the long one")
    t2i.get_by_label("Steps").fill("100")
    make(page, "text-to-image")

    def answer_late(route: Any) -> None:
        response = route.fetch()  # the job is queued, and its event on its way to the page
        time.sleep(1.5)
        route.fulfill(response=response)

    def listing_down(route: Any) -> None:
        route.fulfill(status=503, json={"error": {"code": "shutting_down", "message": "down"}})

    page.route(re.compile(r".*/text-to-image$"), answer_late)
    # Nor can the listing fill in what the stream leaves out: only the answer can.
    page.route(re.compile(r".*/jobs\?.*"), listing_down)
    session.expect_failed_request(503, "/jobs?")
    t2i.get_by_label("Prompt").fill("answered late")
    t2i.get_by_label("Steps").fill("8")
    second = make(page, "text-to-image")
    page.unroute(re.compile(r".*/text-to-image$"))

    page.get_by_role("tab", name="Watch").click()
    waiting = page.locator(f'#queue li[data-id="{second}"]')
    expect(waiting).to_contain_text("answered late")
    waiting.get_by_role("button", name="Cancel answered late").click()
    expect(waiting).to_have_count(0)
    expect(page.locator(f'#finished .card[data-id="{second}"] .status')).to_have_text("Canceled")
    assert status(server, "text-to-image", second)["status"] == "CANCELED"


def test_latest_shows_the_newest_job_after_a_reload(
    make_server: Callable[..., Server], session: Session
) -> None:
    server = make_server()
    # A job made elsewhere (curl, another app) before the page was opened.
    posted = server.post_json("text-to-image", {"prompt": "made with curl", "steps": 8}).json()
    done = server.wait_status(posted["resultUrl"], {"COMPLETE"})
    assert len(done["imageUrls"]) == 1
    page = session.page
    open_page(page, server)
    latest = page.locator("#latest .card")
    expect(latest).to_have_attribute("data-id", posted["resultUrl"].rsplit("/", 1)[1])
    expect(latest.locator(".status")).to_have_text("Complete")
    wait_images_loaded(page, "#latest .thumb img", 1)

    # One made on the page, then the page reloaded: it is still shown, with its live state.
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("made on the page")
    t2i.get_by_label("Steps").fill("8")
    mine = make(page, "text-to-image")
    expect(latest.locator(".status")).to_have_text("Complete")
    page.reload()
    expect(page.locator("#connection")).to_have_text("Live")
    expect(latest).to_have_attribute("data-id", mine)
    expect(latest.locator(".status")).to_have_text("Complete")
    expect(latest).to_contain_text("made on the page")
    wait_images_loaded(page, "#latest .thumb img", 1)


def test_field_errors_beside_their_fields(
    make_server: Callable[..., Server], session: Session
) -> None:
    server = make_server()
    page = session.page
    session.expect_failed_request(400, "/text-to-image")
    open_page(page, server)
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("a field error")
    steps = t2i.get_by_label("Steps")
    steps.fill("9")  # one of the values that crash the scripts' sampler: the server knows
    t2i.get_by_role("button", name="Make", exact=True).click()
    error = page.locator("#text-to-image-steps-error")
    expect(error).to_contain_text("steps=9 crashes the DDIM sampler")
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_be_focused()
    # The error is part of the field's description, for screen readers.
    assert "text-to-image-steps-error" in (steps.get_attribute("aria-describedby") or "")
    session.screenshot("-steps")

    steps.fill("8")
    t2i.get_by_label("Prompt").fill("   ")
    t2i.get_by_role("button", name="Make", exact=True).click()
    expect(page.locator("#text-to-image-prompt-error")).not_to_be_empty()
    expect(error).to_be_hidden()
    expect(t2i.get_by_label("Prompt")).to_have_attribute("aria-invalid", "true")

    t2i.get_by_label("Prompt").fill("a field error, fixed")
    make(page, "text-to-image")
    expect(page.locator("#text-to-image-prompt-error")).to_be_hidden()
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    assert server.get("/jobs").json()["items"][0]["params"]["steps"] == 8


def test_api_key_asked_once(make_server: Callable[..., Server], session: Session) -> None:
    server = start_keyed(make_server)
    auth = {"Authorization": f"Bearer {KEY}"}
    page = session.page
    session.expect_failed_request(401, "/jobs?limit=1")  # the wrong key, checked
    page.goto(f"https://127.0.0.1:{server.port}/")
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    dialog.get_by_label("API key").fill("not-the-key")
    dialog.get_by_role("button", name="Use key").click()
    expect(dialog.get_by_role("alert")).to_have_text("The server refused this key.")
    page.keyboard.press("Escape")  # nothing works without the key: it stays
    expect(dialog).to_be_visible()
    dialog.get_by_label("API key").fill(KEY)
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#connection")).to_have_text("Live")  # the stream, with a token

    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("behind a key")
    job_id = make(page, "text-to-image")
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    wait_images_loaded(page, "#latest .thumb img", 1)  # fetched with the key, as a blob
    assert status(server, "text-to-image", job_id, auth)["status"] == "COMPLETE"
    # Kept for this tab only, and never in a URL the page used.
    assert page.evaluate("sessionStorage.getItem('sd-rest:api-key')") == KEY
    assert page.evaluate("localStorage.getItem('sd-rest:api-key')") is None

    # Asked once: a reload does not ask again, and everything still works.
    page.reload()
    expect(page.locator("#connection")).to_have_text("Live")
    expect(dialog).to_be_hidden()
    page.get_by_role("tab", name="Browse").click()
    expect(page.locator("#gallery li").first).to_have_attribute("data-id", job_id)
    wait_images_loaded(page, "#gallery li img", 1)

    # Forgetting it asks again.
    page.get_by_role("button", name="Forget key").click()
    expect(dialog).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('sd-rest:api-key')") is None


def test_phone_width_keyboard_labels_and_memory(
    make_server: Callable[..., Server], phone: Session
) -> None:
    server = make_server()
    page = phone.page
    open_page(page, server)

    # Every control has a name a screen reader reads out (a label, or aria-label).
    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
        'input, select, textarea, button, canvas, progress, a')]
      .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
        && !el.getAttribute('aria-labelledby') && !(el.textContent || '').trim())
      .map(el => el.outerHTML.slice(0, 80))""")
    assert unlabelled == []

    # The tabs work with the keyboard (arrow keys, as the ARIA tabs pattern has it).
    page.get_by_role("tab", name="Make").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Watch")).to_be_focused()
    expect(page.locator("#watch")).to_be_visible()
    page.keyboard.press("End")
    expect(page.get_by_role("tab", name="Browse")).to_have_attribute("aria-selected", "true")
    page.keyboard.press("Home")
    expect(page.locator("#make")).to_be_visible()

    # Nothing wider than the phone, on any tab.
    for tab in ("Make", "Watch", "Browse"):
        page.get_by_role("tab", name=tab).click()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], tab

    # The last settings are remembered across a reload.
    page.get_by_role("tab", name="Make").click()
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("remember me")
    t2i.get_by_label("Steps").fill("12")
    inpaint = form(page, "inpaint-image")
    page.reload()
    expect(inpaint).to_be_visible()  # the endpoint chosen last
    t2i = form(page, "text-to-image")
    expect(t2i.get_by_label("Prompt")).to_have_value("remember me")
    expect(t2i.get_by_label("Steps")).to_have_value("12")

    # A finger paints the mask and does not scroll the page meanwhile.
    inpaint = form(page, "inpaint-image")
    inpaint.get_by_label("Image", exact=True).set_input_files(
        {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(384, 512)}
    )
    canvas = inpaint.get_by_role("img", name=re.compile("^Mask"))
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None
    scrolled = page.evaluate("window.scrollY")
    cdp = page.context.new_cdp_session(page)
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.3
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 9):
        point = {"x": x, "y": y + box["height"] * 0.05 * step}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert page.evaluate("window.scrollY") == scrolled
    painted = page.evaluate("""() => {
      const c = document.getElementById('inpaint-image-mask');
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
      return n;
    }""")
    assert painted > 1000
    job_id = make(page, "inpaint-image")
    expect(page.locator("#latest .card .status")).to_have_text("Complete")
    assert status(server, "inpaint-image", job_id)["status"] == "COMPLETE"


def test_plms_is_a_checkbox_that_sends_1_and_is_remembered(
    make_server: Callable[..., Server], session: Session
) -> None:
    server = make_server()
    page = session.page
    open_page(page, server)
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("sampled with PLMS")
    plms = t2i.get_by_label("PLMS sampler")
    expect(plms).not_to_be_checked()
    plms.check()
    job_id = make(page, "text-to-image")
    sidecar = server.output / "text-to-image" / job_id / "job.json"
    params = wait_until(lambda: sidecar.exists() and json.loads(sidecar.read_text())["params"],
                        "the job's sidecar")  # fmt: skip
    assert params["plms"] == 1
    page.reload()
    expect(page.locator("#connection")).to_have_text("Live")
    expect(form(page, "text-to-image").get_by_label("PLMS sampler")).to_be_checked()
    form(page, "text-to-image").get_by_label("PLMS sampler").uncheck()
    t2i = form(page, "text-to-image")
    t2i.get_by_label("Prompt").fill("sampled with DDIM")
    job_id = make(page, "text-to-image")
    sidecar = server.output / "text-to-image" / job_id / "job.json"
    params = wait_until(lambda: sidecar.exists() and json.loads(sidecar.read_text())["params"],
                        "the job's sidecar")  # fmt: skip
    assert "plms" not in params  # its default is left out, so every earlier id stays
