"""The Gradio app: drawing rules (glip.draw), every tab's callbacks, exports, cache-only re-rendering, the model
manager (released checkpoints from a local fake hub: progress, cache, failures, no blocking), the limits of a
public service (queue bypass, private routes, header-size check, data-URL cap, pixel budget, prompt length), the
public `/ground_json` API, scratch folders, startup, and memory under concurrent large images.

Runs with the shipped toy models when they exist and with the random-weights fallback otherwise (then only
structure is asserted). The browser test is separate: tests/test_app_browser.py (`pytest -m browser`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_hub import small_release

import app as app_pkg
from app import render
from app.limits import MAX_PHRASES, MAX_PROMPT_CHARS, MAX_UPLOAD_BYTES, PixelBudget
from app.models import LOCAL_HINT, STUDENT, TEACHER, ModelManager, ModelNotReady, random_toy
from app.scratch import PREFIX, Scratch, clean_stale
from glip import draw
from glip.draw import COLOR_WORDS, FAMILIES, color_family, contrast_ratio, hex_to_rgb, phrase_styles
from glip.errors import CheckpointError


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return app_pkg.build_demo(ModelManager())


@pytest.fixture(scope="module")
def core(demo):
    return demo.core


@pytest.fixture(scope="module")
def tabs(demo):
    return demo.tabs


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from glip.data import make_sample

    s = make_sample("gold_det", 3, 0)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    s.image.save(path)
    return s, str(path)


def _ground(tab, path, prompt, thr=0.0, **kw):
    args = dict(mode="auto", phrases="", model_name=STUDENT, thr=thr, nms=0.6, max_boxes=100, size=0, precision="fp32",
                show="all boxes")
    args.update(kw)
    return tab.ground(path, prompt, args["mode"], args["phrases"], args["model_name"], args["thr"], args["nms"],
                      args["max_boxes"], args["size"], args["precision"], args["show"])


@pytest.fixture(scope="module")
def server(demo):
    d = app_pkg.queue(demo, concurrency=2, max_size=64)
    d.launch(prevent_thread_lock=True, share=False, **app_pkg.launch_kwargs())
    yield d
    d.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    c = Client(server.local_url, verbose=False)
    yield c
    c.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _post(url: str, body: bytes, ctype: str = "application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- drawing: colours that do not lie (library: glip.draw) -----------------------------------------------------
NOUNS = ["circle", "car", "dog", "star", "person", "cup", "flag", "helmet", "square", "bus"]
PHRASE = st.tuples(st.lists(st.sampled_from(sorted(COLOR_WORDS)), max_size=2), st.sampled_from(NOUNS)).map(
    lambda t: " ".join(t[0] + [t[1]]))


@settings(max_examples=300, deadline=None)
@given(st.lists(PHRASE, min_size=1, max_size=12))
def test_no_phrase_colour_contradicts_its_own_or_another_colour_word(phrases):
    styles = phrase_styles(phrases)
    named = [draw.named_families(p) for p in phrases]
    taken = {f for n in named for f in n}
    for p, fams, s in zip(phrases, named, styles):
        seen_as = color_family(s.color)
        if fams:  # drawn in (a shade of) the colour it names
            assert seen_as == fams[0], (p, s)
        elif len(taken) < len(FAMILIES):  # never in a colour another phrase of the prompt names
            assert seen_as not in taken, (phrases, p, s)
        assert contrast_ratio(hex_to_rgb(s.color), hex_to_rgb(s.text)) >= 4.5
    # distinct (colour, line style) per phrase, as long as the variants last
    per_family = {f: sum(1 for n in named if n and n[0] == f) for f in taken}
    if all(per_family[f] <= len(draw._variants(f)) for f in taken) and sum(not n for n in named) <= 3 * (len(FAMILIES) - len(taken)):
        assert len({(s.color, s.dash) for s in styles}) == len(phrases)


def test_every_colour_word_is_drawn_in_its_own_family():
    for word, fam in COLOR_WORDS.items():
        (s,) = phrase_styles([f"a {word} thing"])
        assert color_family(s.color) == fam, word
    assert phrase_styles(["blue square", "green triangle"])[0] != phrase_styles(["green triangle", "blue square"])[0]
    blue, green = phrase_styles(["blue square", "green triangle"])
    assert color_family(blue.color) == "blue" and color_family(green.color) == "green"


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
def test_label_text_is_readable_on_every_fill(rgb):
    fill = draw.rgb_to_hex(rgb)
    assert contrast_ratio(rgb, hex_to_rgb(draw.readable_text(fill))) >= 4.5


@settings(max_examples=200, deadline=None)
@given(st.floats(-50, 700), st.floats(-50, 500), st.floats(1, 400), st.floats(1, 400), st.integers(5, 200))
def test_labels_are_never_clipped_at_an_edge(x, y, w, h, tw):
    W, H = 640, 480
    x1, y1, x2, y2 = draw._place_label((x, y, x + w, y + h), tw, 14, W, H, 2, [])
    assert 0 <= x1 and x2 <= W and 0 <= y1 and y2 <= H


def test_drawn_labels_sit_inside_the_image_at_the_right_edge():
    im = Image.new("RGB", (200, 120), (255, 255, 255))
    st_ = phrase_styles(["red car"])
    out = draw.draw_boxes(im, [[170, 2, 199, 60]], ["red car 0.91 (a long label)"], st_)
    arr = np.asarray(out).astype(int)
    red = np.abs(arr - np.array(hex_to_rgb(st_[0].color))).sum(-1) < 60
    cols = np.where(red.any(0))[0]
    assert cols.min() < 120  # the label was moved left to fit, not cut off at x = 200


def test_token_bars_wrap_long_prompts():
    from glip.prompts import from_categories
    from glip.results import Token

    prompt = from_categories([f"thing{i}" for i in range(20)])
    tokens = [Token(i, f"t{i}", i, i + 1) for i in range(44)]
    fig = render.token_bars(tokens, np.linspace(0, 1, 44), ["#4363d8"] * 44, "title")
    assert len(fig.axes) == 2 and all(len(ax.get_xticks()) <= render.TOKENS_PER_ROW for ax in fig.axes)
    assert fig.get_size_inches()[1] > 4  # each row keeps its height instead of shrinking
    assert prompt.phrases


# --- the tabs' callbacks ------------------------------------------------------------------------------------------
def test_boxes_prompt_table_legend_and_bars_share_one_style_per_phrase(tabs, core, scene):
    s, path = scene
    g = tabs["ground"]
    prompt = " . ".join(dict.fromkeys(o.category for o in s.objs))
    v = _ground(g, path, prompt)
    model, res = core.predict(v.state)
    assert len(res) > 0
    styles = phrase_styles(res.prompt.phrases)
    labels = render.phrase_labels(res.prompt.phrases)
    cmap = v.prompt_out.color_map
    for j, lab in enumerate(labels):
        assert cmap[lab] == styles[j].color and styles[j].color in v.legend_out
    segs = [(d["token"], d["class_or_confidence"]) if isinstance(d, dict) else tuple(d) for d in v.prompt_out.value]
    assert "".join(t for t, _ in segs) == res.prompt.caption
    for t, lab in segs:
        if lab:
            assert t == res.prompt.phrases[labels.index(lab)]
    # the best box (drawn on top) is outlined in its phrase's colour, on the display copy of the image
    arr = np.asarray(v.image_out).astype(int)
    sx = v.image_out.width / res.image_size[0]
    x1, y1, x2, y2 = (float(b) * sx for b in res.boxes[0])
    want = np.array(hex_to_rgb(styles[int(res.phrase_ids[0])].color))
    near = arr[int((y1 + y2) / 2), max(0, int(x1) - 3): int(x1) + 4]
    assert np.abs(near - want).sum(-1).min() < 25
    html = v.table_out.to_html()
    for i in range(min(len(res), render.MAX_SHOWN_BOXES)):
        assert styles[int(res.phrase_ids[i])].color in html
    cols = render.token_colors(res.tokens, res.prompt)
    from glip.explain import phrase_tokens

    for j in range(len(labels)):
        assert {cols[i] for i in phrase_tokens(res.prompt, res.tokens, j)} == {styles[j].color}
    assert cols[0] == render.GRAY and v.bars_out is not None and len(v.heat_out) == 1 + 5
    assert re.search(r"box(es)? above", v.status_out) or "best box" in v.status_out


def test_prompt_lab_bars_take_each_prompts_phrase_colours(tabs, scene):
    from matplotlib.colors import to_hex

    from glip.draw import phrase_styles

    s, path = scene
    pa, pb = "heart . circle", "big yellow heart . round circle"
    v = tabs["lab"].compare(path, pa, pb, STUDENT, 0.0)
    ax = v.lab_plot.axes[0]
    bars_a, bars_b = ax.containers[0], ax.containers[1]
    from glip import parse_prompt

    want_a, want_b = ([st.color for st in phrase_styles(parse_prompt(p).phrases)] for p in (pa, pb))
    assert want_a[0] != want_b[0]  # "yellow" colours B's first phrase, A's is the palette's
    assert [to_hex(b.get_facecolor()[:3]) for b in bars_a] == want_a
    assert [to_hex(b.get_facecolor()[:3]) for b in bars_b] == want_b


def test_toasts_show_plain_text_not_markdown():
    from app.core import plain

    assert plain("GLIP-L could not be loaded: start with `python app.py --model PATH` — **toy-student** ran instead"
                 ) == "GLIP-L could not be loaded: start with python app.py --model PATH — toy-student ran instead"
    assert plain("*toy-student is a toy model*; 2 * 3") == "toy-student is a toy model; 2  3"
    tabs_dir = Path(app_pkg.__file__).parent / "tabs"
    assert not [f.name for f in tabs_dir.glob("*.py") if "gr.Warning(" in f.read_text()]  # every toast goes through warn


def test_heat_tiles_share_one_colour_scale(tabs, scene):
    s, path = scene
    g = tabs["ground"]
    prompt = " . ".join(dict.fromkeys(o.category for o in s.objs))
    v = _ground(g, path, prompt, thr=0.0)
    maxes = [float(re.search(r"max (\d\.\d\d)", cap).group(1)) for _, cap in v.heat_out]
    top = max(maxes)
    assert v.heat_out[0][1] == f"combined, max {maxes[0]:.2f}"  # one short line: captions overlay the tiles
    assert all(len(cap) <= 24 for _, cap in v.heat_out)
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    flat = np.asarray(render.heat_overlay(im, np.zeros((64, 64)), scale=(0, top)), dtype=float)
    faint = np.zeros((64, 64))
    faint[10:20, 10:20] = top / 100  # a level that scores 1% of the best: barely visible, not a hot spot
    shared = np.asarray(render.heat_overlay(im, faint, scale=(0, top)), dtype=float)
    alone = np.asarray(render.heat_overlay(im, faint), dtype=float)
    assert np.abs(shared - flat).max() < 6 < np.abs(alone - flat).max()


def test_a_run_without_boxes_clears_the_chart_and_the_status_counts_what_is_drawn(tabs, scene):
    s, path = scene
    g = tabs["ground"]
    prompt = " . ".join(dict.fromkeys(o.category for o in s.objs))
    assert _ground(g, path, prompt, thr=0.0).bars_out is not None
    none = _ground(g, path, prompt, thr=1.0)
    assert none.bars_out == gr.update(value=None)  # sent: the previous run's chart is cleared, not kept
    assert "showing 0 boxes" in none.status_out
    many = _ground(g, path, prompt, thr=0.0, nms=1.0, max_boxes=300)
    n = int(re.search(r"of the (\d+) boxes", many.status_out).group(1))
    assert n > render.MAX_SHOWN_BOXES and f"showing {render.MAX_SHOWN_BOXES} of the {n} boxes" in many.status_out
    one = _ground(g, path, prompt, thr=0.0, max_boxes=1)
    assert "showing 1 box above" in one.status_out


def test_a_prompt_of_several_chunks_reports_each_to_the_progress_bar(tabs, scene):
    """A prompt longer than one query (the app allows 2,000 characters) runs in chunks; the Ground tab's
    gr.Progress hears of each, a one-chunk prompt of none."""
    s, path = scene
    g = tabs["ground"]
    seen = []

    class Progress:  # what gradio passes in an event
        def __call__(self, value, desc=None, total=None, unit="steps"):
            seen.append((value, desc, unit))

    colours = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "grey"]
    shapes = ["circle", "square", "star", "triangle", "hexagon", "cross", "ring", "diamond"]
    long_prompt = " . ".join(f"{c} {sh} number {k}" for k in range(3) for c in colours for sh in shapes[:3])
    assert len(long_prompt) <= 2000
    args = ("auto", "", STUDENT, 0.3, 0.6, 100, 0, "fp32", "all boxes")
    view = g.ground(path, long_prompt, *args, progress=Progress())
    assert view.state is not None
    chunks = [v for v, desc, unit in seen]
    assert len(chunks) >= 2 and chunks == [(k, chunks[0][1]) for k in range(1, chunks[0][1] + 1)]
    assert {(desc, unit) for _, desc, unit in seen} == {("prompt chunks", "chunk")}
    seen.clear()
    g.ground(path, "red circle . star", *args, progress=Progress())
    assert seen == []


def test_a_novel_word_inside_a_phrase_keeps_the_phrase_colour_family():
    """Teacher vs student marks the words only the student learned; inside a phrase the word takes a darker
    shade of the phrase's colour and a label naming both, so the phrase still reads as one; outside any phrase
    it is the plain "novel word" yellow."""
    from glip.prompts import from_caption

    prompt = from_caption("clip art with a big turquoise star", phrases=["a big turquoise star"])
    segs, cmap = render.highlighted_prompt(prompt, ["turquoise", "clip"])
    phrase = render.phrase_labels(prompt.phrases)[0]
    by_label = {}
    for text, label in segs:
        by_label.setdefault(label, []).append(text)
    assert by_label[f"{phrase} · {render.NOVEL_LABEL}"] == ["turquoise"]
    assert by_label[phrase] == ["a big ", " star"]
    assert by_label[render.NOVEL_LABEL] == ["clip"] and cmap[render.NOVEL_LABEL] == render.NOVEL_COLOR
    base, dark = (np.array([int(c[k:k + 2], 16) for k in (1, 3, 5)]) for c in
                  (cmap[phrase], cmap[f"{phrase} · {render.NOVEL_LABEL}"]))
    assert (dark < base).all() and np.allclose(dark / base, dark[0] / base[0], atol=0.02)  # same hue, darker
    assert "".join(t for t, _ in segs) == prompt.caption


def test_crowded_prompts_show_the_best_box_per_phrase_by_default(tabs, core, scene):
    s, path = scene
    g = tabs["ground"]
    prompt = " . ".join(dict.fromkeys(o.category for o in s.objs))
    auto = _ground(g, path, prompt, thr=0.0, show="auto")
    every = _ground(g, path, prompt, thr=0.0, show="all boxes")
    _, full = core.predict(every.state)
    assert len(full) > 12
    _, shown = core.predict(auto.state)
    assert auto.state.best_only and len(shown) == len(set(full.phrase_ids.tolist())) < len(full)
    assert "all boxes" in auto.status_out
    assert not every.state.best_only


def test_downloads_png_and_coco_json_validate(tabs, core, scene):
    s, path = scene
    png, js = _ground(tabs["ground"], path, "red circle . blue square . star").files_out
    assert Image.open(png).size == core.display(path).size  # drawn at display size; the JSON is in image pixels
    data = json.loads(Path(js).read_text())
    assert {"images", "annotations", "categories", "caption", "detections"} <= set(data)
    assert [c["name"] for c in data["categories"]] == ["red circle", "blue square", "star"]
    W, H = s.image.size
    assert data["images"][0]["width"] == W and data["images"][0]["height"] == H
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert w >= 0 and h >= 0 and 0 <= a["score"] <= 1 and -1 <= x and x + w <= W + 1 and -1 <= y and y + h <= H + 1
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {k: data[k] for k in ("images", "annotations", "categories")}
    coco.createIndex()
    assert len(coco.getAnnIds()) == len(data["detections"]) == len(data["annotations"])


def test_rethreshold_and_nms_rerender_from_the_cache(tabs, core, scene):
    s, path = scene
    g = tabs["ground"]
    req = _ground(g, path, "yellow star . red circle . orange square").state
    model = core.manager.get(STUDENT)
    before = dict(model.predictor.stats)
    for thr, nms, mx in ((0.0, 0.3, 5), (0.02, 0.9, 50), (0.5, 0.6, 100)):
        v = g.rethreshold(req, thr, nms, mx, "all boxes")
        assert v.state.threshold == thr and v.state.nms_iou == nms
    assert model.predictor.stats == before, "re-thresholding must not run the network"
    g.on_token_pick(req, g.token_choices(core.predict(req)[1])[-1])
    assert model.predictor.stats == before


def test_every_view_renders(tabs, core, scene):
    s, path = scene
    g, f, ts, lab = tabs["ground"], tabs["fusion"], tabs["teacher"], tabs["lab"]
    req = _ground(g, path, "a red circle and a yellow star", phrases="red circle; yellow star").state
    assert core.predict(req)[1].prompt.phrases == ["red circle", "yellow star"]

    class Sel:
        index, value = [0, 1], "x"

    v = g.on_row_select(req, Sel())
    assert v.bars_out is not None and v.image_out.size == core.display(path).size
    # deep fusion
    setup = f.setup(req)
    assert "fusion layers" in setup.fusion_info
    val = lambda c: c[0] if isinstance(c, (tuple, list)) else c  # noqa: E731 (choices come back as (label, value))
    for lc, hc, how in ((setup.layer_pick.choices[0], setup.head_pick.choices[1], "each level normalised"),
                        (setup.layer_pick.choices[-1], setup.head_pick.choices[0], "attention mass per pixel")):
        t = f.text_to_image(req, val(setup.tok_pick.choices[-1]), val(lc), val(hc), how)
        assert len(t.t2i_out) == 6 and t.strip_out.width > t.strip_out.height and t.sharp_out is not None
        assert all(len(cap) <= 24 for _, cap in t.t2i_out)  # captions overlay the tiles: one short line each
        assert val(lc) in t.t2i_note  # what the dropdowns picked is said above the tiles instead
    v = f.image_to_text(req, setup.box_pick.value, "mean of heads", "rollout over layers")
    assert v.click_img.size == core.display(path).size
    v = f.image_to_text(req, None, "head 1", "layer 1", point=(10.0, 20.0))
    a = f.ablation(req)
    assert list(a.abl_df.columns) == ["phrase", "fusion on", "fusion off", "Δ (on − off)"] and len(a.abl_df) == 2
    # teacher vs student: a web sample of the toy preset, with its hidden truth
    p = ts.pick_sample(0, 2)
    c = ts.compare(p.ts_image, p.ts_caption, p.sample, TEACHER, STUDENT, 0.0, 0.0, 0.5)
    assert c.gt_out is not None and "Hidden truth" in c.ts_summary and "truth" in c.ts_df.columns
    assert c.ts_df["teacher"].max() <= 1 and c.ts_df["student"].max() <= 1  # best box per phrase (the default)
    from glip.label import LabelSettings, label_pair  # the teacher's boxes are the labelling command's

    labels = label_pair(core.resolve(TEACHER, fallback=TEACHER).model, p.ts_image, p.ts_caption,
                        LabelSettings(threshold=0.0, max_per_phrase=1, score_words=core.vocabulary(TEACHER)))
    assert c.ts_df["teacher"].sum() == len(labels) > 0
    assert "new word" in c.ts_df.columns  # the student's vocabulary holds words the teacher's does not
    assert list(c.diff_df.columns) == ["phrase", "teacher best", "student best", "Δ (S − T)"]
    every = ts.compare(p.ts_image, p.ts_caption, p.sample, TEACHER, STUDENT, 0.0, 0.0, 0.5, False)
    assert (every.ts_df["student"] >= c.ts_df["student"]).all() and every.ts_df["student"].max() > 1
    # an edited caption has no truth; the pickers take any two models (here the student labels for itself)
    c = ts.compare(p.ts_image, "a turquoise star", p.sample, STUDENT, STUDENT, 0.0, 0.0, 0.5)
    assert c.gt_out is None and "No ground truth" in c.ts_summary and "Teacher **toy-student**" in c.ts_summary
    # the released pair's preset picks both models; offline they cannot load and the toy pair runs, saying so
    pre = ts.on_preset("GLIP-T (C) → GLIP-T (the paper's released pair)")
    assert (pre.teacher_in, pre.student_in) == ("GLIP-T (C)", "GLIP-T")
    with pytest.warns(UserWarning, match="— toy-teacher ran instead"):
        c = ts.compare(p.ts_image, p.ts_caption, p.sample, "GLIP-T (C)", "GLIP-T", 0.5, 0.3, 0.5)
    assert "Teacher **toy-teacher**" in c.ts_summary and "GLIP-T (C) could not be loaded" in c.ts_summary
    # prompt lab
    v = lab.compare(path, "circle . star", "red round circle . yellow star", STUDENT, 0.0)
    assert len(v.lab_df) == 2 and "Δ (B − A)" in v.lab_df.columns and "`toy-student` ran" in v.lab_note
    assert isinstance(ts.metrics().metrics_note, str)


def test_a_photo_with_a_toy_model_gets_the_framing_note(tabs, core, scene, tmp_path):
    s, path = scene
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(photo)
    v = _ground(tabs["ground"], str(photo), "a cat")
    assert "toy model trained on a synthetic world, not on photos" in v.note_out and "python app.py --model" in v.note_out
    ex_path, ex_prompt = core.examples[0]
    quiet = _ground(tabs["ground"], ex_path, ex_prompt)  # one of the app's own synthetic scenes: one quiet line
    assert "not on photos" not in quiet.note_out and "toy model" in quiet.note_out
    assert core.framing("GLIP-T") == ""
    pick = tabs["ground"].on_model_pick("GLIP-L", None)
    assert "GLIP-L" in pick.note_out and "FourODs" in pick.note_out


def test_a_real_glip_gets_a_smaller_input_on_a_cpu(core):
    from glip import get_preset

    class GLIPT:
        config = get_preset("glip-t")

    class Toy:
        config = get_preset("toy")

    if core.cuda:
        pytest.skip("the cap is for CPUs")
    assert core.input_size(GLIPT, None) == (core.cpu_size, core.cpu_size * 1333 // 800)
    assert core.input_size(GLIPT, 800) == (800, 1333)  # the user's choice wins
    assert core.input_size(Toy, None) == (None, None)  # the toy's 256 px is under the cap


def test_metrics_plot_handles_absence_and_bad_files(tmp_path):
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is None and "No measured metrics" in note
    (tmp_path / "metrics.json").write_text("{not json")
    assert render.metrics_plot(tmp_path / "metrics.json")[0] is None
    (tmp_path / "metrics.json").write_text(json.dumps({"teacher": {"known": {"AP50": 0.8}}}))
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is None and "Could not read" in note
    m = {split: {k: 0.5 for k in ("AP50", "R@1", "R@5")} for split in ("test_det", "test_ground", "test_novel")}
    (tmp_path / "metrics.json").write_text(json.dumps({"eval": {"seed": 3, "n": 10}, "teacher": {"metrics": m},
                                                       "student": {"metrics": m}}))
    fig, note = render.metrics_plot(tmp_path / "metrics.json")
    assert fig is not None and "seed 3" in note
    heights = sorted(round(p.get_height(), 2) for p in fig.axes[0].patches if hasattr(p, "get_height"))
    assert heights.count(0.5) == 10


def test_user_errors_are_clear_messages(tabs, scene, tmp_path):
    s, path = scene
    from app.core import friendly

    g = friendly(tabs["ground"].ground)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    cases = [((None, "circle"), "Add an image"), ((path, "   "), "prompt is empty"),
             ((str(tmp_path / "missing.png"), "circle"), "corrupt|not found|No such"), ((str(bad), "circle"), "corrupt")]
    for (img, prompt), msg in cases:
        with pytest.raises(gr.Error, match=msg):
            g(img, prompt, "auto", "", STUDENT, 0.3, 0.6, 100, 0, "fp32", "auto")
    with pytest.raises(gr.Error, match="not in the caption"):
        g(path, "a red circle", "caption", "blue star", STUDENT, 0.3, 0.6, 100, 0, "fp32", "auto")
    with pytest.raises(gr.Error, match="threshold"):
        g(path, "circle", "auto", "", STUDENT, 1.5, 0.6, 100, 0, "fp32", "auto")
    # prompt limits of the app (the library has none)
    many = " . ".join(f"thing{i}" for i in range(MAX_PHRASES + 1))
    with pytest.raises(gr.Error, match=f"{MAX_PHRASES + 1} phrases; this app grounds at most {MAX_PHRASES}"):
        g(path, many, "auto", "", STUDENT, 0.3, 0.6, 100, 0, "fp32", "auto")
    with pytest.raises(gr.Error, match=f"at most {MAX_PROMPT_CHARS:,}"):
        g(path, "a" * (MAX_PROMPT_CHARS + 1), "auto", "", STUDENT, 0.3, 0.6, 100, 0, "fp32", "auto")
    ok = " . ".join(f"thing{i}" for i in range(MAX_PHRASES))
    assert g(path, ok, "auto", "", STUDENT, 0.3, 0.6, 10, 0, "fp32", "auto").state is not None
    # a model that cannot load: the toy student runs, and the UI says so
    with pytest.warns(UserWarning, match="GLIP-T could not be loaded.*python app.py --model PATH.*— toy-student ran"):
        v = g(path, "circle", "auto", "", "GLIP-T", 0.3, 0.6, 100, 0, "fp32", "auto")
    assert v.state.ran == STUDENT and v.state.model == "GLIP-T" and "you picked `GLIP-T`" in v.status_out


# --- the model manager and the (fake) hub ---------------------------------------------------------------------------
def _manager(tmp_path, **kw):
    return ModelManager(cache=tmp_path / "cache", releases=(small_release(),), **kw)


def test_a_released_model_downloads_with_progress_serves_and_reloads_from_the_cache(fake_hub, tmp_path, checkpoint_bytes,
                                                                                     scene):
    s, path = scene
    rel = small_release()
    fake_hub.add(rel.repo, rel.filename, checkpoint_bytes)
    fake_hub.rate[f"{rel.repo}/{rel.filename}"] = 4e6  # ~2 s: progress is visible
    mm = _manager(tmp_path)
    assert "GLIP-T" in mm.choices() and "CC3M" in mm.menu["GLIP-T"].about and mm.default() == STUDENT
    with pytest.raises(ModelNotReady, match="GLIP-T is (downloading|loading)"):
        mm.get("GLIP-T")  # never waited for inside a request
    seen = set()
    while mm.status("GLIP-T").busy:
        st = mm.status("GLIP-T")
        if st.state == "downloading" and st.progress:
            seen.add(str(st.progress))
        time.sleep(0.05)
    assert mm.status("GLIP-T").state == "ready", mm.describe("GLIP-T")
    assert any("MB" in x and "/s" in x and "%" in x for x in seen), seen
    model = mm.get("GLIP-T")
    assert model.config.swin_embed_dim == 16
    res = model.predict(path, "red circle . star", threshold=0.0)
    assert len(res) > 0
    # a restart: a new manager over the same cache loads it with no request, and defaults to it
    n = fake_hub.count(rel.filename)
    fake_hub.close()
    mm2 = _manager(tmp_path)
    assert mm2.on_disk("GLIP-T") and mm2.default() == "GLIP-T"
    assert mm2.get("GLIP-T").config.swin_embed_dim == 16 and fake_hub.count(rel.filename) == n


@pytest.mark.parametrize("failure", ["404", "dropped", "full disk"])
def test_download_failures_are_clear_remembered_and_the_app_keeps_serving(fake_hub, tmp_path, checkpoint_bytes,
                                                                          monkeypatch, scene, failure):
    s, path = scene
    rel = small_release()
    key = f"{rel.repo}/{rel.filename}"
    if failure != "404":
        fake_hub.add(rel.repo, rel.filename, checkpoint_bytes)
    if failure == "dropped":
        fake_hub.drop_after[key] = len(checkpoint_bytes) // 2
    if failure == "full disk":
        from glip import hub

        real = hub.shutil.disk_usage
        monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: type(real(p))(real(p).total, real(p).total, 1000))
    mm = _manager(tmp_path, failure_ttl=600)
    want = {"404": "HTTP 404", "dropped": "interrupted at .*try again to resume",
            "full disk": "Not enough free disk space"}[failure]
    mm.start("GLIP-T")
    while mm.status("GLIP-T").busy:
        time.sleep(0.05)
    st = mm.status("GLIP-T")
    assert st.state == "failed" and st.message.startswith("GLIP-T could not be loaded") and LOCAL_HINT in st.message
    import re

    assert re.search(want, st.message), st.message
    n = len(fake_hub.requests)
    with pytest.raises(CheckpointError, match=want):
        mm.get("GLIP-T")
    r = mm.resolve("GLIP-T")  # the same message, and the toy student runs instead
    assert r.name == STUDENT and re.search(want, r.note) and "toy-student** ran instead" in r.note
    assert len(fake_hub.requests) == n, "a failure is remembered, not retried on every pick"
    assert len(r.model.predict(path, "red circle", threshold=0.0)) > 0
    if failure == "dropped":  # after the remembered period, a new pick resumes the partial download
        mm.failure_ttl = 0
        mm.start("GLIP-T")
        while mm.status("GLIP-T").busy:
            time.sleep(0.05)
        assert mm.status("GLIP-T").state == "ready" and fake_hub.requests[-1][1].startswith("bytes=")


def test_a_slow_download_does_not_delay_another_users_toy_prediction(fake_hub, tmp_path, checkpoint_bytes, scene):
    """User A picks GLIP-T (a download held open by the server); user B's toy predictions run meanwhile."""
    s, path = scene
    rel = small_release()
    key = f"{rel.repo}/{rel.filename}"
    fake_hub.add(rel.repo, rel.filename, checkpoint_bytes)
    fake_hub.gate[key], fake_hub.started[key] = threading.Event(), threading.Event()
    mm = _manager(tmp_path)
    toy = mm.get(STUDENT)

    def toy_latency(k: int) -> float:
        t0 = time.perf_counter()
        toy.predict(path, f"red circle . thing{k}", threshold=0.0)
        return time.perf_counter() - t0

    before = sorted(toy_latency(k) for k in range(3))
    with pytest.raises(ModelNotReady):
        mm.resolve("GLIP-T", fallback="GLIP-T")  # user A: told it is downloading, not made to wait
    assert fake_hub.started[key].wait(30)
    during = []
    for k in range(3):  # user B, while A's download hangs
        r = mm.resolve(STUDENT)
        t0 = time.perf_counter()
        r.model.predict(path, f"blue star . other{k}", threshold=0.0)
        during.append(time.perf_counter() - t0)
        assert mm.status("GLIP-T").state == "downloading", "B's request finished while the download was in progress"
    print(f"toy predict: {1000 * before[1]:.0f} ms median before, {1000 * sorted(during)[1]:.0f} ms median during "
          f"a held download")
    fake_hub.gate[key].set()
    while mm.status("GLIP-T").busy:
        time.sleep(0.05)
    assert mm.status("GLIP-T").state == "ready"


