"""Tests for the synthetic grounding world (glip/data)."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from glip.data import (  # noqa: E402
    GOLD_CATEGORIES,
    GOLD_COLORS,
    GOLD_SHAPES,
    GOLD_SPLITS,
    NOVEL_WORDS,
    SPLITS,
    WorldConfig,
    detection_prompt,
    from_odvg,
    make_sample,
    make_split,
    object_mask,
    odvg_record,
    parse_file_name,  # noqa: E402
    render,
    to_coco,
    to_odvg,
)
from glip.data.captions import RELATIONS, relations  # noqa: E402
from glip.errors import DataError  # noqa: E402

N = 12  # samples per split in the bulk checks
SPLIT_CACHE = {s: make_split(s, N, seed=7) for s in SPLITS}


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def same_sample(a, b):
    assert a.caption == b.caption
    assert a.phrases == b.phrases
    assert a.objs == b.objs
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_same_sample(split):
    same_sample(make_sample(split, 3, seed=11), make_sample(split, 3, seed=11))


def test_sample_alone_equals_sample_in_split():
    for split in SPLITS:
        same_sample(make_sample(split, 5, seed=7), SPLIT_CACHE[split][5])


def test_annotations_without_rendering_are_the_same():
    for split in SPLITS:
        for i in range(N):
            bare, full = make_sample(split, i, seed=7, render_image=False), SPLIT_CACHE[split][i]
            assert bare.image is None
            assert (bare.caption, bare.phrases, bare.objs) == (full.caption, full.phrases, full.objs)


def test_different_seeds_splits_indices_differ():
    a = np.asarray(make_sample("gold_ground", 0, seed=0).image)
    assert not np.array_equal(a, np.asarray(make_sample("gold_ground", 0, seed=1).image))
    assert not np.array_equal(a, np.asarray(make_sample("gold_ground", 1, seed=0).image))
    assert not np.array_equal(a, np.asarray(make_sample("test_ground", 0, seed=0).image))


# ---------------------------------------------------- annotation consistency
def check_sample(s, cfg=WorldConfig()):
    S = cfg.image_size
    assert s.image.size == (S, S) and s.image.mode == "RGB"
    assert cfg.min_objects <= len(s.objs) <= cfg.max_objects + 2
    for o in s.objs:
        x1, y1, x2, y2 = o.box
        assert 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S
        assert o.novel == (o.color in NOVEL_WORDS or o.shape in NOVEL_WORDS)
        assert o.visible >= 1 - cfg.max_occlusion - 1e-6
    assert s.phrases
    for p in s.phrases:
        assert s.caption[p.span[0]:p.span[1]] == p.text
        assert all(0 <= i < len(s.objs) for i in p.box_ids)
    if s.split in ("gold_det", "test_det"):
        assert {p.text for p in s.phrases} >= {o.category for o in s.objs}
        for p in s.phrases:
            assert p.box_ids == [i for i, o in enumerate(s.objs) if o.category == p.text]
    else:  # grounding: each phrase names exactly one box, and only that box fits it
        assert 1 <= len(s.phrases) <= cfg.max_phrases
        for p in s.phrases:
            assert len(p.box_ids) == 1
            fits = [i for i, o in enumerate(s.objs) if words(p.text) <= {o.color, o.shape, o.size}]
            assert fits == p.box_ids, (s.caption, p.text)
        # a stated relation between consecutive phrases holds
        for a, b in zip(s.phrases, s.phrases[1:]):
            between = s.caption[a.span[1]:b.span[0]]
            for rel in RELATIONS:
                if rel in between:
                    assert rel in relations(s.objs[a.box_ids[0]], s.objs[b.box_ids[0]],
                                            cfg.relation_margin * S), s.caption


@pytest.mark.parametrize("split", SPLITS)
def test_annotations_consistent(split):
    for s in SPLIT_CACHE[split]:
        check_sample(s)


@settings(max_examples=15, deadline=None)
@given(split=st.sampled_from(SPLITS), index=st.integers(0, 10**6), seed=st.integers(0, 2**31))
def test_annotations_consistent_anywhere(split, index, seed):
    check_sample(make_sample(split, index, seed))


def test_small_images_and_config():
    cfg = WorldConfig(image_size=256, min_objects=3, max_objects=4)
    for split in SPLITS:
        check_sample(make_sample(split, 0, seed=2, cfg=cfg), cfg)
    with pytest.raises(AssertionError):
        WorldConfig(image_size=128)


def test_boxes_tight_on_drawn_pixels():
    """Draw each object alone on flat grey: changed pixels hug its box."""
    grey = Image.new("RGB", (320, 320), (128, 128, 128))
    n = 0
    for split in SPLITS:
        for s in SPLIT_CACHE[split][:6]:
            for o in s.objs:
                diff = np.abs(np.asarray(render([o], grey), np.int16) - 128).max(-1) > 20
                for m in (diff, object_mask(o, 320)):
                    ys, xs = np.nonzero(m)
                    x1, y1, x2, y2 = o.box
                    # pixel j spans [j, j+1): inside the box up to a pixel, touching every side
                    assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1, (o, xs.min(), xs.max())
                    assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1, (o, ys.min(), ys.max())
                    assert xs.min() <= x1 + 1.5 and xs.max() + 1 >= x2 - 1.5, (o, xs.min(), xs.max())
                    assert ys.min() <= y1 + 1.5 and ys.max() + 1 >= y2 - 1.5, (o, ys.min(), ys.max())
                n += 1
    assert n > 50


def test_occlusion_bounded():
    for split in SPLITS:
        for s in SPLIT_CACHE[split]:
            masks = [object_mask(o, 320) for o in s.objs]
            for k, m in enumerate(masks):
                covered = np.zeros_like(m)
                for later in masks[k + 1:]:
                    covered |= later
                assert (m & ~covered).sum() >= 0.7 * m.sum() - 2


# ------------------------------------------------------------- vocabulary
def test_novel_words_absent_from_gold_splits():
    for split in GOLD_SPLITS:
        for s in SPLIT_CACHE[split]:
            assert not words(s.caption) & NOVEL_WORDS, s.caption
            assert not any(words(p.text) & NOVEL_WORDS for p in s.phrases)
            for o in s.objs:
                assert o.color in GOLD_COLORS and o.shape in GOLD_SHAPES and not o.novel
                assert o.category in GOLD_CATEGORIES


def test_novel_words_in_web_and_test_novel():
    for split in ("web", "test_novel"):
        for s in SPLIT_CACHE[split]:
            assert words(s.caption) & NOVEL_WORDS, s.caption
            assert any(s.objs[p.box_ids[0]].novel for p in s.phrases)
            for p in s.phrases:  # a novel word is always attached to a known one
                assert len(words(p.text) & NOVEL_WORDS) <= 1
    seen = set().union(*(words(s.caption) for s in make_split("web", 40, seed=1)))
    assert NOVEL_WORDS <= seen


def test_test_novel_target_has_distractors():
    for s in make_split("test_novel", 30, seed=3):
        (p,) = s.phrases
        t = s.objs[p.box_ids[0]]
        assert t.novel
        known = "shape" if t.color in NOVEL_WORDS else "color"
        distractors = [o for o in s.objs if o is not t and getattr(o, known) == getattr(t, known)]
        assert len(distractors) >= 2
        assert "small" not in p.text and "big" not in p.text


def test_detection_prompt():
    s = SPLIT_CACHE["gold_det"][0]
    assert ". " in s.caption and not s.caption.endswith(".")
    assert [p.text for p in s.phrases] == s.caption.split(". ")
    full, phrases = detection_prompt(s.objs, GOLD_CATEGORIES)
    assert [p.text for p in phrases] == list(GOLD_CATEGORIES)
    assert SPLIT_CACHE["test_det"][0].caption == full


def test_hard_negatives_share_a_word_with_present_categories():
    """hard_weight > 1 draws confusable absent categories (shared colour or shape) more often; 1 keeps
    the plain uniform draw, bit for bit."""
    shares, plain_shares, n = 0, 0, 0
    for i, s in enumerate(SPLIT_CACHE["gold_det"]):
        present = {o.category for o in s.objs}
        present_words = {w for c in present for w in c.split()}
        cap_a, _ = detection_prompt(s.objs, GOLD_CATEGORIES, np.random.default_rng(i), 6)
        cap_b, _ = detection_prompt(s.objs, GOLD_CATEGORIES, np.random.default_rng(i), 6, hard_weight=1.0)
        assert cap_a == cap_b
        hard, phrases = detection_prompt(s.objs, GOLD_CATEGORIES, np.random.default_rng(i), 6, hard_weight=1e6)
        assert present <= {p.text for p in phrases} and len(phrases) == len(present) + 6
        negs = [p.text for p in phrases if p.text not in present]
        confusable = [c for c in GOLD_CATEGORIES if c not in present and present_words & set(c.split())]
        shares += sum(bool(present_words & set(c.split())) for c in negs)
        plain_shares += sum(bool(present_words & set(p.text.split())) for p in
                            detection_prompt(s.objs, GOLD_CATEGORIES, np.random.default_rng(i), 6)[1]
                            if p.text not in present)
        n += min(6, len(confusable))
    assert shares == n  # with an overwhelming weight every negative it can be is confusable
    assert plain_shares < shares


# ---------------------------------------------------------------- formats
def test_coco_export_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    samples = SPLIT_CACHE["gold_det"][:4] + SPLIT_CACHE["test_novel"][:2]
    d = to_coco(samples, tmp_path / "coco")
    coco = COCO(str(tmp_path / "coco" / "coco.json"))
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == sum(len(s.objs) for s in samples)
    for img in coco.loadImgs(coco.getImgIds()):
        assert Image.open(tmp_path / "coco" / img["file_name"]).size == (img["width"], img["height"])
    a = coco.loadAnns(coco.getAnnIds())[0]
    o = samples[0].objs[0]
    assert coco.loadCats(a["category_id"])[0]["name"] == o.category
    assert np.allclose(a["bbox"], [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]], atol=0.02)
    by_shape = to_coco(samples, tmp_path / "shapes.json", by="shape")
    assert {c["name"] for c in by_shape["categories"]} >= {o.shape for s in samples for o in s.objs}
    assert d["images"][0]["file_name"] == samples[0].file_name


def test_odvg_round_trip_with_scores(tmp_path):
    samples = SPLIT_CACHE["gold_ground"][:3] + SPLIT_CACHE["web"][:3]
    pseudo = odvg_record(samples[-1])
    n_regions = len(pseudo["grounding"]["regions"])
    pseudo = odvg_record(samples[-1], scores=np.linspace(0.3, 0.9, n_regions).tolist())
    written = to_odvg(samples + [pseudo], tmp_path / "g.jsonl")
    back = from_odvg(tmp_path / "g.jsonl")
    assert back == written
    assert all("score" in r for r in back[-1]["grounding"]["regions"])
    assert not any("score" in r for r in back[0]["grounding"]["regions"])
    r = back[0]["grounding"]["regions"][0]
    b, e = r["tokens_positive"][0]
    assert back[0]["grounding"]["caption"][b:e] == r["phrase"]
    bad = dict(back[0], grounding=dict(back[0]["grounding"], caption="x" * 5))
    with pytest.raises(DataError, match="outside the caption"):
        to_odvg([bad], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_file_names_parse_back():
    s = SPLIT_CACHE["web"][3]
    assert parse_file_name(s.file_name) == ("web", 7, 3)
    assert parse_file_name("00000/" + s.file_name) == ("web", 7, 3)
    with pytest.raises(ValueError):
        parse_file_name("photo.jpg")


def test_export_command_writes_real_files_that_read_back(tmp_path, capsys):
    """`python -m glip.data export` through the generic writers: WebDataset shards with the world's
    vocabulary beside them; the printed spec reads the scenes back."""
    import json

    from glip.data.__main__ import main
    from glip.datasets import open_dataset

    assert main(["export", "web", "--seed", "7", "--n", "5", "--format", "webdataset", "--out",
                 str(tmp_path / "w"), "--shard-size", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "w").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    recs = list(open_dataset(res["spec"]))
    assert [r.caption for r in recs] == [s.caption for s in SPLIT_CACHE["web"][:5]]
    assert np.array_equal(np.asarray(recs[4].load_image()), np.asarray(SPLIT_CACHE["web"][4].image))
    known = set((tmp_path / "w" / "known_words.txt").read_text().split())
    assert known == set(GOLD_COLORS) | set(GOLD_SHAPES) | {"small", "big"}
    assert set((tmp_path / "w" / "novel_words.txt").read_text().split()) == NOVEL_WORDS
    assert main(["export", "web", "--n", "2", "--format", "coco", "--out", str(tmp_path / "c")]) == 2
    assert "coco needs a detection dataset" in capsys.readouterr().err
    assert main(["test_det", "2", str(tmp_path / "legacy"), "--seed", "1"]) == 0  # the earlier form
    assert (tmp_path / "legacy" / "test_det" / "coco.json").is_file()

