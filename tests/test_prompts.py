"""Tests for glip.prompts: official prompt layout, span -> token map, noun phrases, chunking, scores."""

import itertools
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import FIXTURES  # noqa: E402

from glip import prompts as P  # noqa: E402
from glip.prompts import (  # noqa: E402
    MAX_QUERY_LEN,
    Prompt,
    PromptError,
    chunk,
    from_caption,
    from_categories,
    get_tokenizer,
    label_to_token,
    noun_phrases,
    num_tokens,
    parse_prompt,
    phrase_scores,
    positive_map,
    tokenize,
)

FIXTURE = FIXTURES / "glip-official-tiny" / "io.pt"


def span_texts(prompt: Prompt):
    return [[prompt.caption[b:e] for b, e in entity] for entity in prompt.spans]


def ids_of(caption):
    return get_tokenizer()([caption])["input_ids"][0]


# ---------------------------------------------------------------------------------------------------------------
# Official reproduction
# ---------------------------------------------------------------------------------------------------------------


def test_reproduces_official_fixture_exactly():
    io = torch.load(FIXTURE, weights_only=True)
    prompt = from_categories(io["entity_names"][0], style="demo")
    assert prompt.caption == io["caption"] == io["captions"][0]
    assert prompt.phrases == io["entity_names"][0]
    assert [[list(s) for s in entity] for entity in prompt.spans] == io["tokens_positive"][0]

    enc = tokenize(prompt.caption)
    assert torch.equal(enc["input_ids"], io["input_ids"])
    assert torch.equal(enc["attention_mask"], io["attention_mask"])

    pmap = positive_map(prompt)
    assert pmap.dtype == io["positive_map"][0].dtype
    assert torch.equal(pmap, io["positive_map"][0])  # bit-exact, including the official +1e-6 normalisation
    l2t = label_to_token(pmap)
    assert list(l2t) == io["labels"][0]
    assert list(l2t.values()) == io["positive_map_label_to_token"][0]

    # The fixture's spans fed back through from_caption give the same map.
    again = from_caption(io["caption"], phrases=io["entity_names"][0], spans=io["tokens_positive"][0])
    assert torch.equal(positive_map(again), io["positive_map"][0])


def test_tokenizer_is_bert_base_uncased_offline():
    # ids of bert-base-uncased (as in the official fixture): [CLS] red circle . [SEP]
    assert ids_of("Red circle . ") == [101, 2417, 4418, 1012, 102]
    enc = tokenize(["person . ", "a dog"])
    assert enc["input_ids"].shape == (2, MAX_QUERY_LEN) and enc["attention_mask"].shape == (2, MAX_QUERY_LEN)
    assert enc["attention_mask"][0].sum() == 4 and enc["input_ids"][0, 4] == 0
    assert "offset_mapping" not in enc
    assert get_tokenizer() is get_tokenizer()  # cached


def test_demo_layout():
    p = from_categories(["red circle", "person"])
    assert p.caption == "red circle . person . "
    assert p.spans == [[(0, 10)], [(13, 19)]] and len(p) == 2 and p.style == "demo"
    assert label_to_token(positive_map(p)) == {1: [1, 2], 2: [4]}


def test_eval_style_name_ending_on_space_uses_end_minus_2_fallback():
    p = from_categories(["person", "hot dog (food)", "traffic_light", "a  b"], style="eval")
    assert p.caption == "person. hot dog . traffic light. a b"  # ". " joined, no trailing separator
    assert p.phrases == ["person", "hot dog ", "traffic light", "a b"]
    assert span_texts(p) == [["person"], ["hot dog "], ["traffic light"], ["a b"]]
    b, e = p.spans[1][0]
    enc = get_tokenizer()([p.caption])
    assert enc.char_to_token(0, e - 1) is None  # the span really ends on a space
    assert label_to_token(positive_map(p)) == {1: [1], 2: [3, 4], 3: [6, 7], 4: [9, 10]}


