"""glip.explain: the visualisation math behind the app's attention, heat-map and agreement views."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glip import explain
from glip.fusion import FusionAttention

SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]   # padded P3..P7 of a 64×96 padded input
HW = (60, 90)                                        # resized, unpadded input
N = sum(h * w for h, w in SHAPES)


def test_valid_shapes_are_ceil_of_the_unpadded_size():
    assert explain.valid_shapes(SHAPES, HW) == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert explain.valid_shapes(SHAPES, (33, 17)) == [(5, 3), (3, 2), (2, 1), (1, 1), (1, 1)]
    assert explain.level_offsets(SHAPES) == [0, 96, 120, 126, 128]


def test_split_levels_is_row_major_per_level_and_crops_padding():
    vec = torch.arange(N, dtype=torch.float32)
    levels = explain.split_levels(vec, SHAPES, (33, 17))
    assert [tuple(m.shape) for m in levels] == [(5, 3), (3, 2), (2, 1), (1, 1), (1, 1)]
    assert levels[0][1, 2] == 1 * 12 + 2              # row 1, col 2 of P3
    assert levels[1][2, 1] == 96 + 2 * 6 + 1          # P4 starts after P3's 96 positions
    batched = explain.split_levels(torch.stack([vec, vec]), SHAPES, HW)
    assert batched[0].shape == (2, 8, 12)
    with pytest.raises(ValueError):
        explain.split_levels(vec[:-1], SHAPES, HW)


def _att(T=5, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, heads, N, T, generator=g)
    return FusionAttention(logits.softmax(-1), logits.transpose(-1, -2).softmax(-1), SHAPES)


def test_text_to_image_levels_hold_the_token_distribution():
    att = _att()
    levels = explain.text_to_image(att, [1], HW)                     # nothing cropped at HW
    assert sum(float(m.sum()) for m in levels) == pytest.approx(1.0, abs=1e-5)
    two = explain.text_to_image(att, [1, 3], HW, head=1)
    ref = att.text_to_image[0, 1, [1, 3]].mean(0)
    assert torch.allclose(two[0].flatten(), ref[:96])
    with pytest.raises(ValueError):
        explain.text_to_image(att, [7], HW)
    with pytest.raises(ValueError):
        explain.text_to_image(att, [1], HW, head=5)


def test_image_to_text_at_a_point_picks_the_cell_under_it():
    T = 4
    p = torch.zeros(1, 1, N, T)
    for i in range(N):
        p[0, 0, i, i % T] = 1.0                                       # position i attends token i % T
    att = FusionAttention(p, p.transpose(-1, -2), SHAPES)
    # original image 120×180 (W×H = 180×120) resized to 60×90: point (x=50, y=30) → resized (25, 15)
    per_level, mean = explain.image_to_text_at(att, (50, 30), HW, (180, 120))
    idx0 = (15 // 8) * 12 + 25 // 8                                   # P3 cell (1, 3)
    assert per_level[0].argmax() == idx0 % T
    idx1 = 96 + (15 // 16) * 6 + 25 // 16                              # P4 cell (0, 1)
    assert per_level[1].argmax() == idx1 % T
    assert torch.allclose(per_level.sum(-1), torch.ones(5))
    assert mean.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        explain.image_to_text_at(att, (500, 30), HW, (180, 120))


def test_image_to_text_in_a_box_averages_its_cells():
    att = _att(T=6)
    per_level, mean = explain.image_to_text_in_box(att, [0, 0, 180, 120], HW, (180, 120))
    p3 = att.image_to_text[0].mean(0)[:96].view(8, 12, -1)
    # cells whose centre lies in the (resized) box 0..90 × 0..60: all 8 rows, the first 11 columns (centre 92 > 90)
    assert torch.allclose(per_level[0], p3[:, :11].reshape(-1, 6).mean(0), atol=1e-6)
    tiny_box = explain.image_to_text_in_box(att, [10, 10, 11, 11], HW, (180, 120))[0]
    assert torch.allclose(tiny_box.sum(-1), torch.ones(5))                  # falls back to the centre cell


def test_combined_density_conserves_attention_mass():
    att = _att()
    levels = explain.text_to_image(att, [2], HW)
    comb = explain.combine_levels(levels, (64, 96), (96, 64), how="density")   # no resize, no padding crop
    assert comb.shape == (64, 96)
    assert float(comb.sum()) == pytest.approx(1.0, rel=0.02)
    mx = explain.combine_levels(levels, HW, (180, 120), how="max")
    assert mx.shape == (120, 180) and float(mx.max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError):
        explain.combine_levels(levels, HW, (180, 120), how="sum")
    # nearest keeps the cells: P5 (stride 32) cell (0, 1) covers resized x 32..63 → original x 64..127
    cells = torch.arange(6.0).view(2, 3)
    up = explain.upsample(cells, 32, HW, (180, 120), mode="nearest")
    assert up.shape == (120, 180) and float(up[10, 100]) == 1.0 and float(up[100, 10]) == 3.0
    with pytest.raises(ValueError):
        explain.upsample(cells, 32, HW, (180, 120), mode="cubic")


def test_sharpness_and_aggregate():
    u = torch.full((10,), 0.1)
    one = torch.zeros(10)
    one[3] = 1
    assert explain.sharpness(u) == pytest.approx(0.0, abs=1e-6)
    assert explain.sharpness(one) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(explain.aggregate([u, u, u], "rollout"), u)
    peaked = torch.softmax(torch.arange(10.0), 0)
    r = explain.aggregate([peaked] * 4, "rollout")
    assert r.sum() == pytest.approx(1.0) and explain.sharpness(r) > explain.sharpness(peaked)  # consistent → sharper
    assert torch.allclose(explain.aggregate([u, one], "mean"), (u + one) / 2)
    with pytest.raises(ValueError):
        explain.aggregate([], "mean")
    with pytest.raises(ValueError):
        explain.aggregate([u], "median")


def test_layer_maps_follow_every_layer():
    atts = [_att(seed=s) for s in range(3)]
    per = explain.token_to_image_per_layer(atts, [1, 2], head=None)
    assert len(per) == 3 and all(p.shape == (N,) for p in per)
    assert all(float(p.sum()) == pytest.approx(1.0, abs=1e-5) for p in per)


def test_match_and_agreement():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32)
    b = np.array([[1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]], np.float32)
    pairs, ua, ub = explain.match(a, [0, 1, 1], b, [0, 0, 1], 0.5)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0)]            # box 1 matches b1 by IoU but not by phrase
    assert sorted(ua.tolist()) == [1, 2] and sorted(ub.tolist()) == [1, 2]
    rows = explain.agreement(["x", "y"], (a, [0, 1, 1]), (b, [0, 0, 1]))
    assert rows[0] == {"phrase": "x", "n_a": 1, "n_b": 2, "matched": 1, "only_a": 0, "only_b": 1}
    assert rows[1]["matched"] == 0 and rows[1]["only_a"] == 2
    empty = explain.agreement(["x"], (np.zeros((0, 4)), []), (a, [0, 0, 0]))
    assert empty[0]["only_b"] == 3


def test_phrase_tokens_and_best_scores():
    from glip.predictor import prompt_tokens
    from glip.prompts import from_categories

    p = from_categories(["red circle", "star"])
    toks = prompt_tokens(p)
    ids = explain.phrase_tokens(p, toks, 0)
    assert [toks[i].text for i in ids] == ["red", "circle"]
    assert [toks[i].text for i in explain.phrase_tokens(p, toks, 1)] == ["star"]

    class R:
        prompt = p
        scores = np.array([0.9, 0.4, 0.7])
        phrase_ids = np.array([1, 0, 1])

    assert explain.best_phrase_scores(R()).tolist() == pytest.approx([0.4, 0.9])


def test_on_a_real_prediction_levels_agree_with_the_predictor():
    """The attention maps split the visual axis exactly like the dense S_ground maps of the predictor."""
    from app.models import random_toy
    from glip.data import make_sample

    model = random_toy()
    s = make_sample("gold_det", 0, 0)
    res = model.predict(s.image.resize((300, 200)), "red circle . star", threshold=0.0, output_attentions=True)
    att, hw = res.attentions[0], res.states[0].hw
    assert att.text_to_image.shape[-1] == sum(h * w for h, w in att.level_shapes)
    t2i = explain.text_to_image(att, [1], hw, strides=model.config.anchor_strides)
    dense, comb = model.predictor.token_heatmaps(res, token_ids=[1])
    assert [tuple(m.shape) for m in t2i] == [tuple(m.shape) for m in dense]
    full = explain.combine_levels(t2i, hw, res.image_size, model.config.anchor_strides)
    assert tuple(full.shape) == tuple(comb.shape) == (200, 300)
    assert math.isfinite(float(full.sum()))


def test_text_stage_similarity_follows_every_head_stage():
    """One matrix per stage: the encoder, every X-MHA and fusion BERT layer, the projection; cosine
    matrices (unit diagonal, symmetric); the encoder stage equals a direct computation."""
    from app.models import random_toy
    from glip.data import make_sample
    from glip.prompts import tokenize

    model = random_toy()
    s = make_sample("gold_det", 0, 0)
    caption = "red triangle. blue triangle. green triangle"
    stages = explain.text_stage_similarity(model, s.image, caption, [1, 4, 7])
    n = model.config.num_dyhead_blocks
    assert [name for name, _ in stages][0] == "text encoder" and stages[-1][0] == "S_ground text projection"
    assert len(stages) == 2 + 2 * n
    for _, c in stages:
        assert c.shape == (3, 3)
        assert np.allclose(np.diag(c), 1.0, atol=1e-5) and np.allclose(c, c.T, atol=1e-6)
    enc = tokenize([caption], max_len=model.config.max_query_len)
    with torch.no_grad():
        h = model.encode_text(enc["input_ids"], enc["attention_mask"]).hidden[0, [1, 4, 7]]
    v = torch.nn.functional.normalize(h, dim=-1)
    assert np.allclose(stages[0][1], (v @ v.T).numpy(), atol=1e-5)
    assert not model.training
