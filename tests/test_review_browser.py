"""The review app in a real browser: Playwright driving Debian's chromium against uvicorn on a
free 127.0.0.1 port. One walk: gallery, filter, open an image, opacity slider, reject with the
keyboard, reload and see the decision kept, next image, "try it" on the tiny models. The image
page's screenshot is checked for content; with TAG2MASK_UPDATE_SCREENSHOT=1 it is written to
docs/img/review.png (the README's picture), otherwise to the test's temporary folder, so a test
run leaves the checkout unchanged."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.review import create_app
from tests.review_data import review_run  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download is not reachable
README_SCREENSHOT = ROOT / "docs" / "img" / "review.png"
CLASS_RGB = {"cat": (128, 0, 0), "dog": (128, 128, 128), "person": (192, 128, 128)}  # the label PNG palette


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(review_run, tmp_path):  # noqa: F811
    import uvicorn

    shutil.copytree(review_run.parent, tmp_path / "copy", ignore=shutil.ignore_patterns("tiny*"))
    prefix = tmp_path / "copy" / "run"
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(str(prefix)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", prefix
    srv.should_exit = True
    thread.join(timeout=30)


def _cards(page) -> list[str]:
    return page.eval_on_selector_all("a.card", "cards => cards.map(c => c.dataset.id)")


@pytest.mark.slow
def test_review_walk_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, prefix = server
    update = os.environ.get("TAG2MASK_UPDATE_SCREENSHOT") == "1"
    shot_path = README_SCREENSHOT if update else tmp_path / "review.png"
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(f"{base}/gallery")
        assert len(_cards(page)) == 6
        page.select_option("select[name=cat]", "7")  # images with dog pixels; applies at once
        page.wait_for_url("**/gallery?cat=7*")
        assert _cards(page) == ["both-2", "dog-1", "three-4"]
        page.locator('input[data-name="min_class_score"]').fill("0.5")  # the class score's range slider
        page.click("#apply")
        page.wait_for_url("**/gallery?*min_class_score=0.5*")
        assert _cards(page) == ["dog-1", "three-4"]
        page.click('a.card[data-id="dog-1"]')
        page.wait_for_url("**/image?id=dog-1*")
        page.locator("#opacity").fill("0.2")
        expect(page.locator("#overlay")).to_have_attribute("style", "opacity: 0.2;")
        page.keyboard.press("r")
        expect(page.locator("#decision")).to_have_text("reject")
        page.reload()
        expect(page.locator("#decision")).to_have_text("reject")
        assert list((prefix / "review").glob("decisions-*.jsonl"))
        page.keyboard.press("j")  # next image of the filtered view
        page.wait_for_url("**/image?id=three-4*")
        page.locator("#opacity").fill("1")
        page.wait_for_load_state("networkidle")
        shot_path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot_path), full_page=True)
        page.goto(f"{base}/try?id=cat-0")
        page.fill("input[name=tags]", "cat")
        page.click("#try-run")
        page.wait_for_selector("#try-result, #try-error", timeout=300_000)
        assert page.locator("#try-error").count() == 0, page.locator("#try-error").inner_text()
        assert page.locator("#try-result img").count() == 3  # final map, cat coarse, cat compensated
        widths = page.eval_on_selector_all("#try-result img", "imgs => imgs.map(i => i.naturalWidth)")
        assert min(widths) > 0
        page.set_input_files("input[name=upload]", str(prefix.parent / "images" / "three-4.png"))  # an upload
        page.fill("input[name=image_id]", "")
        page.fill("input[name=tags]", "dog, person")
        page.click("#try-run")
        page.wait_for_selector("#try-result, #try-error", timeout=300_000)
        assert page.locator("#try-error").count() == 0, page.locator("#try-error").inner_text()
        assert page.locator("#try-result img").count() == 5  # final map, then coarse and compensated per class
        browser.close()
    assert not errors, errors
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    assert shot.std() > 20  # not blank
    for name, rgb in CLASS_RGB.items():  # the overlay at full opacity shows each class's colour
        assert (shot == rgb).all(axis=2).sum() > 2000, name