def test_span_fallbacks_begin_plus_2_end_minus_3_and_skip():
    caption = "a  cat  here"  # "cat" is token 2; spaces have no token
    pmap = positive_map(from_caption(caption, spans=[[(1, 8)]]))  # begin ' ',' ' -> +2; end-1 ' ', ' ' -> -3
    assert label_to_token(pmap) == {1: [2]}
    # " b" begins on a space before a one-letter token at the end: only begin+1 resolves it
    assert label_to_token(positive_map(from_caption("a b", spans=[[(1, 3)]]))) == {1: [2]}
    assert label_to_token(positive_map(from_categories(["(z) y", "w"], style="eval"))) == {1: [1], 2: [3]}
    # "a b " ends on a space after a one-letter token: only end-2 resolves it (end-3 is a space too)
    assert label_to_token(positive_map(from_caption("a b c", spans=[[(0, 4)]]))) == {1: [1, 2]}
    assert label_to_token(positive_map(from_categories(["x y (z)", "w"], style="eval"))) == {1: [1, 2], 2: [4]}
    pmap = positive_map(from_caption("cat    dog", spans=[[(3, 7)], [(0, 3)]]))  # only spaces -> skipped
    assert label_to_token(pmap) == {1: [], 2: [1]}
    assert pmap[0].sum() == 0
    assert torch.allclose(pmap[1].sum(), torch.tensor(1.0), atol=1e-5)
    raw = positive_map(from_caption("a red car", spans=[[(2, 9)]]), normalize=False)
    assert raw[0, :5].tolist() == [0, 0, 1, 1, 0]  # [CLS] a red car


def test_truncated_caption_never_marks_the_sep_position():
    names = [f"thing{i}" for i in range(100)]  # ~ 300+ tokens
    p = from_categories(names)
    assert num_tokens(p.caption) > MAX_QUERY_LEN
    pmap = positive_map(p)
    assert pmap[:, MAX_QUERY_LEN - 1].sum() == 0
    assert pmap[-1].sum() == 0  # beyond the truncation point
    assert tokenize(p.caption)["input_ids"][0, -1] == 102


# ---------------------------------------------------------------------------------------------------------------
# Free captions
# ---------------------------------------------------------------------------------------------------------------


def test_explicit_phrases_punctuation_and_case():
    caption = 'Hello, World! (a "Cat") [dog]; the dog\'s bone... CAT?'
    p = from_caption(caption, phrases=["cat", "dog", "the dog's bone", "world"])
    assert span_texts(p) == [["Cat"], ["dog"], ["the dog's bone"], ["World"]]
    l2t = label_to_token(positive_map(p))
    ids = ids_of(caption)
    assert all(l2t[i] for i in l2t)
    assert [ids[t] for t in l2t[1]] == ids_of("cat")[1:-1]


def test_explicit_phrase_whole_word_preferred_and_not_found_error():
    p = from_caption("concatenate the cat", phrases=["cat"])
    assert p.spans == [[(16, 19)]]
    p = from_caption("一只猫和一只狗", phrases=["猫", "狗"])  # no word boundaries in CJK: substring fallback
    assert span_texts(p) == [["猫"], ["狗"]]
    with pytest.raises(PromptError, match="'zebra'"):
        from_caption("a cat", phrases=["zebra"])


def test_repeated_phrases():
    auto = from_caption("a dog and a cat and a dog")
    assert auto.phrases == ["a dog", "a cat"]  # de-duplicated, one entity per phrase
    assert auto.spans == [[(0, 5), (20, 25)], [(10, 15)]]
    assert label_to_token(positive_map(auto)) == {1: [1, 2, 7, 8], 2: [4, 5]}
    explicit = from_caption("a dog and a dog", phrases=["dog", "dog", "dog"])
    assert explicit.spans == [[(2, 5)], [(12, 15)], [(2, 5)]]  # next unused occurrence, then the first again