def test_a_local_checkpoint_is_offered_first_and_loads(tmp_path):
    random_toy(seed=3).save_pretrained(tmp_path / "mine")
    mm = ModelManager(local=str(tmp_path / "mine"), cache=tmp_path / "cache")
    assert mm.choices()[0] == mm.default() == "local: mine"
    assert mm.get("local: mine").config.name == "toy"
    with pytest.raises(CheckpointError, match="Unknown model"):
        mm.get("../../etc/passwd")


# --- limits -----------------------------------------------------------------------------------------------------------
def test_pixel_budget_bounds_what_is_in_flight():
    b = PixelBudget(total=100, wait_s=5)
    order = []

    def hold(name, px, secs):
        with b.hold(px):
            order.append(f"{name}+")
            time.sleep(secs)
            order.append(f"{name}-")

    t1 = threading.Thread(target=hold, args=("a", 70, 0.3))
    t1.start()
    time.sleep(0.05)
    t2 = threading.Thread(target=hold, args=("b", 60, 0.0))
    t2.start()
    t1.join()
    t2.join()
    assert order == ["a+", "a-", "b+", "b-"] and b.peak <= 100 and b.used == 0


def test_scratch_folders_are_removed_on_exit_and_stale_ones_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}_abc"
    live = tmp_path / f"{PREFIX}{os.getppid()}_def"   # a running process's folder stays
    old = tmp_path / f"{PREFIX}legacy"
    for d in (stale, live, old):
        d.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    sc = Scratch(root=tmp_path)
    assert not stale.exists() and not old.exists() and live.exists() and sc.root.exists()
    assert sc.root.name.startswith(f"{PREFIX}{os.getpid()}_")
    (sc.new_dir() / "x.png").write_bytes(b"x")
    sc.close()
    assert not sc.root.exists()
    assert clean_stale(tmp_path) == []


