"""The Gradio app: rendering (one colour per phrase everywhere), exports, cache-only re-rendering, every view's
callback, the public `/ground_json` API through gradio_client, bad input, concurrent load and startup time.

Runs with the shipped toy models when they exist and with the random-weights fallback otherwise (then only
structure is asserted). The browser test is separate: tests/test_app_browser.py (`pytest -m browser`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

import app as app_pkg
from app import render
from app.models import STUDENT, ModelManager
from app.ui import Explorer
from glip.data import make_sample
from glip.draw import hex_to_rgb, phrase_color


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explorer():
    return Explorer(ModelManager())


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    s = make_sample("gold_det", 3, 0)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    s.image.save(path)
    return s, str(path)


def _ground(ex, path, prompt, thr=0.0, **kw):
    args = dict(mode="auto", phrases="", model_name=STUDENT, thr=thr, nms=0.6, max_boxes=100, size=0, precision="fp32")
    args.update(kw)
    return ex.ground(path, prompt, args["mode"], args["phrases"], args["model_name"], args["thr"], args["nms"],
                     args["max_boxes"], args["size"], args["precision"])


@pytest.fixture(scope="module")
def server():
    demo = app_pkg.queue(app_pkg.build_demo(), concurrency=2, max_size=64)
    demo.launch(prevent_thread_lock=True, share=False, **app_pkg.launch_kwargs())
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    c = Client(server.local_url, verbose=False)
    yield c
    c.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- rendering -----------------------------------------------------------------------------------------------
def test_boxes_prompt_table_legend_and_bars_share_one_colour_per_phrase(explorer, scene):
    s, path = scene
    prompt = " . ".join(dict.fromkeys(o.category for o in s.objs))
    out = _ground(explorer, path, prompt)
    annotated, highlighted, legend, table, files, bars, pick, heat, status, state = out
    model, res = explorer._predict(state)
    assert len(res) > 0
    labels = render.phrase_labels(res.prompt.phrases)
    # prompt text: every phrase segment is labelled, and its colour is phrase_color(j)
    cmap = highlighted.color_map
    for j, lab in enumerate(labels):
        assert cmap[lab] == phrase_color(j)
        assert phrase_color(j) in legend
    segs = [(d["token"], d["class_or_confidence"]) if isinstance(d, dict) else tuple(d) for d in highlighted.value]
    assert "".join(t for t, _ in segs) == res.prompt.caption
    assert {lab for _, lab in segs if lab} == set(labels)
    for t, lab in segs:
        if lab:
            assert t == res.prompt.phrases[labels.index(lab)]
    # boxes: the best box (drawn on top) is outlined in its phrase's colour
    arr = np.asarray(annotated).astype(int)
    x1, y1, x2, y2 = res.boxes[0]
    ym = int((y1 + y2) / 2)
    want = np.array(hex_to_rgb(phrase_color(int(res.phrase_ids[0]))))
    near = arr[ym, max(0, int(x1) - 2): int(x1) + 3]
    assert np.abs(near - want).sum(-1).min() < 20
    # table: the phrase cells are painted with the phrase colour
    html = table.to_html()
    for i in range(min(len(res), render.MAX_SHOWN_BOXES)):
        assert phrase_color(int(res.phrase_ids[i])) in html
    # token bars: the tokens of phrase j are drawn in phrase_color(j), the rest grey
    cols = render.token_colors(res.tokens, res.prompt)
    from glip.explain import phrase_tokens

    for j in range(len(labels)):
        assert {cols[i] for i in phrase_tokens(res.prompt, res.tokens, j)} == {phrase_color(j)}
    assert cols[0] == render.GRAY  # [CLS]
    assert bars is not None and len(heat) == 1 + 5
    assert "boxes above" in status


def test_downloads_png_and_coco_json_validate(explorer, scene):
    s, path = scene
    out = _ground(explorer, path, "red circle . blue square . star")
    png, js = out[4]
    assert Image.open(png).size == s.image.size
    data = json.loads(Path(js).read_text())
    assert {"images", "annotations", "categories", "caption", "detections"} <= set(data)
    cat_ids = {c["id"] for c in data["categories"]}
    assert [c["name"] for c in data["categories"]] == ["red circle", "blue square", "star"]
    W, H = s.image.size
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["category_id"] in cat_ids and w >= 0 and h >= 0 and 0 <= a["score"] <= 1
        assert -1 <= x and x + w <= W + 1 and -1 <= y and y + h <= H + 1
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {k: data[k] for k in ("images", "annotations", "categories")}
    coco.createIndex()
    assert len(coco.getAnnIds()) == len(data["detections"]) == len(data["annotations"])


def test_rethreshold_and_nms_rerender_from_the_cache(explorer, scene):
    s, path = scene
    out = _ground(explorer, path, "yellow star . red circle . orange square")
    state = out[-1]
    model = explorer.model(STUDENT)
    before = dict(model.predictor.stats)
    t0 = time.perf_counter()
    for thr, nms, mx in ((0.0, 0.3, 5), (0.02, 0.9, 50), (0.5, 0.6, 100)):
        re = explorer.rethreshold(state, thr, nms, mx)
        assert re[-1]["threshold"] == thr and re[-1]["nms_iou"] == nms
    assert model.predictor.stats == before, "re-thresholding must not run the network"
    print(f"3 re-renders from cache in {time.perf_counter() - t0:.2f} s")
    # the selection views re-use the cache too
    explorer.on_token_pick(state, explorer.token_choices(explorer._predict(state)[1])[-1])
    assert model.predictor.stats == before


def test_every_view_renders(explorer, scene):
    s, path = scene
    state = _ground(explorer, path, "a red circle and a yellow star", phrases="red circle; yellow star")[-1]
    _, res = explorer._predict(state)
    assert res.prompt.phrases == ["red circle", "yellow star"]

    class Sel:
        index, value = [0, 1], "x"

    bars, img = explorer.on_row_select(state, Sel())
    assert bars is not None and img.size == s.image.size
    # deep fusion
    tok, layer, head, box, info = explorer.fusion_setup(state)
    assert "fusion layers" in info
    v = lambda c: c[0] if isinstance(c, (tuple, list)) else c  # noqa: E731 (choices come back as (label, value))
    for lc, hc, how in ((layer.choices[0], head.choices[1], "each level normalised"),
                        (layer.choices[-1], head.choices[0], "attention mass per pixel")):   # layer 1 / rollout
        main, strip, fig, note = explorer.fusion_text_to_image(state, v(tok.choices[-1]), v(lc), v(hc), how)
        assert len(main) == 6 and strip.width > strip.height
    shown, mat, bars = explorer.fusion_image_to_text(state, box.value, "mean of heads", "rollout over layers")
    assert shown.size == s.image.size
    shown, mat, bars = explorer.fusion_image_to_text(state, None, "head 1", "layer 1", point=(10.0, 20.0))
    on, off, df, fig, note = explorer.ablation(state)
    assert list(df.columns) == ["phrase", "fusion on", "fusion off", "Δ (on − off)"] and len(df) == 2
    # teacher vs student: a web sample, with its hidden truth
    path_w, cap, st = explorer.pick_sample(0, 2)
    txt, gt, t_img, s_img, df, summary = explorer.compare(path_w, cap, st, 0.0, 0.0, 0.5)
    assert gt is not None and "Hidden truth" in summary and "truth" in df.columns
    assert df["teacher"].max() <= 1 and df["student"].max() <= 1  # best box per phrase (the default)
    *_, df_all, _ = explorer.compare(path_w, cap, st, 0.0, 0.0, 0.5, False)
    assert df_all["student"].max() > 1 and (df_all["student"] >= df["student"]).all()
    assert render.NOVEL_LABEL in txt.color_map  # 'turquoise' is a novel word
    # own image + caption: no truth
    txt, gt, *_ , summary = explorer.compare(path_w, "a turquoise star", st, 0.0, 0.0, 0.5)  # edited caption
    assert gt is None and "No ground truth" in summary
    # prompt lab
    a, ta, b, tb, df, fig = explorer.prompt_lab(path, "circle . star", "red round circle . yellow star", STUDENT, 0.0)
    assert len(df) == 2 and "Δ (B − A)" in df.columns
    plot, note = explorer.metrics()
    assert isinstance(note, str)


def test_metrics_plot_handles_absence_and_bad_files(tmp_path):
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is None and "No measured metrics" in note
    (tmp_path / "metrics.json").write_text("{not json")
    assert render.metrics_plot(tmp_path / "metrics.json")[0] is None
    (tmp_path / "metrics.json").write_text(json.dumps({"teacher": {"known": {"AP50": 0.8}}}))  # wrong layout
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is None and "Could not read" in note
    m = {split: {k: 0.5 for k in ("AP50", "R@1", "R@5")} for split in ("test_det", "test_ground", "test_novel")}
    (tmp_path / "metrics.json").write_text(json.dumps({"eval": {"seed": 3, "n": 10}, "teacher": {"metrics": m},
                                                       "student": {"metrics": m}}))
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is not None and "seed 3" in note
    heights = sorted(round(p.get_height(), 2) for p in fig.axes[0].patches if hasattr(p, "get_height"))
    assert heights.count(0.5) == 10  # 5 metrics × 2 models
    assert "Targets met (teacher / student): none." in note and "novel gain ≥ +0.30 (+0.00)" in note
    good = {"test_det": {"AP50": 0.95, "R@1": 0, "R@5": 0}, "test_ground": {"AP50": 0, "R@1": 0.91, "R@5": 1.0},
            "test_novel": {"AP50": 0, "R@1": 0.85, "R@5": 1.0}}
    weak = {**good, "test_det": {"AP50": 0.85, "R@1": 0, "R@5": 0}, "test_novel": {"AP50": 0, "R@1": 0.2, "R@5": 1}}
    note = render.targets_note({m: [float(d[sp][k]) for sp, k, _ in render.METRIC_BARS]
                                for m, d in (("teacher", weak), ("student", good))})
    assert note == ("Targets met (teacher / student): grounding R@1 ≥ 0.90 (0.91 / 0.91), student novel R@1 ≥ 0.80 "
                    "(0.85), novel gain ≥ +0.30 (+0.65). Missed: detection AP50 ≥ 0.90 (0.85 / 0.95).")


def test_user_errors_are_clear_messages(explorer, scene, tmp_path):
    s, path = scene
    from app.ui import friendly

    g = friendly(explorer.ground)
    cases = [((None, "circle"), "Add an image"), ((path, "   "), "prompt is empty"),
             ((str(tmp_path / "missing.png"), "circle"), "not found")]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    cases.append(((str(bad), "circle"), "corrupt"))
    for (img, prompt), msg in cases:
        with pytest.raises(gr.Error, match=msg):
            g(img, prompt, "auto", "", STUDENT, 0.3, 0.6, 100, 0, "fp32")
    with pytest.raises(gr.Error, match="not in the caption"):
        g(path, "a red circle", "caption", "blue star", STUDENT, 0.3, 0.6, 100, 0, "fp32")
    with pytest.raises(gr.Error, match="threshold"):
        g(path, "circle", "auto", "", STUDENT, 1.5, 0.6, 100, 0, "fp32")
    with pytest.warns(UserWarning, match="(?i)hugging face.*showing toy-student instead"):  # gr.Warning
        out = g(path, "circle", "auto", "", "GLIP-T (O365+GoldG, download)", 0.3, 0.6, 100, 0, "fp32")
    assert out[-1]["model"] == STUDENT and "toy-student" in out[-2]
    # huge and long inputs are handled, not errors
    huge = tmp_path / "huge.png"
    Image.new("RGB", (6000, 400), (120, 130, 140)).save(huge)
    out = g(str(huge), "circle", "auto", "", STUDENT, 0.0, 0.6, 5, 0, "fp32")
    assert out[0].size[0] <= 4096
    long_prompt = " . ".join(f"{c} {sh}" for c in ("red", "green", "blue", "yellow", "purple", "orange", "pink", "turquoise")
                             for sh in ("circle", "square", "triangle", "star", "heart", "hexagon", "cross", "diamond"))
    out = g(path, long_prompt, "auto", "", STUDENT, 0.0, 0.6, 10, 0, "fp32")
    assert len(explorer._predict(out[-1])[1].prompt.phrases) == 64


# --- the public API, in-process server --------------------------------------------------------------------------
def test_ground_json_api(client, scene, explorer):
    from gradio_client import handle_file

    s, path = scene
    cats = list(dict.fromkeys(o.category for o in s.objs))
    prompt = " . ".join(cats)
    out = client.predict(handle_file(path), prompt, STUDENT, 0.0, api_name="/ground_json")
    assert isinstance(out, list) and out
    for d in out:
        assert set(d) == {"box", "score", "phrase", "span"}
        x1, y1, x2, y2 = d["box"]
        assert x1 <= x2 and y1 <= y2 and 0.0 <= d["score"] <= 1.0
        assert d["phrase"] in cats and prompt[d["span"][0]:d["span"][1]] == d["phrase"]
    api = client.view_api(print_info=False, return_format="dict")
    assert "/ground_json" in api["named_endpoints"]
    if not explorer.manager.is_fallback(STUDENT):  # the trained student must find the named objects
        from glip.explain import _iou

        found = 0
        for o in s.objs:
            hits = [d for d in out if d["phrase"] == o.category and d["score"] > 0.3]
            found += any(_iou(np.array([d["box"]]), np.array([o.box]))[0, 0] >= 0.5 for d in hits)
        assert found >= max(1, len(s.objs) // 2), (found, len(s.objs))


def test_api_bad_input_is_answered_and_the_app_keeps_serving(client, scene, tmp_path):
    from gradio_client import handle_file

    s, path = scene
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    for args, msg in (((handle_file(path), "", STUDENT, 0.3), "empty"),
                      ((handle_file(path), "circle", STUDENT, 1.5), "threshold"),
                      ((handle_file(str(bad)), "circle", STUDENT, 0.3), "image"),
                      ((handle_file(path), "circle", "GLIP-L (download)", 0.3), "Hugging Face")):
        with pytest.raises(Exception, match=msg) as e:
            client.predict(*args, api_name="/ground_json")
        assert "Traceback" not in str(e.value)
    assert isinstance(client.predict(handle_file(path), "circle", STUDENT, 0.3, api_name="/ground_json"), list)


def test_concurrent_clients(server, scene):
    """8 clients × 5 requests, all answered; memory after stays within a bound of before."""
    from gradio_client import Client, handle_file

    s, path = scene
    prompts = ["circle", "red circle . star", "a blue square", "yellow star . green heart", "triangle"]
    warm = Client(server.local_url, verbose=False)
    for p in prompts:  # warm the caches / allocator
        warm.predict(handle_file(path), p, STUDENT, 0.2, api_name="/ground_json")
    before = _rss_mb()
    answers, errors = [], []

    def user(k):
        try:
            c = Client(server.local_url, verbose=False)
            for r in range(5):
                out = c.predict(handle_file(path), prompts[(k + r) % len(prompts)], STUDENT, 0.2, api_name="/ground_json")
                answers.append(isinstance(out, list))
            c.close()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    dt = time.perf_counter() - t0
    after = _rss_mb()
    print(f"40 requests from 8 clients in {dt:.1f} s; RSS {before:.0f} → {after:.0f} MB")
    assert not errors, errors[:3]
    assert len(answers) == 40 and all(answers)
    assert after - before < 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_startup_time_of_python_app_py():
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = None
        for line in proc.stdout:
            if "GLIP Explorer ready" in line:
                ready = time.perf_counter() - t0
                break
        assert ready is not None, "app.py exited without becoming ready"
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200
        print(f"python app.py ready in {ready:.1f} s (wall, incl. interpreter start)")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_local_checkpoint_is_offered_and_loads(tmp_path):
    """--model PATH / GLIP_MODEL: a local checkpoint becomes a menu entry (never an upload)."""
    from app.models import random_toy

    random_toy(seed=3).save_pretrained(tmp_path / "mine")
    mm = ModelManager(local=str(tmp_path / "mine"))
    assert mm.choices()[0] == mm.default() == "local: mine"
    model = mm.get("local: mine")
    assert model.config.name == "toy"
    with pytest.raises(Exception, match="Unknown model"):
        mm.get("../../etc/passwd")
