"""The public API (what `import glip` gives), one definition per shared concept (IoU conventions, box
rescaling, strides, autocast, a phrase's tokens, preprocessing), and no import cycle inside the package."""
from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

import glip
from glip.boxes import box_iou, box_iou_numpy, iou, scale_boxes

PUBLIC = ["GLIP", "GLIPConfig", "GroundingResult", "Prompt", "parse_prompt", "from_categories", "from_caption",
          "GLIPError", "ImageError", "PromptError", "CheckpointError", "DataError", "ConfigError", "draw_result",
          "probe_size"]


def test_public_names():
    for name in PUBLIC:
        assert name in glip.__all__ and getattr(glip, name) is not None
    for err in ("ImageError", "PromptError", "CheckpointError", "DataError", "ConfigError"):
        assert issubclass(getattr(glip, err), glip.GLIPError)
    p = glip.parse_prompt("person . dog")
    assert isinstance(p, glip.Prompt) and p.phrases == ["person", "dog"]


def test_predict_has_its_real_signature():
    from glip.predictor import Predictor

    sig = inspect.signature(glip.GLIP.predict)
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    assert list(sig.parameters)[1:] == list(inspect.signature(Predictor.predict).parameters)[1:]
    for a, b in zip(list(sig.parameters.values())[1:], list(inspect.signature(Predictor.predict).parameters.values())[1:]):
        assert a.default == b.default, a.name
    doc = glip.GLIP.predict.__doc__
    for name in ("threshold", "candidate_threshold", "nms_iou", "precision", "image_size"):
        assert name in doc


def test_candidate_threshold_equals_rewriting_the_config(tiny_model):
    image = REPO / "tests" / "fixtures" / "glip-official-tiny" / "image.png"
    prompt = "red circle . blue square . person"
    before = tiny_model.config
    low = tiny_model.predict(image, prompt, threshold=0.0, max_dets=1000, candidate_threshold=0.0)
    assert tiny_model.config is before and tiny_model.config.inference_th == 0.05
    default = tiny_model.predict(image, prompt, threshold=0.0, max_dets=1000)
    tiny_model.config = before.replace(inference_th=0.0)
    try:
        rewritten = tiny_model.predict(image, prompt, threshold=0.0, max_dets=1000)
    finally:
        tiny_model.config = before
    assert len(low) > len(default)
    np.testing.assert_array_equal(low.boxes, rewritten.boxes)
    np.testing.assert_array_equal(low.scores, rewritten.scores)
    with pytest.raises(glip.ConfigError, match="candidate_threshold"):
        tiny_model.predict(image, prompt, candidate_threshold=1.5)


def _import_graph() -> dict[str, set[str]]:
    """glip module → the glip modules it imports (function-level imports included)."""
    files = {p: ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "glip").rglob("*.py")}
    names = {n.removesuffix(".__init__") for n in files.values()}
    graph = {}
    for path, name in files.items():
        mod = name.removesuffix(".__init__")
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = {d for d in deps if d in names and d != mod}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _import_graph()
    assert "glip.model" not in graph["glip.checkpoint"] and "glip.checkpoint" in graph["glip.model"]
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " → ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])


# --- one definition per concept ------------------------------------------------------------------------
def test_shared_definitions_are_one_object():
    from glip import boxes, config, explain, predictor, runtime
    from glip.train import data

    assert explain.STRIDES is config.FPN_STRIDES is boxes.DEFAULT_STRIDES == glip.GLIPConfig().anchor_strides
    assert boxes.DEFAULT_ANCHOR_SIZES is config.ANCHOR_SIZES
    assert predictor._autocast is runtime.autocast
    assert explain._iou is box_iou_numpy
    assert data.InputSpec is glip.preprocess.Preprocessor


boxes4 = st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(0.5, 40), st.floats(0.5, 40)),
                  min_size=1, max_size=6).map(lambda r: np.array([[x, y, x + w, y + h] for x, y, w, h in r]))


@settings(max_examples=60, deadline=None)
@given(boxes4, boxes4)
def test_iou_conventions_agree(a, b):
    """No +1: numpy pairwise = torch with plus_one=False = the scalar one. +1 = the same on boxes one pixel larger."""
    ref = box_iou_numpy(a, b)
    ta, tb = torch.tensor(a), torch.tensor(b)
    np.testing.assert_allclose(box_iou(ta, tb, plus_one=False).numpy(), ref, atol=1e-9)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou(a[i], b[j]) == pytest.approx(ref[i, j], abs=1e-9)
    grow = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(box_iou(ta, tb, plus_one=True).numpy(), box_iou_numpy(a + grow, b + grow), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(boxes4, st.integers(16, 5000), st.integers(16, 5000), st.integers(16, 1333), st.integers(16, 1333))
def test_scale_boxes_round_trip(b, W, H, w, h):
    there = scale_boxes(b, (W, H), (w, h))
    np.testing.assert_allclose(scale_boxes(there, (w, h), (W, H)), b, rtol=1e-5, atol=1e-3)
    t = scale_boxes(torch.tensor(b, dtype=torch.float32), (W, H), (w, h))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), there, rtol=1e-6)
    np.testing.assert_allclose(there[:, [0, 2]], b[:, [0, 2]] * w / W, rtol=1e-5, atol=1e-4)


def test_a_phrase_s_tokens_never_include_special_tokens():
    from glip.explain import phrase_tokens
    from glip.prompts import from_caption, prompt_tokens, tokens_in_spans

    p = from_caption("dog on a sofa", spans=[[(0, 3)], [(9, 13)]])
    toks = prompt_tokens(p)
    assert toks[0].text == "[CLS]" and toks[0].start == 0  # a span at 0 contains [CLS]'s (0, 0) offset
    assert tokens_in_spans(toks, p.spans[0]) == [1] == phrase_tokens(p, toks, 0)
    assert [toks[i].text for i in tokens_in_spans(toks, p.spans[1])] == ["sofa"]


def test_preprocessor_is_the_config_s_four_fields_and_query_length():
    from glip.image import batch_images, to_tensor
    from glip.preprocess import Preprocessor
    from glip.prompts import from_categories, positive_map, tokenize

    cfg = glip.get_preset("toy")
    pre = Preprocessor(cfg)
    im = glip.load_image(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8))
    torch.testing.assert_close(pre.image(im), to_tensor(im, cfg.min_size_test, cfg.max_size_test, cfg.pixel_mean,
                                                        cfg.pixel_std))
    b, sizes = pre.images([im, im.resize((50, 70))])
    ref, ref_sizes = batch_images([pre.image(im), pre.image(im.resize((50, 70)))], cfg.size_divisibility)
    torch.testing.assert_close(b, ref)
    assert sizes == ref_sizes
    p = from_categories(["red circle", "dog"])
    assert torch.equal(pre.tokenize(p.caption)["input_ids"], tokenize(p.caption, max_len=cfg.max_query_len)["input_ids"])
    assert torch.equal(pre.positive_map(p), positive_map(p, max_len=cfg.max_query_len))
    assert Preprocessor(cfg, min_size=64, max_size=96).resized_hw((200, 100)) == (48, 96)  # (W, H) in, (h, w) out


def test_runtime_precision_and_devices():
    from glip.runtime import autocast, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(glip.ConfigError, match="Unknown device"):
        resolve_device("banana")
    with pytest.raises(glip.ConfigError, match="precision"):
        autocast("cpu", "fp8")
    with pytest.raises(glip.ConfigError, match="CUDA"):
        autocast("cpu", "fp16")
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