# --- the public API and the service's routes, in-process server -------------------------------------------------
def test_ground_json_api(client, scene, core):
    from gradio_client import handle_file

    s, path = scene
    cats = list(dict.fromkeys(o.category for o in s.objs))
    prompt = ". ".join(cats)  # re-laid out by the model ("a . b . "): the spans index the caption it read
    out = client.predict(handle_file(path), prompt, STUDENT, 0.0, api_name="/ground_json")
    assert out["model"] == STUDENT and out["image_size"] == list(s.image.size)
    assert out["caption"] == " . ".join(cats) + " . "
    dets = out["detections"]
    assert dets
    for d in dets:
        assert set(d) == {"box", "score", "phrase", "span"}
        x1, y1, x2, y2 = d["box"]
        assert x1 <= x2 and y1 <= y2 and 0.0 <= d["score"] <= 1.0
        assert d["phrase"] in cats and out["caption"][d["span"][0]:d["span"][1]] == d["phrase"]
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/ground_json"]
    if not core.manager.is_fallback(STUDENT):  # the trained student must find the named objects
        from glip.explain import _iou

        found = 0
        for o in s.objs:
            hits = [d for d in dets if d["phrase"] == o.category and d["score"] > 0.3]
            found += any(_iou(np.array([d["box"]]), np.array([o.box]))[0, 0] >= 0.5 for d in hits)
        assert found >= max(1, len(s.objs) // 2), (found, len(s.objs))


def test_api_bad_input_is_answered_and_the_app_keeps_serving(client, scene, tmp_path):
    from gradio_client import handle_file

    s, path = scene
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    big = tmp_path / "big.png"
    Image.new("L", (13000, 13000), 7).save(big)  # a tiny file whose header says 169 Mpx
    for args, msg in (((handle_file(path), "", STUDENT, 0.3), "empty"),
                      ((handle_file(path), "circle", STUDENT, 1.5), "threshold"),
                      ((handle_file(str(bad)), "circle", STUDENT, 0.3), "corrupt"),
                      ((handle_file(str(big)), "circle", STUDENT, 0.3), "too large .*13000×13000"),
                      ((handle_file(path), "circle", "GLIP-L", 0.3), "GLIP-L could not be loaded"),
                      ((handle_file(path), " . ".join(f"x{i}" for i in range(MAX_PHRASES + 1)), STUDENT, 0.3), "phrases")):
        with pytest.raises(Exception, match=msg) as e:
            client.predict(*args, api_name="/ground_json")
        assert "Traceback" not in str(e.value)
    assert isinstance(client.predict(handle_file(path), "circle", STUDENT, 0.3, api_name="/ground_json"), dict)


def test_every_event_runs_through_the_queue_and_examples_fill_their_inputs(demo, tabs, core):
    """The guard refuses direct calls, so an event built with queue=False (gr.Examples' loader is one) would do
    nothing in the browser."""
    direct = [fn.name for fn in demo.fns.values() if fn.queue is False]
    assert direct == []
    for tab, inputs, want in ((tabs["ground"], ("image_in", "prompt_in"), tuple(core.examples[1])),
                              (tabs["lab"], ("lab_image",), core.examples[1][0])):
        table = tab.c["examples"]
        [fn] = [fn for fn in demo.fns.values() if fn.inputs == [table]]
        assert fn.outputs == [tab.c[k] for k in inputs] and fn.queue is not False
        assert fn.fn(1) == want


def test_an_upload_is_checked_as_it_arrives(demo, tabs, tmp_path):
    from gradio.data_classes import FileData

    for comp in (tabs["ground"].c["image_in"], tabs["teacher"].c["ts_image"], tabs["lab"].c["lab_image"]):
        [fn] = [fn for fn in demo.fns.values() if fn.inputs == [comp] and fn.outputs == []
                and any(t[1] == "upload" for t in fn.targets)]
        assert fn.queue is not False
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(gr.Error, match="corrupt or not an image"):  # what that event's input preprocessing runs
        tabs["ground"].c["image_in"].preprocess(FileData(path=str(bad)))


def test_no_event_writes_an_input_it_reads(demo):
    """An event that fails marks its outputs with an error badge that blocks clicks: inputs must not be among them
    (gr.State carries a run's request from one event to the next and is no input a user touches)."""
    for fn in demo.fns.values():
        both = [c for c in fn.inputs if c in fn.outputs and not isinstance(c, gr.State)]
        assert both == [], (fn.name, [getattr(c, "label", c) for c in both])


def test_the_pair_note_follows_a_release_that_fails_to_load(tabs, demo):
    ts = tabs["teacher"]
    mm = ts.core.manager
    teacher, student = ("GLIP-T (C)", "GLIP-T")
    if teacher not in mm.menu:
        pytest.skip("no released models in this menu")
    view = ts.on_preset(next(k for k, v in app_pkg.tabs.teacher_student.PRESETS.items() if v == (teacher, student)))
    assert (view.teacher_in, view.student_in) == (teacher, student)
    deadline = time.time() + 30
    while time.time() < deadline and any(mm.status(n).busy for n in (teacher, student)):
        time.sleep(0.1)
    note = ts.pair_note(teacher, student)
    assert "is loading" not in note and note.count("could not be loaded") == 2, note
    assert ts.pair_note("toy-teacher", "toy-student") == ""  # idle models that load on first use: no note
    # the page's timer refreshes that note while a model is busy
    [tick] = [fn for fn in demo.fns.values() if ts.c["preset_note"] in fn.outputs and ts.c["teacher_in"] in fn.inputs
              and ts.c["student_in"] in fn.inputs and len(fn.outputs) > 1]
    assert tick.fn(teacher, student)[2] == note


def test_queue_bypass_and_private_callbacks_are_refused(server):
    base = server.local_url.rstrip("/")
    body = json.dumps({"data": [None, "circle", STUDENT, 0.3]}).encode()
    for route in ("/gradio_api/run/ground_json", "/gradio_api/api/ground_json", "/gradio_api/run/predict",
                  "/gradio_api/call/ground", "/gradio_api/call/compare", "/gradio_api/call/ablation",
                  "/gradio_api/call/v2/setup", "/gradio_api/call/load_example"):
        code, text = _post(base + route, body)
        assert code == 404, (route, code, text[:200])
    code, text = _post(base + "/gradio_api/run/ground_json", json.dumps({"data": [], "fn_index": 0}).encode())
    assert code == 404 and b"queue" in text
    info = json.load(urllib.request.urlopen(base + "/gradio_api/info?all_endpoints=true"))
    assert list(info["named_endpoints"]) == ["/ground_json"] and not info["unnamed_endpoints"]
    code, text = _post(base + "/gradio_api/call/ground_json", body)  # the public one is queued (an event id)
    assert code == 200 and "event_id" in json.loads(text)


def test_the_upload_cap_applies_to_data_urls_and_headers_are_checked_before_decoding(server, core, tmp_path):
    base = server.local_url.rstrip("/")

    def call(n_bytes: int):
        data = base64.b64encode(b"\x89PNG" + b"\0" * n_bytes).decode()
        payload = {"data": [{"url": f"data:image/png;base64,{data}", "meta": {"_type": "gradio.FileData"}}, "circle",
                            STUDENT, 0.3]}
        return _post(base + "/gradio_api/call/ground_json", json.dumps(payload).encode())

    code, text = call(int(25.8 * 2**20))  # refused before the body is read
    assert code == 413 and b"upload" in text
    code, text = call(MAX_UPLOAD_BYTES + 1000)  # under the transport cap: queued, then refused before decoding
    assert code == 200
    with urllib.request.urlopen(f"{base}/gradio_api/call/ground_json/{json.loads(text)['event_id']}", timeout=60) as r:
        stream = r.read().decode()
    assert "event: error" in stream and "upload limit" in stream, stream[:300]
    from app.limits import decode_data_url
    from glip.errors import ImageError

    with pytest.raises(ImageError, match="upload limit"):
        decode_data_url("data:image/png;base64," + "A" * (MAX_UPLOAD_BYTES * 4 // 3 + 400), tmp_path)
    buf = io.BytesIO()
    Image.new("L", (13000, 13000), 7).save(buf, format="PNG")
    with pytest.raises(ImageError, match="too large"):
        decode_data_url("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), tmp_path)
    # the image component's preprocessing reads only the header of a huge file
    from gradio.data_classes import FileData

    path = tmp_path / "huge.png"
    path.write_bytes(buf.getvalue())
    comp = server.tabs["ground"].c["image_in"]
    before, t0 = _rss_mb(), time.perf_counter()
    with pytest.raises(gr.Error, match="too large"):
        comp.preprocess(FileData(path=str(path)))
    print(f"13000×13000 PNG ({path.stat().st_size / 1e3:.0f} KB) refused in {1000 * (time.perf_counter() - t0):.0f} ms, "
          f"RSS +{_rss_mb() - before:.0f} MB")
    assert _rss_mb() - before < 100
    ok = tmp_path / "ok.png"
    Image.new("P", (64, 48)).save(ok)
    assert comp.preprocess(FileData(path=str(ok))) == str(ok)  # handed over as a path, undecoded


def test_concurrent_clients(server, scene):
    """6 clients × 3 requests, all answered; memory after stays within a bound of before."""
    from gradio_client import Client, handle_file

    s, path = scene
    prompts = ["circle", "red circle . star", "a blue square", "yellow star . green heart", "triangle"]
    warm = Client(server.local_url, verbose=False)
    for p in prompts:
        warm.predict(handle_file(path), p, STUDENT, 0.2, api_name="/ground_json")
    before = _rss_mb()
    answers, errors = [], []

    def user(k):
        try:
            c = Client(server.local_url, verbose=False)
            for r in range(3):
                out = c.predict(handle_file(path), prompts[(k + r) % len(prompts)], STUDENT, 0.2, api_name="/ground_json")
                answers.append(isinstance(out, dict))
            c.close()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = _rss_mb()
    print(f"18 requests from 6 clients in {time.perf_counter() - t0:.1f} s; RSS {before:.0f} → {after:.0f} MB")
    assert not errors, errors[:3]
    assert len(answers) == 18 and all(answers)
    assert after - before < 400


# --- the app as a process: startup, scratch cleanup, memory under concurrent large images --------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(port, tmp_path, env_extra=None):
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TMPDIR=str(tmp_path), GLIP_CACHE=str(tmp_path / "cache"), **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "GLIP Explorer ready" in line:
            return proc, time.perf_counter() - t0
    raise AssertionError("app.py exited without becoming ready")


def _vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def test_startup_and_the_scratch_folder_is_removed_on_sigterm(tmp_path):
    stale = tmp_path / f"{PREFIX}999999999_old"   # no such pid
    stale.mkdir()
    port = _free_port()
    proc, ready = _start_app(port, tmp_path)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200
        mine = list(tmp_path.glob(f"{PREFIX}{proc.pid}_*"))
        assert len(mine) == 1 and not stale.exists()
        print(f"python app.py ready in {ready:.1f} s (wall, incl. interpreter start)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not mine[0].exists(), "the scratch folder outlived a normal shutdown"


def test_concurrent_near_limit_images_stay_under_a_memory_bound(tmp_path):
    """4 simultaneous 7900×7900 images (62 Mpx each, tiny PNGs) through the queue: the server's peak RSS stays
    under its idle RSS + 1 GB (the pixel budget lets one such image decode at a time, and its memory is handed
    back before the next; one decode alone peaks at about +0.7 GB)."""
    from gradio_client import Client, handle_file

    big = tmp_path / "near_limit.png"
    Image.new("RGB", (7900, 7900), (90, 120, 150)).save(big)
    port = _free_port()
    proc, _ = _start_app(port, tmp_path)
    try:
        Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(str(REPO / "tests/fixtures/glip-official-tiny/image.png")),
                                                                   "circle", STUDENT, 0.5, api_name="/ground_json")
        idle = _vm(proc.pid, "VmRSS")
        out, errors = [], []

        def user():
            try:
                c = Client(f"http://127.0.0.1:{port}/", verbose=False)
                out.append(c.predict(handle_file(str(big)), "square", STUDENT, 0.5, api_name="/ground_json"))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=user) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        peak = _vm(proc.pid, "VmHWM")
        print(f"4 concurrent 7900×7900 images: idle RSS {idle:.0f} MB, peak {peak:.0f} MB (+{peak - idle:.0f} MB)")
        assert not errors, errors
        assert len(out) == 4 and all(o["image_size"][0] in (7900, 4096) for o in out)
        assert peak - idle < 1024
    finally:
        proc.terminate()
        proc.wait(timeout=30)
