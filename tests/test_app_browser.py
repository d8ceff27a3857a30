"""Browser test of the Gradio app: Playwright driving Debian's chromium (own command: `pytest -m browser`).

Loads the page, uploads a synthetic scene, types a prompt, runs, waits for the boxes, exercises every tab
and saves screenshots (to a temp dir, copied to /tmp/app_shots/ for review). Fails on console errors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("APP_SHOTS", "/tmp/app_shots"))


@pytest.fixture(scope="module")
def server():
    import app

    demo = app.queue(app.build_demo())
    demo.launch(prevent_thread_lock=True, share=False, **app.launch_kwargs())
    yield demo
    demo.close()


def test_the_app_in_a_browser(server, tmp_path):
    required = os.environ.get("GLIP_REQUIRE_BROWSER") == "1"  # CI: a missing browser is a failure, not a skip
    try:
        from playwright import sync_api
    except ImportError:
        (pytest.fail if required else pytest.skip)("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        (pytest.fail if required else pytest.skip)(f"{CHROMIUM} not installed (apt-get install chromium)")
    from glip.data import make_sample
    from glip.draw import phrase_color

    scene = tmp_path / "scene.png"
    sample = make_sample("gold_det", 7, 0)
    sample.image.save(scene)
    prompt = " . ".join(dict.fromkeys(o.category for o in sample.objs).keys())
    errors: list[str] = []
    shots: list[Path] = []

    def shot(page, name):
        p = tmp_path / f"{len(shots):02d}_{name}.png"
        page.screenshot(path=str(p), full_page=True)
        shots.append(p)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, SHOTS / p.name)  # for review, also when a later step fails

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.goto(server.local_url, wait_until="load", timeout=60_000)
        page.get_by_role("button", name="Ground", exact=True).wait_for(timeout=60_000)
        shot(page, "loaded")

        # Ground: upload, prompt, run, wait for the boxes
        page.locator("#image-in input[type=file]").set_input_files(str(scene))
        page.locator("#image-in img").first.wait_for(timeout=20_000)
        page.locator("#prompt-in textarea").fill(prompt)
        page.locator("#run-btn").click()
        page.locator("#image-out img").first.wait_for(timeout=60_000)
        page.locator("#det-table").get_by_text("score").first.wait_for(timeout=20_000)
        page.locator("#heat-gallery img").first.wait_for(timeout=20_000)
        page.wait_for_timeout(800)
        shot(page, "ground")
        status = page.locator("#ground-status").inner_text()
        assert "boxes above" in status
        # the phrase cells of the table carry the phrase colour (the same as the boxes and the prompt)
        cell = page.locator('#det-table [data-testid="cell-0-1"]')
        cell.wait_for(timeout=20_000)
        style = cell.get_attribute("style") or ""
        phrases = [c.strip() for c in prompt.split(".")]
        j = phrases.index(cell.inner_text().strip())
        r, g, b = (int(phrase_color(j)[k:k + 2], 16) for k in (1, 3, 5))
        assert f"rgb({r}, {g}, {b})" in style, style
        # select a detection row → per-token bar chart + that box highlighted
        page.locator('#det-table [data-testid="cell-1-1"]').click()
        page.wait_for_timeout(2500)
        shot(page, "ground_row_selected")
        # click a phrase in the highlighted prompt → its heat maps
        page.locator("#prompt-out").get_by_text(phrases[-1], exact=True).first.click()
        page.wait_for_timeout(2500)
        assert phrases[-1] in page.locator("#heat-pick input").input_value()

        # an example from the gallery fills image + prompt
        page.get_by_text("Synthetic scenes (click one)").scroll_into_view_if_needed()

        # Deep fusion
        page.get_by_role("tab", name="Deep fusion").click()
        page.locator("#fusion-btn").click()
        page.locator("#t2i-gallery img").first.wait_for(timeout=60_000)
        page.locator("#click-img img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "fusion")
        page.locator("#i2t-mat img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        before = page.locator("#click-img img").first.get_attribute("src")
        img = page.locator("#click-img img").first
        img.scroll_into_view_if_needed()
        box = img.bounding_box()
        img.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.4})
        page.wait_for_function("b => document.querySelector('#click-img img').getAttribute('src') !== b", arg=before,
                               timeout=30_000)  # the clicked point is marked
        page.wait_for_timeout(1500)
        page.locator("#click-img").scroll_into_view_if_needed()
        shot(page, "fusion_point")
        page.get_by_role("button", name="Compare with fusion off").click()
        page.locator("#abl-on img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "fusion_ablation")

        # Teacher vs student
        page.get_by_role("tab", name="Teacher vs student").click()
        page.locator("#cmp-btn").click()
        page.get_by_text("pseudo-labels (>").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "teacher_student")

        # Prompt lab
        page.get_by_role("tab", name="Prompt lab").click()
        page.locator("#lab-image input[type=file]").set_input_files(str(scene))
        page.locator("#lab-image img").first.wait_for(timeout=20_000)
        page.get_by_role("button", name="Compare prompts").click()
        page.locator("#lab-a img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "prompt_lab")
        browser.close()

    print("screenshots:", [str(SHOTS / p.name) for p in shots])
    bad = [e for e in errors if "favicon" not in e]
    assert not bad, bad
