"""Training sources: weighted mixing (sampling frequencies), detection records → grounding prompts (negatives,
screening, chunking), the step stream split over ranks and accumulation steps, `--data SPEC[:weight]`."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glip.errors import DataError
from glip.train.data import (
    DetectionRecord,
    InputSpec,
    ItemOptions,
    StepBatches,
    chunk_categories,
    detection_prompt,
    grounding_of,
    parse_data_arg,
    prompt_tokens,
    sample_negatives,
)

MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)


class Counting:
    """A source of `n` records that only says which it is (no image: draws are all the test needs)."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)


def test_weighted_sources_are_drawn_in_proportion():
    """Four sources with weights 1:2:3:4 (and different sizes): over 20000 slots each source's share is within
    4.5 binomial standard deviations of its weight, and records within a source are uniform."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    sources = [Counting(k, n) for k, n in enumerate((5, 50, 7, 1000))]
    stream = StepBatches(sources, w / w.sum(), None, ItemOptions(), batch_size=8, seed=3)
    draws = [d for s in range(2500) for d in stream.draws(s)]
    n = len(draws)
    counts = np.bincount([k for k, _ in draws], minlength=4)
    p = w / w.sum()
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4.5 * sd), (counts, n * p)
    first = np.bincount([i for k, i in draws if k == 0], minlength=5)  # 5 records of source 0, ~400 draws each
    assert first.min() > 0.7 * counts[0] / 5 and first.max() < 1.3 * counts[0] / 5
    # the stream is a pure function of (seed, step)
    again = StepBatches(sources, p, None, ItemOptions(), batch_size=8, seed=3)
    assert again.draws(17) == stream.draws(17) and stream.draws(17) != stream.draws(18)


def test_ranks_and_accumulation_split_the_same_global_batch():
    """Every (world, grad_accum) split of a batch of 8 covers its slots exactly once, in order."""
    sources = [Counting(0, 100)]
    for world, accum in ((1, 1), (2, 1), (1, 4), (2, 2), (4, 2), (8, 1)):
        seen = []
        for rank in range(world):
            s = StepBatches(sources, np.ones(1), None, ItemOptions(), 8, seed=0, rank=rank, world=world,
                            grad_accum=accum)
            parts = s.slots(5)
            assert len(parts) == accum and all(len(p) == 8 // (world * accum) for p in parts)
            seen += [j for p in parts for j in p]
        assert sorted(seen) == list(range(8))
    with pytest.raises(DataError):
        StepBatches(sources, np.ones(1), None, ItemOptions(), 6, world=4)


def test_a_rank_builds_exactly_the_items_of_its_slots():
    """Rank 1 of 2 gets the single process's items 2..3 of the step (the same tensors)."""
    from glip.config import get_preset
    from glip.train.data import Collate, open_sources

    cfg = get_preset("toy").replace(**MICRO)
    sources, w = open_sources(["world:gold_det:0:8:0.5", "world:gold_ground:0:8:0.5"])
    one = StepBatches(sources, w, InputSpec(cfg), ItemOptions(), 4, seed=1, collate=None)
    two = StepBatches(sources, w, InputSpec(cfg), ItemOptions(), 4, seed=1, rank=1, world=2, collate=Collate(cfg))
    items = one[6][0]
    part = two[6][0]
    ref = Collate(cfg)(items[2:4])
    assert part["captions"] == ref["captions"]
    assert torch.equal(part["images"], ref["images"]) and torch.equal(part["input_ids"], ref["input_ids"])


def test_parse_data_arg_weights(tmp_path):
    assert parse_data_arg("world:gold_det:0:50000:0.5") == ("world:gold_det:0:50000", 0.5)
    assert parse_data_arg("world:gold_det:0:50000") == ("world:gold_det:0:50000", 1.0)  # N, not a weight
    assert parse_data_arg("world:gold_det:0") == ("world:gold_det:0", 1.0)
    labels, images = tmp_path / "labels.jsonl", tmp_path / "images"
    labels.write_text("")
    images.mkdir()
    assert parse_data_arg(f"odvg:{labels}:{images}:2") == (f"odvg:{labels}:{images}", 2.0)
    assert parse_data_arg(f"odvg:{labels}:{images}") == (f"odvg:{labels}:{images}", 1.0)
    assert parse_data_arg(f"odvg:{labels}:3") == (f"odvg:{labels}", 3.0)  # no folder named 3: a weight
    (tmp_path / "3").mkdir()
    assert parse_data_arg(f"odvg:{labels}:{tmp_path / '3'}") == (f"odvg:{labels}:{tmp_path / '3'}", 1.0)
    with pytest.raises(DataError, match="positive"):
        parse_data_arg("world:gold_det:0:50000:0")


# --------------------------------------------------------------------------------------------------
# detection → grounding
# --------------------------------------------------------------------------------------------------
COCO_LIKE = [f"category {w}" for w in ("cat", "dog", "person", "traffic light", "wine glass", "bus", "car", "cup")]