def test_unicode_captions():
    caption = "Un café crème, a 🐶 and 東京タワー near naïve Zoë 😀!"
    p = from_caption(caption, phrases=["CAFÉ CRÈME", "🐶", "東京", "zoë"])
    assert span_texts(p) == [["café crème"], ["🐶"], ["東京"], ["Zoë"]]
    l2t = label_to_token(positive_map(p))
    ids = ids_of(caption)
    assert all(len(v) >= 1 for v in l2t.values())
    tok = get_tokenizer()
    assert tok.decode([ids[t] for t in l2t[1]]) == "cafe creme"  # accents stripped by the uncased tokenizer
    assert [ids[t] for t in l2t[2]] == [tok.unk_token_id]
    assert tok.decode([ids[t] for t in l2t[3]]).replace(" ", "") == "東京"
    auto = from_caption(caption)  # automatic noun phrases do not crash and map to tokens
    assert len(auto) >= 1 and all(label_to_token(positive_map(auto)).values())
    decomposed = "cafe\u0301 au lait"  # NFD accent: the span still maps to the word's token
    assert label_to_token(positive_map(from_caption(decomposed, phrases=["cafe\u0301"]))) == {1: [1]}


def test_noun_phrases_tricky_captions():
    nps = noun_phrases("The small red circle is left of a big blue star.")
    assert "the small red circle" in nps and "a big blue star" in nps
    nps = noun_phrases("A man riding a horse, and two dogs near the café.")
    assert {"a man", "a horse", "the café"} <= set(nps)
    nps = noun_phrases("The dog's bone is next to Mr. Smith's (red) car!")
    assert nps and all(n == n.lower() and n == n.strip() for n in nps)
    assert not any(c in n for n in nps for c in P._PUNCTUATION)
    assert "the dog" in nps
    assert noun_phrases("...") == [] and noun_phrases("") == []


def test_auto_caption_spans_and_fallback_to_whole_caption():
    p = from_caption("The small red circle is left of a big blue star.")
    assert span_texts(p)[:2] == [["The small red circle"], ["a big blue star"]]
    assert p.style is None
    p = from_caption("  is it?  ")  # no noun phrase: the whole (stripped) caption is the one entity
    assert p.phrases == ["is it?"] and p.spans == [[(2, 8)]]


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompts_raise(bad):
    with pytest.raises(PromptError, match="The prompt is empty"):
        parse_prompt(bad)
    with pytest.raises(PromptError, match="The prompt is empty"):
        from_caption(bad)


@pytest.mark.parametrize("bad", [" . . . ", "...", ";;", "🙂🙂🙂", "- . -"])
def test_prompts_without_a_word_raise(bad):
    for mode in ("auto", "categories", "caption"):
        with pytest.raises(PromptError, match="no word"):
            parse_prompt(bad, mode=mode)
    with pytest.raises(PromptError, match="no word"):
        from_caption(bad)
    assert parse_prompt("a 🙂 . 猫").phrases  # one word is enough


def test_other_errors():
    with pytest.raises(PromptError):
        from_categories([])
    with pytest.raises(PromptError, match="#2"):
        from_categories(["cat", "  "])
    with pytest.raises(PromptError, match="#1"):
        from_categories(["(food)"], style="eval")
    with pytest.raises(PromptError, match="no word"):
        from_caption("\u200b")
    with pytest.raises(PromptError, match="outside"):
        from_caption("a cat", spans=[[(2, 9)]])
    with pytest.raises(PromptError):
        parse_prompt("cat . dog", phrases=["cat"], mode="categories")


# ---------------------------------------------------------------------------------------------------------------
# parse_prompt
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, phrases",
    [
        ("person . bicycle . car", ["person", "bicycle", "car"]),
        ("person . baseball glove . car . ", ["person", "baseball glove", "car"]),
        ("cat. dog", ["cat", "dog"]),
        ("cat.", ["cat"]),
        ("cat . cat . dog", ["cat", "dog"]),
    ],
)
def test_parse_prompt_category_lists(text, phrases):
    p = parse_prompt(text)
    assert p.style == "demo" and p.phrases == phrases
    assert p.caption == "".join(n + " . " for n in phrases)


