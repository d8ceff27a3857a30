"""Browser test of the Gradio app: Playwright driving Debian's chromium (own command: `pytest -m browser`).

Loads the page, grounds a synthetic scene with a long prompt, a photo-like image with a toy model (the framing
note), downloads a released model from a local fake hub (visible progress) and runs it, exercises every tab
(the teacher/student pickers included) and saves screenshots (to a temp dir, copied to /tmp/app_shots/ for
review). Fails on console errors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_hub import FakeHub, official_checkpoint, small_release

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("APP_SHOTS", "/tmp/app_shots"))


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    rel = small_release()
    h = FakeHub()
    h.add(rel.repo, rel.filename, official_checkpoint(tmp_path_factory.mktemp("ckpt") / "o.pth").read_bytes())
    h.rate[f"{rel.repo}/{rel.filename}"] = 1.2e6  # ~6 s: the progress is there to see
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(hub_server, tmp_path_factory):
    import app
    from app.models import ModelManager

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub_server.url)
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf")))
    mm = ModelManager(cache=tmp_path_factory.mktemp("cache"), releases=(small_release(),))
    demo = app.queue(app.build_demo(mm))
    demo.launch(prevent_thread_lock=True, share=False, **app.launch_kwargs())
    yield demo
    demo.close()
    mp.undo()


def _pick(page, elem_id: str, option: str):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_the_app_in_a_browser(server, tmp_path):
    required = os.environ.get("GLIP_REQUIRE_BROWSER") == "1"  # CI: a missing browser is a failure, not a skip
    try:
        from playwright import sync_api
    except ImportError:
        (pytest.fail if required else pytest.skip)("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        (pytest.fail if required else pytest.skip)(f"{CHROMIUM} not installed (apt-get install chromium)")
    from glip.data import make_sample
    from glip.draw import phrase_styles

    scene = tmp_path / "scene.png"
    sample = make_sample("gold_det", 7, 0)
    sample.image.save(scene)
    cats = list(dict.fromkeys(o.category for o in sample.objs))
    prompt = " . ".join(cats + [f"{c} {s}" for c in ("pink", "turquoise") for s in ("cross", "crescent", "diamond")])
    photo = tmp_path / "photo.jpg"  # photo-like: smooth gradients and noise, not a synthetic scene
    yy, xx = np.mgrid[0:360, 0:480]
    rgb = np.stack([xx / 480 * 200 + 30, yy / 360 * 150 + 50, 120 + 60 * np.sin(xx / 40)], -1)
    Image.fromarray((rgb + np.random.default_rng(0).normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)).save(photo)
    errors: list[str] = []
    shots: list[Path] = []

    def shot(page, name, full=True):
        p = tmp_path / f"{len(shots):02d}_{name}.png"
        page.screenshot(path=str(p), full_page=full)
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

        # an example row fills the image and the prompt (through the queue: direct calls are refused)
        ex_path, ex_prompt = server.core.examples[0]
        page.locator("#ground-examples tbody tr").first.click()
        page.wait_for_function("p => document.querySelector('#prompt-in textarea').value === p", arg=ex_prompt,
                               timeout=20_000)
        page.locator("#image-in img").first.wait_for(timeout=20_000)
        page.locator("#image-in button[aria-label='Remove Image']").first.click()

        # Ground: a synthetic scene and a long prompt (44 tokens), run, boxes
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
        assert "toy-student" in status and ("box" in status and " above " in status)
        # the phrase cells of the table carry the phrase colour (the same as the boxes and the prompt)
        cell = page.locator('#det-table [data-testid="cell-0-1"]')
        cell.wait_for(timeout=20_000)
        style = cell.get_attribute("style") or ""
        phrases = [c.strip() for c in prompt.split(".")]
        color = phrase_styles(phrases)[phrases.index(cell.inner_text().strip())].color
        r, g, b = (int(color[k:k + 2], 16) for k in (1, 3, 5))
        assert f"rgb({r}, {g}, {b})" in style, style
        page.locator('#det-table [data-testid="cell-1-1"]').click()
        page.wait_for_timeout(2500)
        page.locator("#token-bars").scroll_into_view_if_needed()
        shot(page, "ground_row_selected_token_bars", full=False)
        page.locator("#prompt-out").get_by_text(phrases[0], exact=True).first.click()
        page.wait_for_timeout(2500)
        assert phrases[0] in page.locator("#heat-pick input").input_value()

        # a photo with a toy model: the framing note says what the toy knows and how to get a real GLIP
        page.locator("#image-in button[aria-label='Remove Image']").first.click()
        page.locator("#image-in input[type=file]").set_input_files(str(photo))
        page.locator("#image-in img").first.wait_for(timeout=20_000)
        page.locator("#prompt-in textarea").fill("a cat . a coffee cup")
        page.locator("#run-btn").click()
        page.get_by_text("not on photos").first.wait_for(timeout=60_000)
        page.locator("#ground-status").get_by_text("2 phrases").first.wait_for(timeout=60_000)
        page.wait_for_timeout(800)
        note = page.locator("#model-note").inner_text()
        assert "toy model" in note and "python app.py --model PATH" in note
        page.locator("#model-note").scroll_into_view_if_needed()
        shot(page, "ground_photo_toy_framing", full=False)

        # a released model from the (fake) hub: visible progress, then it runs
        _pick(page, "model-in", "GLIP-T")
        page.locator("#model-status").get_by_text("downloading").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1200)
        txt = page.locator("#model-status").inner_text()
        assert "MB" in txt and "%" in txt and "/s" in txt, txt
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "download_progress", full=False)
        page.wait_for_function("() => !document.querySelector('#model-status').innerText.includes('GLIP-T')",
                               timeout=90_000)
        page.locator("#run-btn").click()
        page.locator("#ground-status").get_by_text("GLIP-T").first.wait_for(timeout=60_000)
        assert "not on photos" not in page.locator("#model-note").inner_text()
        page.wait_for_timeout(800)
        shot(page, "ground_glip_t")

        # back to the synthetic scene and the toy student for the other tabs
        page.locator("#image-in button[aria-label='Remove Image']").first.click()
        page.locator("#image-in input[type=file]").set_input_files(str(scene))
        page.locator("#image-in img").first.wait_for(timeout=20_000)
        page.locator("#prompt-in textarea").fill(" . ".join(cats))
        _pick(page, "model-in", "toy-student")
        page.locator("#run-btn").click()
        page.locator("#ground-status").get_by_text("toy-student").first.wait_for(timeout=60_000)

        # Deep fusion
        page.get_by_role("tab", name="Deep fusion").click()
        assert "not a localisation map" in page.locator("#fusion-about").inner_text()
        page.locator("#fusion-btn").click()
        page.locator("#t2i-gallery img").first.wait_for(timeout=60_000)
        page.locator("#click-img img").first.wait_for(timeout=60_000)
        page.locator("#i2t-mat img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        shot(page, "fusion")
        before = page.locator("#click-img img").first.get_attribute("src")
        img = page.locator("#click-img img").first
        img.scroll_into_view_if_needed()
        box = img.bounding_box()
        img.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.4})
        page.wait_for_function("b => document.querySelector('#click-img img').getAttribute('src') !== b", arg=before,
                               timeout=30_000)
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Compare with fusion off").click()
        page.locator("#abl-on img").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "fusion_point_ablation")

        # Teacher vs student: two pickers, the toy preset, compare
        page.get_by_role("tab", name="Teacher vs student").click()
        assert page.locator("#teacher-in input").input_value() == "toy-teacher"
        assert page.locator("#student-in input").input_value() == "toy-student"
        page.locator("#ts-image img").first.wait_for(timeout=30_000)
        page.locator("#cmp-btn").click()
        page.locator("#ts-summary").get_by_text("pseudo-labels").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot(page, "teacher_student")
        # the student picker takes any model: GLIP-T (downloaded above) against the toy teacher
        _pick(page, "student-in", "GLIP-T")
        page.locator("#cmp-btn").click()
        page.wait_for_function("() => document.querySelector('#ts-summary').innerText.includes('student GLIP-T')",
                               timeout=60_000)
        page.wait_for_timeout(1000)

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
