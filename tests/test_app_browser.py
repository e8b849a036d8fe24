"""End to end: start the Gradio app on a loopback port and drive it in headless Chromium.

Upload an image, edit a prompt, add a reference, read the score, save a screenshot (path printed, and
copied to $VLAD_SCREENSHOT_DIR when set). Needs Debian's chromium and the playwright package; skipped
where they are missing (.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from conftest import textured, with_defect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 180_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_app_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from vlad.app import build_app

    bad, good = tmp_path / "bad.png", tmp_path / "good.png"
    Image.fromarray(with_defect(textured(9))).save(bad)
    Image.fromarray(textured(1)).save(good)

    port = _free_port()
    demo = build_app(["winclip", "anomalydino"], "metal plate", "tiny", "cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=False)
    shot = tmp_path / "vlad-demo.png"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/")
            status = page.locator("#status")

            page.locator("#build").click()
            sync_api.expect(status).to_contain_text("ready", timeout=TIMEOUT_MS)

            page.locator("#images input[type=file]").set_input_files(str(bad))
            page.locator("#inspect").click()
            sync_api.expect(status).to_contain_text("scored 1 image", timeout=TIMEOUT_MS)
            sync_api.expect(page.locator("#scores")).to_contain_text("bad.png", timeout=TIMEOUT_MS)

            anomalous = page.locator("#anomalous textarea")
            anomalous.fill(anomalous.input_value() + "\n{} with a purple zebra stripe")
            page.locator("#apply-prompts").click()
            sync_api.expect(status).to_contain_text("prompts applied", timeout=TIMEOUT_MS)

            page.locator("#refs input[type=file]").set_input_files(str(good))
            page.locator("#add-refs").click()
            sync_api.expect(status).to_contain_text("1 reference(s) added", timeout=TIMEOUT_MS)
            sync_api.expect(page.locator("#summary")).to_contain_text("references: 1", timeout=TIMEOUT_MS)

            # one reference: the labels rest on its views, and the sentence says so where the labels are
            sync_api.expect(page.locator("#summary")).to_contain_text("jittered views", timeout=TIMEOUT_MS)
            sync_api.expect(page.locator("#summary")).to_contain_text("not a guarantee", timeout=TIMEOUT_MS)
            # the square map is shown whole: the element's shape is the image's (no crop to a wide tile)
            shown = page.locator("#fused-maps img.vlad-map").first
            box = shown.bounding_box()
            natural = shown.evaluate("el => [el.naturalWidth, el.naturalHeight]")
            assert box is not None and box["width"] > 50
            assert abs(box["width"] / box["height"] - 1.0) < 0.05, (box, natural)
            assert natural[0] == natural[1]
            assert page.locator("#fused-maps img.vlad-image").count() == 1  # the image beside its map

            table = page.locator("#scores").inner_text()
            assert "bad.png" in table and "anomalydino" in table
            score = float(table.split("bad.png", 1)[1].split()[0])
            assert 0.0 <= score <= 1.0
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    keep = os.environ.get("VLAD_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
