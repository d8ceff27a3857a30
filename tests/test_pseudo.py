"""Pseudo-labelling (issue 3): ODVG round trip, precision against hidden truth, the labeller's plumbing."""
import numpy as np
import pytest
import torch

from glip.data import from_odvg, make_sample, odvg_record, to_odvg
from glip.pseudo import pseudo_label, pseudo_label_precision, sweep


def test_truth_records_have_precision_one(tmp_path):
    samples = [make_sample("web", i, 0) for i in range(3)]
    recs = [odvg_record(s, scores=[0.8] * sum(len(p.box_ids) for p in s.phrases)) for s in samples]
    to_odvg(recs, tmp_path / "w.jsonl")
    back = from_odvg(tmp_path / "w.jsonl")
    assert back == recs
    p = pseudo_label_precision(back)
    assert p["precision"] == 1.0 and p["phrase_recall"] == 1.0
    assert sweep(back, (0.5, 0.9))[1]["n_regions"] == 0


def test_wrong_boxes_lower_precision():
    s = make_sample("web", 1, 0)
    rec = odvg_record(s, scores=[0.9] * sum(len(p.box_ids) for p in s.phrases))
    for r in rec["grounding"]["regions"]:
        r["bbox"] = [0.0, 0.0, 5.0, 5.0]
    assert pseudo_label_precision([rec])["precision"] == 0.0


class _FakeModel:
    """Stands in for the teacher: grounds every phrase on one fixed box (no network needed)."""

    def eval(self):
        return self

    def predict(self, images, prompts, threshold=0.5):
        from glip.results import GroundingResult

        out = []
        for im, p in zip(images, prompts):
            n = len(p.phrases)
            out.append(GroundingResult(
                boxes=np.tile(np.array([[10, 10, 60, 60]], np.float32), (2 * n, 1)),
                scores=np.array([0.9] * n + [0.6] * n, np.float32), phrase_ids=np.array(list(range(n)) * 2),
                prompt=p, tokens=[], token_scores=np.zeros((2 * n, 0)), image_size=im.size))
        return out


def test_pseudo_label_round_trip(tmp_path):
    recs, stats = pseudo_label(_FakeModel(), n=5, seed=0, batch_size=2, out=tmp_path / "p.jsonl", progress=False)
    assert stats["n_images"] == 5 and stats["n_boxes"] > 0
    back = from_odvg(tmp_path / "p.jsonl")
    assert back == recs
    for r in back:
        assert r["filename"].startswith("web_s0_")
        for g in r["grounding"]["regions"]:
            assert 0.0 <= g["score"] <= 1.0
            cap = r["grounding"]["caption"]
            assert all(cap[b:e] for b, e in g["tokens_positive"])
    # max_per_phrase=1 keeps only the best box of each phrase
    per = [len(r["grounding"]["regions"]) for r in back]
    recs_all, _ = pseudo_label(_FakeModel(), n=5, seed=0, batch_size=2, max_per_phrase=None, progress=False)
    assert [len(r["grounding"]["regions"]) for r in recs_all] == [2 * k for k in per]


def test_pseudo_label_with_a_real_model():
    from glip.config import get_preset
    from glip.model import GLIP

    torch.manual_seed(0)
    model = GLIP(get_preset("toy").replace(min_size_test=128, max_size_test=128, num_dyhead_blocks=1))
    recs, stats = pseudo_label(model, n=2, threshold=0.0, batch_size=2, progress=False)
    assert len(recs) == 2 and stats["n_images"] == 2


def test_by_word_groups_regions_by_the_novel_word_their_phrase_names():
    from glip.data import NOVEL_WORDS
    from glip.pseudo import by_word, judge_regions

    samples = [make_sample("web", i, 0) for i in range(40)]
    recs = [odvg_record(s, scores=[0.8] * sum(len(p.box_ids) for p in s.phrases)) for s in samples]
    rows, words = sweep(recs, (0.5, 0.9), word_screen=0.5)
    assert rows == sweep(recs, (0.5, 0.9))
    judged, _ = judge_regions(recs)
    assert words == by_word(judged, 0.5)
    assert sum(w["boxes"] for w in words.values()) == rows[0]["n_regions"]
    assert all(w["precision"] == 1.0 for w in words.values())  # truth records
    assert set(words) - {"(none)"} <= NOVEL_WORDS and len(set(words) - {"(none)"}) >= 2
    # a region is attributed to a novel word exactly when the world marks its object novel
    assert all(bool(j["word"]) == j["novel"] for j in judged)
    assert by_word(judged, 0.9) == {}


def test_known_word_prompt_narrows_each_phrase_to_its_known_words():
    from glip.prompts import from_caption
    from glip.pseudo import ARTICLES, known_word_prompt
    from glip.train.data import ATTRIBUTE_WORDS

    cap = "a big red crescent and a turquoise circle, plus a photo."
    p = from_caption(cap)
    k = known_word_prompt(p, ATTRIBUTE_WORDS)
    assert k.caption == p.caption and k.phrases == p.phrases and len(k.spans) == len(p.spans)
    words = {name: [cap[b:e] for b, e in sp] for name, sp in zip(k.phrases, k.spans)}
    assert words["a big red crescent"] == ["big", "red"]
    assert words["a turquoise circle"] == ["circle"]
    assert words["a photo"] == ["a photo"]  # no known word: the whole phrase, as before
    for old, new in zip(p.spans, k.spans):  # narrowed spans stay inside their phrase
        assert all(any(b0 <= b and e <= e0 for b0, e0 in old) for b, e in new)
    c = known_word_prompt(p, None, ARTICLES)  # "content": every word but the articles
    words = {name: [cap[b:e] for b, e in sp] for name, sp in zip(c.phrases, c.spans)}
    assert words["a big red crescent"] == ["big", "red", "crescent"]
    assert words["a turquoise circle"] == ["turquoise", "circle"] and words["a photo"] == ["photo"]
    with pytest.raises(ValueError, match="score_words"):
        pseudo_label(_FakeModel(), n=1, progress=False, score_words="known")  # the CLI maps "known" to a set


def test_known_word_scoring_writes_the_whole_phrase(tmp_path):
    """The scoring prompt is narrowed, the region written is not: the student must see the novel word."""
    from glip.train.data import ATTRIBUTE_WORDS

    seen = []

    class Spy(_FakeModel):
        def predict(self, images, prompts, threshold=0.5):
            seen.extend(prompts)
            return super().predict(images, prompts, threshold)

    recs, stats = pseudo_label(Spy(), n=4, seed=0, batch_size=2, progress=False, score_words=ATTRIBUTE_WORDS)
    plain, _ = pseudo_label(_FakeModel(), n=4, seed=0, batch_size=2, progress=False)
    assert recs == plain  # the fake model's boxes do not depend on spans: same records, same full-phrase spans
    assert stats["score_words"] == sorted(ATTRIBUTE_WORDS)
    assert any(len(sp) and all(p.caption[b:e].lower() in ATTRIBUTE_WORDS for b, e in sp)
               for p in seen for sp in p.spans)