def _check_prompt(caption, spans, labels, categories):
    names = caption.split(". ")
    assert len(names) == len(set(names)) and set(names) <= set(categories)
    for name, (b, e) in spans.items():
        assert caption[b:e] == name
    assert set(spans) == set(names)


def test_detection_prompt_keeps_every_present_category_and_shuffles():
    rng = np.random.default_rng(0)
    labels = ["category cat", "category dog", "category cat"]
    orders = set()
    for _ in range(30):
        caption, spans = detection_prompt(labels, COCO_LIKE, rng, max_tokens=256, negatives=(2, 4))
        _check_prompt(caption, spans, labels, COCO_LIKE)
        assert {"category cat", "category dog"} <= set(spans)
        assert 4 <= len(spans) <= 6
        orders.add(caption)
    assert len(orders) > 10  # order and negatives vary draw by draw


def test_official_negative_rule():
    """negatives None: 85 sampled (all absent ones when fewer); half the time all, else a uniform 1..85."""
    cats = [f"thing{i}" for i in range(300)]
    rng = np.random.default_rng(1)
    ks = [len(sample_negatives(["thing0"], cats, rng, None)) for _ in range(2000)]
    full = np.mean([k == 85 for k in ks])
    assert 0.45 < full < 0.56  # 0.5 + the uniform draw's own 1/85
    assert min(ks) >= 1 and max(ks) == 85
    few = [len(sample_negatives(["thing0"], cats[:10], rng, None)) for _ in range(200)]
    assert max(few) == 9


def test_hard_negatives_favour_confusable_categories():
    cats = ["red circle", "red square", "blue star", "green heart", "yellow cross", "purple hexagon"]
    rng = np.random.default_rng(2)
    picks = [n for _ in range(3000) for n in sample_negatives(["red circle"], cats, rng, (1, 1), hard_weight=4.0)]
    share = picks.count("red square") / len(picks)
    assert 0.42 < share < 0.58  # weight 4 against four others of weight 1: 4/8


def test_negatives_are_screened_to_fit_the_query():
    cats = [f"a rather long category name number {i}" for i in range(200)]
    rng = np.random.default_rng(3)
    for _ in range(20):
        caption, spans = detection_prompt([cats[0]], cats, rng, max_tokens=64, negatives=(150, 150))
        assert prompt_tokens(list(spans)) <= 62 and cats[0] in spans


def test_long_category_lists_are_chunked():
    """More present categories than one query holds: each draw trains one chunk, with that chunk's boxes only;
    over many draws every category is trained."""
    cats = [f"object kind {i}" for i in range(60)]
    rec = DetectionRecord("k", lambda: None, [(i, i, i + 5, i + 5) for i in range(60)], list(cats))
    rng = np.random.default_rng(4)
    opts = ItemOptions(negatives=(0, 0))
    seen = set()
    for _ in range(40):
        caption, regions, ignore = grounding_of(rec, type("S", (), {"categories": cats})(), rng, opts, max_len=48)
        names = caption.split(". ")
        assert prompt_tokens(names) <= 46 and len(names) < 60
        assert len(regions) == len(names)  # one box per category here, only the chunk's
        for r in regions:
            (b, e), = r.spans
            assert caption[b:e] == cats[int(r.box[0])]
        seen |= set(names)
    assert seen == set(cats)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["cat", "dog", "person", "hot dog", "a b c d e", "x"]), min_size=1, max_size=12),
       st.integers(3, 30))
def test_chunks_cover_the_names_within_budget(names, budget):
    names = list(dict.fromkeys(names))
    chunks = chunk_categories(names, budget)
    assert [n for c in chunks for n in c] == names
    for c in chunks:
        assert prompt_tokens(c) <= budget or len(c) == 1


def test_attribute_prompts_only_when_the_source_has_vocabularies():
    """Compositional category names ("colour shape") give one vocabulary per word position; names of varying
    length (COCO's) give none, and such a source always trains on category prompts."""
    from glip.train.data import positional_vocabularies

    assert positional_vocabularies(["red circle", "blue star", "red star"]) == {
        "word 1": ("red", "blue"), "word 2": ("circle", "star")}
    assert positional_vocabularies(["person", "traffic light", "dog"]) is None
    assert positional_vocabularies(["hot dog", "hot pot"]) is None  # one position never varies
    rec = DetectionRecord("k", lambda: None, [(0, 0, 5, 5)], ["red circle"])
    plain = type("S", (), {"categories": ["red circle", "blue star"]})()
    rich = type("S", (), {"categories": ["red circle", "blue star"],
                          "vocabularies": positional_vocabularies(["red circle", "blue star"])})()
    rng = np.random.default_rng(5)
    opts = ItemOptions(attribute_prompt_prob=1.0, negatives=(1, 1))
    assert grounding_of(rec, plain, rng, opts, 64)[0] in ("red circle. blue star", "blue star. red circle")
    caption, regions, _ = grounding_of(rec, rich, rng, opts, 64)
    assert set(caption.split(". ")) in ({"red", "blue"}, {"circle", "star"})
    (b, e), = regions[0].spans
    assert caption[b:e] in ("red", "circle")
