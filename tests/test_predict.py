"""predict(): inputs of every kind, caches that really skip work, batches, long prompts, exports, CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from glip.image import ImageError, load_image, resized_hw
from glip.predictor import Predictor
from glip.prompts import PromptError, from_categories

PROMPT = "red circle . blue square . person . yellow hexagon"


@pytest.fixture()
def pred(tiny_model):
    return Predictor(tiny_model)  # fresh caches per test


@pytest.fixture(scope="module")
def scene(tiny_fixture):
    return Image.open(tiny_fixture / "image.png").convert("RGB")


# --- images -------------------------------------------------------------------------------------------------
def test_image_kinds_give_the_same_pixels(scene, tmp_path):
    arr = np.asarray(scene)
    path = tmp_path / "s.png"
    scene.save(path)
    for src in (scene, arr, str(path), path, path.read_bytes()):
        assert np.array_equal(np.asarray(load_image(src)), arr)


def test_grayscale_rgba_16bit_float_and_exif(tmp_path):
    g = load_image(np.full((10, 12), 77, np.uint8))
    assert g.mode == "RGB" and g.getpixel((0, 0)) == (77, 77, 77)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent → white background
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    rgba[..., 3] = 255
    assert load_image(rgba).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(np.full((3, 3, 3), 65535, np.uint16)).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(np.full((3, 3), 0.5, np.float32)).getpixel((1, 1)) == (128, 128, 128)
    im16 = Image.fromarray(np.full((5, 6), 40000, np.uint16))
    assert load_image(im16).getpixel((0, 0))[0] == round(40000 / 257)
    # EXIF orientation 6 (rotate 90° CW): a 20x10 file is shown 10x20
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (10, 20)


def test_bad_images_raise_clear_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="corrupt or not an image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="Unsupported array shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="Unsupported image type"):
        load_image(123)
    big = Image.new("L", (9000, 8000))
    with pytest.raises(ImageError, match="too large"):
        load_image(big)


def test_huge_images_are_downscaled():
    im = load_image(Image.new("RGB", (6000, 1000), (1, 2, 3)))
    assert max(im.size) == 4096


@pytest.mark.parametrize("h,w,mn,mx,exp", [(480, 640, 800, 1333, (800, 1066)), (300, 1000, 800, 1333, (400, 1333)),
                                          (800, 1200, 800, 1333, (800, 1200)), (1000, 500, 800, 1333, (1332, 666))])  # round(666.5)=666, int(1332.0)
def test_official_resize_rule(h, w, mn, mx, exp):
    assert resized_hw(h, w, mn, mx) == exp


# --- predict ---------------------------------------------------------------------------------------------------
def test_predict_result_and_exports(pred, scene):
    res = pred.predict(scene, PROMPT, threshold=0.4)
    assert len(res) > 0 and (np.diff(res.scores) <= 0).all() and (res.scores > 0.4).all()
    W, H = scene.size
    assert (res.boxes[:, [0, 2]] >= 0).all() and (res.boxes[:, [0, 2]] <= W).all() and (res.boxes[:, [1, 3]] <= H).all()
    assert res.prompt.caption == "red circle . blue square . person . yellow hexagon . "
    assert set(res.phrases) <= set(res.prompt.phrases)
    det = res.to_supervision()
    assert len(det) == len(res) and list(det.data["class_name"]) == res.phrases
    js = res.to_json()
    assert json.loads(json.dumps(js)) == js
    for d in js:
        b, e = d["span"]
        assert res.prompt.caption[b:e] == d["phrase"] and set(d) == {"box", "score", "phrase", "span"}
    coco = res.to_coco()
    assert len(coco["annotations"]) == len(res) and coco["images"][0]["width"] == W
    # token scores: one row per box, phrase tokens of the box's own phrase are scored
    assert res.token_scores.shape == (len(res), len(res.tokens))
    assert res.tokens[0].text == "[CLS]" and res.tokens[-1].text == "[SEP]"


def test_rethreshold_and_one_sided_changes_skip_the_network(pred, scene):
    pred.predict(scene, PROMPT, threshold=0.5)
    assert pred.stats == {"image_runs": 1, "text_runs": 1, "head_runs": 1}
    low = pred.predict(scene, PROMPT, threshold=0.3, nms_iou=0.5, max_dets=20)
    assert pred.stats == {"image_runs": 1, "text_runs": 1, "head_runs": 1}  # post-processing only
    assert len(low) <= 20
    pred.predict(scene, "a person next to a red circle")  # new prompt: image features reused
    assert pred.stats["image_runs"] == 1 and pred.stats["text_runs"] == 2
    pred.predict(np.asarray(scene)[::-1].copy(), PROMPT)  # new image: text features reused
    assert pred.stats["image_runs"] == 2 and pred.stats["text_runs"] == 2


def test_fusion_ablation_changes_the_prediction(pred, scene):
    on = pred.predict(scene, PROMPT, threshold=0.0, max_dets=10)
    off = pred.predict(scene, PROMPT, threshold=0.0, max_dets=10, fusion=False)
    again = pred.predict(scene, PROMPT, threshold=0.0, max_dets=10)
    assert not np.allclose(on.scores, off.scores)
    assert np.array_equal(on.scores, again.scores)  # the switch is restored
    assert all(f.enabled for f in pred.model.rpn.head.fusion_layers)


def test_batch_is_one_padded_forward(pred, scene):
    small = scene.resize((scene.width // 2, scene.height // 2))
    batch = pred.predict([scene, small], [PROMPT, "person"], threshold=0.3)
    assert len(batch) == 2 and pred.stats["head_runs"] == 1
    single = pred.predict(scene, PROMPT, threshold=0.3)
    # the largest image sets the padding, so its own result equals the single run
    np.testing.assert_allclose(batch[0].boxes, single.boxes, atol=1e-3)
    assert set(batch[1].phrases) <= {"person"}
    with pytest.raises(ValueError, match="one prompt per image"):
        pred.predict([scene, small], PROMPT)


def test_prompts_longer_than_the_query_are_chunked_and_merged(pred, scene):
    names = [f"object number {i}" for i in range(90)] + ["person"]  # ~ 460 tokens
    calls = []
    res = pred.predict(scene, names, threshold=0.0, max_dets=300, progress=lambda *a: calls.append(a))
    assert len(res.prompt.phrases) == 91 and pred.stats["head_runs"] >= 2
    n = len(calls)  # progress after every chunk: (1, n) … (n, n)
    assert n == pred.stats["head_runs"] and calls == [(i + 1, n) for i in range(n)]
    assert res.phrase_ids.max() <= 90 and len(set(res.phrase_ids.tolist())) > 1
    # token scores of a box are filled exactly for its own phrase's tokens (mapped back from its chunk)
    i = int(np.argmax(res.phrase_ids == 90)) if (res.phrase_ids == 90).any() else 0
    pid = int(res.phrase_ids[i])
    b, e = res.prompt.spans[pid][0]
    own = [t.index for t in res.tokens if b <= t.start < e]
    assert not np.isnan(res.token_scores[i, own]).any()


def test_bad_prompts_and_settings(pred, scene):
    for bad in ("", "   ", []):
        with pytest.raises(PromptError):
            pred.predict(scene, bad)
    with pytest.raises(PromptError, match="not in the caption"):
        pred.predict(scene, "a red circle", phrases=["giraffe"])
    with pytest.raises(ValueError, match="threshold"):
        pred.predict(scene, PROMPT, threshold=1.5)
    with pytest.raises(ValueError, match="NMS"):
        pred.predict(scene, PROMPT, nms_iou=0)
    with pytest.raises(ValueError, match="Input size"):
        pred.predict(scene, PROMPT, min_size=8)
    with pytest.raises(ValueError, match="precision"):
        pred.predict(scene, PROMPT, precision="fp8")


def test_token_heatmaps(pred, scene):
    res = pred.predict(scene, from_categories(["red circle", "person"]), threshold=0.0)
    levels, combined = pred.token_heatmaps(res, phrase=1)
    assert len(levels) == 5 and combined.shape == (scene.height, scene.width)
    assert 0 <= float(combined.min()) and float(combined.max()) <= 1
    h, w = res.states[0].hw
    assert levels[0].shape == (-(-h // 8), -(-w // 8))


def test_cli_predict_json(tiny_fixture, tmp_path):
    out = subprocess.run([sys.executable, "-m", "glip", "predict", "--model", str(tiny_fixture / "model.pth"),
                          "--config", str(tiny_fixture / "config.json"), "--image", str(tiny_fixture / "image.png"),
                          "--prompt", PROMPT, "--threshold", "0.5", "--json", "--out", str(tmp_path / "o.png")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["caption"].startswith("red circle") and all(d["score"] > 0.5 for d in js["detections"])
    assert Image.open(tmp_path / "o.png").size == Image.open(tiny_fixture / "image.png").size
    assert "prompt chunks" not in out.stderr  # one chunk: no bar
    long = " . ".join(f"object number {i}" for i in range(90))
    chunked = subprocess.run([sys.executable, "-m", "glip", "predict", "--model", str(tiny_fixture / "model.pth"),
                              "--config", str(tiny_fixture / "config.json"), "--image", str(tiny_fixture / "image.png"),
                              "--prompt", long, "--json"], cwd=REPO, capture_output=True, text=True)
    assert chunked.returncode == 0, chunked.stderr
    assert "prompt chunks" in chunked.stderr and json.loads(chunked.stdout)["caption"].startswith("object number 0")
    bad = subprocess.run([sys.executable, "-m", "glip", "predict", "--model", str(tiny_fixture / "model.pth"),
                          "--config", str(tiny_fixture / "config.json"), "--image", str(tmp_path / "none.png"),
                          "--prompt", PROMPT], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_bf16_autocast_on_cpu_stays_finite(pred, scene):
    res = pred.predict(scene, PROMPT, threshold=0.0, max_dets=5, precision="bf16")
    assert np.isfinite(res.scores).all() and np.isfinite(res.boxes).all()
    ref = pred.predict(scene, PROMPT, threshold=0.0, max_dets=5)
    assert abs(float(res.scores[0]) - float(ref.scores[0])) < 0.05
    assert torch.get_default_dtype() == torch.float32


def test_cropping_text_to_the_prompt_length_changes_nothing(tiny_model, scene):
    """The fast path (BERT + head on the real tokens only) equals the official 256-position run."""
    fast = Predictor(tiny_model, crop_text=True).predict(scene, PROMPT, threshold=0.3, output_attentions=True)
    full = Predictor(tiny_model, crop_text=False).predict(scene, PROMPT, threshold=0.3, output_attentions=True)
    assert fast.states[0].head.text.shape[1] < full.states[0].head.text.shape[1] == 256
    assert len(fast) == len(full) and (fast.phrase_ids == full.phrase_ids).all()
    np.testing.assert_allclose(fast.boxes, full.boxes, atol=1e-3)
    np.testing.assert_allclose(fast.scores, full.scores, atol=1e-5)
    np.testing.assert_allclose(fast.token_scores, full.token_scores, atol=1e-5)
    for a, b in zip(fast.attentions, full.attentions):
        torch.testing.assert_close(a.image_to_text, b.image_to_text, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a.text_to_image, b.text_to_image, atol=1e-6, rtol=1e-4)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=12), st.integers(1, 3))
def test_best_per_phrase_keeps_the_top_k_of_each_phrase_in_order(pids, k):
    from glip.prompts import Prompt
    from glip.results import GroundingResult

    n = len(pids)
    scores = np.sort(np.random.default_rng(n).random(n).astype(np.float32))[::-1].copy()
    res = GroundingResult(boxes=np.arange(4 * n, dtype=np.float32).reshape(n, 4), scores=scores,
                          phrase_ids=np.array(pids, dtype=np.int64), prompt=Prompt("a b c d", ["a", "b", "c", "d"],
                          [[(0, 1)], [(2, 3)], [(4, 5)], [(6, 7)]]), tokens=[],
                          token_scores=np.arange(n, dtype=np.float32).reshape(n, 1), image_size=(10, 10))
    best = res.best_per_phrase(k)
    for p in set(pids):
        want = [i for i, q in enumerate(pids) if q == p][:k]  # the first k = the k best (sorted by score)
        got = [int(b[0]) // 4 for b, q in zip(best.boxes, best.phrase_ids) if q == p]
        assert got == want
    assert list(best.scores) == sorted(best.scores, reverse=True)
    assert (best.token_scores[:, 0] == best.boxes[:, 0] / 4).all()  # rows stay aligned
    with pytest.raises(ValueError):
        res.best_per_phrase(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("env, applied", [({}, False), ({"GLIP_HEAP": "bounded"}, True),
                                          ({"GLIP_HEAP": "bounded", "MALLOC_MMAP_THRESHOLD_": "131072"}, False)])
def test_glip_heap_bounded_fixes_the_heap_threshold_at_the_first_inference(env, applied, tmp_path):
    """GLIP_HEAP=bounded: freed activations go back to the OS (glibc's mmap threshold fixed at 16 MiB) from the
    first predict on, unless the user set glibc's own variable; `bench --rss` measures what it saves."""
    import os

    code = (
        "import torch, glip.runtime as r\n"
        "from glip import GLIP, get_preset\n"
        "from glip.prompts import from_categories\n"
        "import numpy as np\n"
        "m = GLIP(get_preset('toy').replace(min_size_test=64, max_size_test=64, swin_embed_dim=16, "
        "swin_num_heads=(1, 2, 4, 8), channels=32, fusion_embed_dim=64, num_dyhead_blocks=1)).eval()\n"
        "assert not r._heap_policy['done']\n"
        "m.predict(np.zeros((64, 64, 3), np.uint8), from_categories(['circle']))\n"
        "print(r._heap_policy['applied'], r.fix_heap_threshold())\n")
    full = {k: v for k, v in os.environ.items() if k not in ("GLIP_HEAP", "MALLOC_MMAP_THRESHOLD_")} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=full)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(applied), str(applied)]
