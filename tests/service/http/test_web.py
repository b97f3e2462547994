"""The web page in headless Chromium against the service in its own uvicorn process.

Set PROMPTSERVE_WEB_SCREENSHOT=docs/web.png to keep the screenshot (docs/web.md).
"""

import base64
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import SAMPLES

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
TOP_BAR_GREEN = (0x1F, 0x9D, 0x6B)  # style.css: the fill of each answer's first bar


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_service):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(live_service.url)  # / redirects to /ui/
    page.wait_for_selector("#tasks input[data-task=colours]")
    yield page
    page.close()


def expected(name: str) -> dict[str, str]:
    colour, shape = Path(name).stem.split("_")
    return {"shapes": shape, "colours": colour}


def top_labels(page) -> dict[str, dict[str, str]]:
    """For each image card: the top bar's label of each task."""
    return page.eval_on_selector_all(".image", """cards => Object.fromEntries(cards.map(card => [
        card.dataset.filename,
        Object.fromEntries([...card.querySelectorAll('.answer')].map(a => [a.dataset.task,
                                                                           a.querySelector('.bar').dataset.label]))]))""")


def test_picked_images_get_bars_for_every_selected_task(page, tmp_path):
    files = [SAMPLES / "red_star.png", SAMPLES / "blue_circle.png", SAMPLES / "green_triangle.png"]
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_selector(".image:nth-of-type(3) .bar")
    assert top_labels(page) == {f.name: expected(f.name) for f in files}
    assert page.locator(".image:first-of-type .answer[data-task=shapes] .bar").count() == 3  # top-k 3
    widths = page.eval_on_selector_all(".image:first-of-type .answer[data-task=shapes] .fill",
                                       "fills => fills.map(f => f.getBoundingClientRect().width)")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0

    shot = Path(os.environ.get("PROMPTSERVE_WEB_SCREENSHOT") or tmp_path / "web.png")
    page.screenshot(path=shot, full_page=True)
    pixels = Image.open(shot).convert("RGB")
    green = sum(count for count, colour in pixels.getcolors(1 << 24) if colour == TOP_BAR_GREEN)
    assert green > 6 * 100, "the screenshot should show the six top bars (3 images x 2 tasks)"


def test_a_dropped_image_is_answered_for_the_one_selected_task(page):
    page.uncheck("#tasks input[data-task=colours]")
    data = base64.b64encode((SAMPLES / "yellow_heart.png").read_bytes()).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'yellow_heart.png', {type: 'image/png'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", data)
    page.wait_for_selector(".image .bar")
    assert top_labels(page) == {"yellow_heart.png": {"shapes": "heart"}}


def test_a_refused_request_shows_the_servers_error(page):
    page.fill("#top-k", "0")
    page.set_input_files("#file", str(SAMPLES / "red_star.png"))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("422")
    assert page.locator(".image").count() == 0


def test_typed_labels_classify_each_image_beside_the_selected_tasks(page):
    files = [SAMPLES / "red_star.png", SAMPLES / "blue_circle.png"]
    page.fill("#labels", "heart, star , circle,triangle")
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_selector(".image:nth-of-type(2) .answer[data-task=labels] .bar")
    assert top_labels(page) == {f.name: expected(f.name) | {"labels": expected(f.name)["shapes"]} for f in files}
    assert page.inner_text(".image:first-of-type .answer[data-task=labels] h4").startswith("typed labels")

    page.uncheck("#tasks input[data-task=shapes]")
    page.uncheck("#tasks input[data-task=colours]")
    page.fill("#labels", "red, blue")
    page.set_input_files("#file", str(SAMPLES / "blue_circle.png"))
    page.wait_for_function("document.querySelectorAll('.image .answer').length === 1")
    assert top_labels(page) == {"blue_circle.png": {"labels": "blue"}}
    page.fill("#labels", "")
    page.set_input_files("#file", str(SAMPLES / "red_star.png"))
    page.wait_for_selector("#error:not([hidden])")
    assert "type labels" in page.inner_text("#error")