@pytest.mark.parametrize(
    "text", ["a man riding a horse", "A dog runs. A cat sleeps.", "3.5 inch screen", "The small red circle is left of a big blue star."]
)
def test_parse_prompt_captions(text):
    p = parse_prompt(text)
    assert p.style is None and p.caption == text


def test_parse_prompt_forced_modes_and_explicit_phrases():
    assert parse_prompt("cat. dog", mode="caption").caption == "cat. dog"
    assert parse_prompt("red car", mode="categories").phrases == ["red car"]
    assert parse_prompt("A dog runs. A cat sleeps.", mode="categories").phrases == ["A dog runs", "A cat sleeps"]
    p = parse_prompt("person . dog", phrases=["dog"])
    assert p.caption == "person . dog" and p.spans == [[(9, 12)]]


# ---------------------------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------------------------

NAMES_150 = [
    f"{a} {b}"
    for a, b in itertools.product(
        ["red", "green", "blue", "big", "small", "old"],
        "car dog cat house tree boat bird chair table lamp cup book phone shoe hat bag box ball kite bike train "
        "bus truck plane horse".split(),
    )
][:150]


@pytest.mark.parametrize("style", ["demo", "eval"])
def test_chunk_long_category_list(style):
    prompt = from_categories(NAMES_150, style=style)
    assert num_tokens(prompt.caption) > MAX_QUERY_LEN
    chunks = chunk(prompt)
    assert len(chunks) >= 2
    seen = []
    for sub, idx in chunks:
        assert num_tokens(sub.caption) <= MAX_QUERY_LEN
        assert sub.style == style and sub.phrases == [NAMES_150[i] for i in idx]
        assert span_texts(sub) == [[n] for n in sub.phrases]
        assert sub.caption == from_categories(sub.phrases, style=style).caption
        assert all(label_to_token(positive_map(sub)).values())
        seen += idx
    assert sorted(seen) == list(range(150)) and len(seen) == 150


def test_chunk_fitting_prompt_is_unchanged_and_huge_phrase_raises():
    p = from_categories(["cat", "dog"])
    assert chunk(p) == [(p, [0, 1])]
    huge = " ".join(["word"] * 300)
    with pytest.raises(PromptError, match="alone is longer"):
        chunk(from_categories(["cat", huge, "dog"]))
    with pytest.raises(PromptError, match="alone is longer"):
        chunk(from_caption("a cat and " + huge, spans=[[(2, 5)], [(10, 10 + len(huge))]]))


def test_chunk_free_caption_keeps_context():
    caption = " ".join(
        f"A red car number {i} is parked next to the blue house, and a dog sleeps under tree {i}." for i in range(30)
    )
    phrases = [f"tree {i}" for i in range(30)] + ["a red car"] * 30
    prompt = from_caption(caption, phrases=phrases)
    chunks = chunk(prompt)
    assert len(chunks) >= 2
    assert "".join(sub.caption for sub, _ in chunks) == caption  # windows tile the caption: no context lost
    seen = []
    for sub, idx in chunks:
        assert num_tokens(sub.caption) <= MAX_QUERY_LEN
        assert [t[0].lower() for t in span_texts(sub)] == [phrases[i].lower() for i in idx]
        assert all(label_to_token(positive_map(sub)).values())
        seen += idx
    assert sorted(seen) == list(range(60))


def test_chunk_free_caption_drops_overlong_context_between_phrases():
    filler = " ".join(["blah"] * 300)
    caption = f"a cat {filler} a dog"
    prompt = from_caption(caption, phrases=["a cat", "a dog"])
    chunks = chunk(prompt)
    assert [idx for _, idx in chunks] == [[0], [1]]
    assert [s.caption for s, _ in chunks] == ["a cat", "a dog"]
    assert all(num_tokens(s.caption) <= MAX_QUERY_LEN for s, _ in chunks)


