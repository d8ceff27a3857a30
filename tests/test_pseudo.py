"""Pseudo-labels of the world's web split: precision against its hidden truth (glip.data.judge, reporting
only) and known-word scoring (glip.label.known_word_prompt), with a stand-in labeller."""
import numpy as np
import pytest

from glip.data import KNOWN_WORDS, from_odvg, make_sample, odvg_record, to_odvg
from glip.data.judge import by_word, judge_regions, pseudo_label_precision, sweep
from glip.datasets import open_dataset
from glip.errors import ConfigError
from glip.label import ARTICLES, LabelSettings, known_word_prompt, label_shard


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


class FakeLabeller:
    """Stands in for the teacher: grounds every phrase on one fixed box, twice (no network needed)."""

    def __init__(self):
        self.seen = []

    def eval(self):
        return self

    def predict(self, images, prompts, threshold=0.5, precision="fp32"):
        from glip.results import GroundingResult

        self.seen.extend(prompts)
        out = []
        for im, p in zip(images, prompts):
            n = len(p.phrases)
            out.append(GroundingResult(
                boxes=np.tile(np.array([[10, 10, 60, 60]], np.float32), (2 * n, 1)),
                scores=np.array([0.9] * n + [0.6] * n, np.float32), phrase_ids=np.array(list(range(n)) * 2),
                prompt=p, tokens=[], token_scores=np.zeros((2 * n, 0)), image_size=im.size))
        return out


def test_judged_labels_of_the_web_split(tmp_path):
    recs = list(open_dataset("world:web:0:5"))
    one = label_shard(FakeLabeller(), recs, LabelSettings(batch_size=2, max_per_phrase=1)).records
    every = label_shard(FakeLabeller(), recs, LabelSettings(batch_size=2)).records
    assert [2 * len(r["grounding"]["regions"]) for r in one] == [len(r["grounding"]["regions"]) for r in every]
    to_odvg(one, tmp_path / "p.jsonl")
    assert from_odvg(tmp_path / "p.jsonl") == one
    p = pseudo_label_precision(one)
    assert 0.0 <= p["precision"] <= 1.0 and p["n_regions"] == sum(len(r["grounding"]["regions"]) for r in one)


def test_by_word_groups_regions_by_the_novel_word_their_phrase_names():
    from glip.data import NOVEL_WORDS

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

    cap = "a big red crescent and a turquoise circle, plus a photo."
    p = from_caption(cap)
    k = known_word_prompt(p, KNOWN_WORDS)
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
    with pytest.raises(ConfigError, match="score_words"):
        LabelSettings(score_words="known").validate()  # the CLI maps "known" to the model's vocabulary


def test_known_word_scoring_writes_the_whole_phrase():
    """The scoring prompt is narrowed, the region written is not: the student must see the novel word."""
    recs = list(open_dataset("world:web:0:4"))
    spy = FakeLabeller()
    known = label_shard(spy, recs, LabelSettings(batch_size=2, score_words=KNOWN_WORDS))
    plain = label_shard(FakeLabeller(), recs, LabelSettings(batch_size=2))
    assert known.records == plain.records  # the fake's boxes do not depend on spans: same full-phrase spans
    assert any(len(sp) and all(p.caption[b:e].lower() in KNOWN_WORDS for b, e in sp)
               for p in spy.seen for sp in p.spans)