# ---------------------------------------------------------------------------------------------------------------
# Property test on category lists
# ---------------------------------------------------------------------------------------------------------------

_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789éüñ東京-", min_size=1, max_size=8)
_name = st.lists(_word, min_size=1, max_size=3).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_name, min_size=1, max_size=12), style=st.sampled_from(["demo", "eval"]))
def test_property_category_lists(names, style):
    p = from_categories(names, style=style)
    assert len(p) == len(names)
    assert span_texts(p) == [[n] for n in names]
    pmap = positive_map(p)
    assert pmap.shape == (len(names), MAX_QUERY_LEN)
    assert torch.allclose(pmap.sum(-1), torch.ones(len(names)), atol=1e-5)
    ids = ids_of(p.caption)
    l2t = label_to_token(pmap)
    assert list(l2t) == list(range(1, len(names) + 1))
    for tokens in l2t.values():
        assert tokens and all(ids[t] not in (101, 102, 1012) for t in tokens)  # never [CLS]/[SEP]/"."


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def test_phrase_scores_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    p = from_caption("a dog and a cat", spans=[[(2, 5)], [(10, 15)], [(0, 15)], [(1, 2)]])  # last: a space only
    pmap = positive_map(p)
    logits = torch.randn(2, 7, MAX_QUERY_LEN, generator=g) * 4
    scores = phrase_scores(logits, pmap)
    assert scores.shape == (2, 7, 4)
    naive = torch.zeros(2, 7, 4)
    for label, tokens in label_to_token(pmap).items():
        for b in range(2):
            for loc in range(7):
                if tokens:
                    naive[b, loc, label - 1] = torch.sigmoid(logits[b, loc, tokens]).mean()
    assert torch.allclose(scores, naive, atol=1e-6)
    assert (scores[..., 3] == 0).all()  # a phrase with no token scores 0
    assert phrase_scores(logits[0, 0], pmap).shape == (4,)
    with pytest.raises(ValueError):
        phrase_scores(logits[..., :10], pmap)


def test_phrase_scores_more_than_80_phrases():
    p = from_categories([f"n{i}" for i in range(90)])
    pmap = positive_map(p)
    scores = phrase_scores(torch.zeros(3, MAX_QUERY_LEN), pmap)
    assert scores.shape == (3, 90)
    live = torch.tensor([bool(v) for v in label_to_token(pmap).values()])
    assert torch.allclose(scores[:, live], torch.full_like(scores[:, live], 0.5))


def test_noun_phrase_tag_repair_finds_nouns_the_lexicon_calls_verbs():
    # Pattern's lexicon tags "cross" as a verb; after a determiner/adjective it is a noun (the repair).
    assert noun_phrases("an orange cross next to a red circle.") == ["an orange cross", "a red circle"]
    assert noun_phrases("the dog runs across the park") == ["the dog", "the park"]  # real verbs stay verbs


def test_noun_phrase_tag_repair_finds_verbs_the_lexicon_calls_plural_nouns():
    # Pattern's lexicon tags "rides"/"chases" as plural nouns: "a man rides a horse" chunked as "a man rides".
    assert noun_phrases("a man rides a horse") == ["a man", "a horse"]
    assert noun_phrases("The dog chases the ball.") == ["the dog", "the ball"]
    assert noun_phrases("two coffee cups on the table") == ["coffee cups", "the table"]  # compounds stay nouns


def test_the_tokenizer_is_built_once_when_threads_race_for_it():
    """Labelling tags captions in a background thread while the model tokenises: the first use may come from
    two threads at once, in a fresh process (transformers not yet imported)."""
    import subprocess

    code = ("import threading, glip.prompts as p\n"
            "out = []\n"
            "ts = [threading.Thread(target=lambda: out.append(p.get_tokenizer())) for _ in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "assert len(out) == 8 and len({id(t) for t in out}) == 1, out\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
