"""Pseudo-label any image–caption corpus with any GLIP: the teacher step of self-training (paper §7.1).

    from glip.label import label
    summary = label(GLIP.from_pretrained("glip_tiny_model_o365_goldg.pth"), "webdataset:cc3m/{00000..00331}.tar",
                    "runs/cc3m-labels")
    python -m glip label --model toy-teacher --data world:web:0:8000 --out runs/pseudo    # the same, as a command

For each pair: the caption's noun phrases are extracted offline (`glip.prompts.from_caption`, the
official NP grammar), the pairs are grounded `batch_size` at a time in one padded batch each, and the
boxes scoring above `threshold` (paper: 0.5) are written as ODVG grounding records with their scores.
Records whose phrases kept no box are written too (a trainer drops them, as the official
CAPTION_MIN_BOX 1). `max_per_phrase` keeps at most that many boxes per phrase (None: all, as the paper).
`score_words` (a deviation, see `known_word_prompt`) lets a phrase's score average only some of its
words; the region written always spans the whole noun phrase.

Pieces (a distributed engine reuses the per-shard unit and the writer):
* `prepare(record, settings)`: decode + caption checks + noun phrases → `Prepared`, or a reject dict.
* `label_pair(model, image, caption, settings)`: one pair's pseudo-labels as a `GroundingResult` (the app).
* `label_shard(model, records, settings) -> ShardResult`: a pure function of its inputs (batches are
  cut inside the shard, so a shard's output does not depend on where or when it runs).
* `write_shard(out_dir, name, result)`: the shard's ODVG and rejects files, each written to a
  temporary name and renamed; returns the manifest entry.
* `label(...)`: the local driver. Shards of the input (one per tar; `records_per_shard` records of an
  unsharded input) are labelled in order with a background reading worker, each written when complete
  and recorded in the manifest; `resume` skips completed shards; `shard=(i, n)` takes the input shards
  whose index is i mod n, so n machines split a corpus without talking to each other.

Output folder:
    manifest.json            settings, versions, completed shards (name, input, counts, sha256)
    shards/00000.jsonl       ODVG records of input shard 0, in input order
    shards/00000.rejects.jsonl
    rejects.jsonl            every reject of the completed shards, in shard order
    summary.json             this run's counts, score histogram and time
With `shard=(i, n)`, n > 1: manifest.i-of-n.json, rejects.i-of-n.jsonl, summary.i-of-n.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from glip.datasets import Dataset, Record, Shard, open_dataset
from glip.datasets.records import decode_image
from glip.datasets.writers import atomic_write_bytes, atomic_write_text, check_writable, jsonl_bytes
from glip.errors import ConfigError, DataError, GLIPError, ImageError, PromptError
from glip.prompts import Prompt, from_caption, noun_phrases
from glip.runtime import check_precision

ARTICLES = frozenset({"a", "an", "the"})
RECORDS_PER_SHARD = 1000
MANIFEST_FORMAT = "glip-label"
MANIFEST_VERSION = 1
VOCABULARY_FILE = "vocabulary.txt"  # beside a model's weights: the words it was trained to ground
_WORD = re.compile(r"[A-Za-z]+")
_HIST_BINS = 10
IMAGE_REJECTS = ("unreadable image", "image too large")  # the reject reasons that are the image's fault


# --------------------------------------------------------------------------------------------------
# scoring words
# --------------------------------------------------------------------------------------------------
def known_word_prompt(prompt: Prompt, known: frozenset[str] | None, exclude: frozenset[str] = frozenset()) -> Prompt:
    """The same caption and entities, each entity's spans narrowed to its words in `known` (the vocabulary
    the labelling model was trained to ground; None = any word) and not in `exclude`; an entity with no such
    word keeps its spans.

    Why: a phrase's score is the mean of its tokens' scores. A teacher trained with "a"/"the" outside every
    phrase (negatives everywhere) that has never seen a word pulls a correct box down (0.40 for "a big
    turquoise star" in the toy world's web_s0_000000), while the known words that pick the object score high.
    Scored by its known words, the phrase keeps the boxes the teacher can actually vouch for; the region
    written still spans the whole noun phrase, so the student is taught the new word too. A student that
    has learned the new words labels with `known=None, exclude=ARTICLES` ("content")."""
    spans = []
    for entity in prompt.spans:
        narrowed = [(b + m.start(), b + m.end()) for b, e in entity for m in _WORD.finditer(prompt.caption[b:e])
                    if (known is None or m.group().lower() in known) and m.group().lower() not in exclude]
        spans.append(narrowed or list(entity))
    return Prompt(prompt.caption, prompt.phrases, spans, prompt.style)


def scoring_prompt(prompt: Prompt, score_words: str | frozenset[str]) -> Prompt:
    """The prompt whose phrase scores decide what is kept: "all" its tokens (the paper), "content" (all but
    the articles) or the words of a vocabulary (`known_word_prompt`)."""
    if score_words == "all":
        return prompt
    if score_words == "content":
        return known_word_prompt(prompt, None, ARTICLES)
    return known_word_prompt(prompt, frozenset(score_words))


def read_vocabulary(path: str | Path) -> frozenset[str]:
    """A vocabulary file: one word per line (lower-cased; blank lines and `#` comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"vocabulary file not found: {p}")
    try:
        words = {line.split("#", 1)[0].strip().lower() for line in p.read_text(encoding="utf-8").splitlines()}
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: a vocabulary file is UTF-8 text, one word per line") from None
    words.discard("")
    if not words:
        raise ConfigError(f"{p}: the vocabulary file holds no word")
    return frozenset(words)


def known_vocabulary(source) -> frozenset[str] | None:
    """The vocabulary a model was trained to ground, from `vocabulary.txt` beside its weights (a shipped
    name such as "toy-teacher", our model folder or its model.safetensors); None when it has none."""
    from glip.checkpoint import shipped_models

    s = str(source)
    folder = shipped_models().get(s) or Path(s)
    if folder.is_file():
        folder = folder.parent
    path = folder / VOCABULARY_FILE
    return read_vocabulary(path) if path.is_file() else None


def resolve_score_words(value: str, model_source=None) -> str | frozenset[str]:
    """`--score-words`: "all", "content", "known" (the model's own vocabulary, `known_vocabulary`) or the
    path of a vocabulary file."""
    if value in ("all", "content"):
        return value
    if value == "known":
        vocab = known_vocabulary(model_source) if model_source is not None else None
        if vocab is None:
            raise ConfigError(f"--score-words known: the model {model_source!r} has no {VOCABULARY_FILE} beside its "
                              "weights; pass a vocabulary file instead")
        return vocab
    return read_vocabulary(value)


# --------------------------------------------------------------------------------------------------
# settings and per-pair preparation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSettings:
    threshold: float = 0.5                  # keep boxes scoring above this (paper and official: > 0.5)
    batch_size: int = 8                     # pairs per padded batch (padding changes results, as officially)
    max_per_phrase: int | None = None       # boxes kept per phrase, best first (None: all, as the paper)
    score_words: str | frozenset[str] = "all"
    precision: str = "fp32"
    min_box_side: float = 1.0               # boxes thinner than this (pixels) are dropped

    def validate(self) -> "LabelSettings":
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_per_phrase is not None and self.max_per_phrase < 1:
            raise ConfigError(f"max boxes per phrase must be >= 1 (or None for all), got {self.max_per_phrase}")
        if isinstance(self.score_words, str) and self.score_words not in ("all", "content"):
            raise ConfigError(f"score_words must be 'all', 'content' or a set of words, not {self.score_words!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be fp32, fp16 or bf16, not {self.precision!r}")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        if not isinstance(self.score_words, str):
            d["score_words"] = sorted(self.score_words)
        return d


@dataclass
class Prepared:
    """A pair ready for the model: the decoded full-size image (a `PreparedImage` when already resized for
    the model), its noun-phrase prompt and the prompt that scores it."""

    record: Record
    image: object
    prompt: Prompt
    scoring: Prompt


def reject(record: Record, reason: str, detail: str = "") -> dict:
    return {"key": record.key, "file_name": record.file_name, "reason": reason, "detail": detail or reason}


def image_preparer(model):
    """The model's `prepare_image` (decode, key, resize to its input size) when it has one, else None."""
    return getattr(model, "prepare_image", None)


def prepare(record: Record, settings: LabelSettings, prepare_image=None) -> Prepared | dict:
    """`Prepared`, or a reject {key, file_name, reason, detail} for a sample that cannot be labelled. With
    `prepare_image` (see `image_preparer`) the image is also made ready for the model here, so that a reader
    thread does the resize instead of the thread that drives the model."""
    if record.error:
        return reject(record, "malformed record", record.error)
    if record.caption is None:
        return reject(record, "no caption")
    if not isinstance(record.caption, str):
        return reject(record, "caption not text", f"caption is {type(record.caption).__name__}")
    if not record.caption.strip():
        return reject(record, "empty caption")
    try:
        image = decode_image(record.image, record.file_name or record.key)
        if prepare_image is not None:
            image = prepare_image(image)
    except ImageError as e:
        return reject(record, IMAGE_REJECTS[1] if "too large" in str(e) else IMAGE_REJECTS[0], str(e))
    try:
        if not noun_phrases(record.caption):
            return reject(record, "no noun phrase", f"no noun phrase in {record.caption[:80]!r}")
        prompt = from_caption(record.caption)  # automatic noun phrases, every occurrence a span
    except PromptError as e:
        return reject(record, "caption unreadable", str(e))
    return Prepared(record, image, prompt, scoring_prompt(prompt, settings.score_words))


# --------------------------------------------------------------------------------------------------
# the per-shard unit
# --------------------------------------------------------------------------------------------------
@dataclass
class ShardResult:
    records: list[dict] = field(default_factory=list)   # ODVG lines, input order
    rejects: list[dict] = field(default_factory=list)

    def stats(self) -> dict:
        scores = [g["score"] for r in self.records for g in r["grounding"]["regions"]]
        hist = [0] * _HIST_BINS
        for s in scores:
            hist[min(int(s * _HIST_BINS), _HIST_BINS - 1)] += 1
        return {"records": len(self.records), "regions": len(scores), "rejects": len(self.rejects),
                "with_regions": sum(bool(r["grounding"]["regions"]) for r in self.records), "score_histogram": hist}


def _region(box, phrase: str, spans, score: float) -> dict:
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return {"bbox": [x1, y1, x2, y2], "phrase": phrase, "tokens_positive": [list(s) for s in spans],
            "score": round(float(score), 4)}


def kept_boxes(result, settings: LabelSettings) -> list[int]:
    """Indices of the boxes a pair keeps as pseudo-labels (score order): at most `max_per_phrase` per
    phrase, none thinner than `min_box_side` pixels. The threshold was applied by `predict`."""
    keep, counts = [], {}
    for i, (box, pid) in enumerate(zip(result.boxes, result.phrase_ids)):  # sorted by score
        pid = int(pid)
        if settings.max_per_phrase is not None and counts.get(pid, 0) >= settings.max_per_phrase:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 - x1 < settings.min_box_side or y2 - y1 < settings.min_box_side:
            continue
        counts[pid] = counts.get(pid, 0) + 1
        keep.append(i)
    return keep


def odvg_record(item: Prepared, result, settings: LabelSettings) -> dict:
    """The ODVG line of one labelled pair (boxes in the image's own pixels, as `predict` returns them)."""
    W, H = item.image.size
    regions = []
    for i in kept_boxes(result, settings):
        pid = int(result.phrase_ids[i])
        regions.append(_region(result.boxes[i], item.prompt.phrases[pid], item.prompt.spans[pid], result.scores[i]))
    return {"filename": item.record.file_name, "height": H, "width": W,
            "grounding": {"caption": item.record.caption, "regions": regions}}


def _predict(model, items: list[Prepared], settings: LabelSettings) -> list:
    return model.predict([it.image for it in items], [it.scoring for it in items], threshold=settings.threshold,
                         precision=settings.precision)


def label_batch(model, items: list[Prepared], settings: LabelSettings) -> tuple[list[dict], list[dict]]:
    """(ODVG lines, rejects) of one padded batch. A batch the model refuses (GLIPError) is retried pair by
    pair so that only the offending pair is rejected."""
    try:
        results = _predict(model, items, settings)
    except GLIPError:
        lines, rejects = [], []
        for it in items:
            try:
                lines.append(odvg_record(it, _predict(model, [it], settings)[0], settings))
            except GLIPError as e:
                rejects.append(reject(it.record, "model error", str(e)))
        return lines, rejects
    return [odvg_record(it, r, settings) for it, r in zip(items, results)], []


def label_items(model, items: Iterable[Prepared | dict], settings: LabelSettings, on_batch=None) -> ShardResult:
    """Label prepared items (rejects pass through), `batch_size` valid pairs at a time in input order."""
    out, pending = ShardResult(), []

    def flush():
        lines, rejects = label_batch(model, pending, settings)
        out.records.extend(lines)
        out.rejects.extend(rejects)
        if on_batch is not None:
            on_batch(len(pending), sum(len(r["grounding"]["regions"]) for r in lines), len(rejects))
        pending.clear()

    for it in items:
        if isinstance(it, dict):
            out.rejects.append(it)
            if on_batch is not None:
                on_batch(1, 0, 1)
            continue
        pending.append(it)
        if len(pending) == settings.batch_size:
            flush()
    if pending:
        flush()
    return out


@torch.no_grad()
def label_shard(model, records: Iterable[Record], settings: LabelSettings = LabelSettings(), prefetch: int = 0,
                on_batch=None) -> ShardResult:
    """Label one shard: the unit of work, a pure function of (model, records, settings). With `prefetch`
    > 0 the records are decoded in a background thread that many pairs ahead of the model."""
    settings.validate()
    model.eval()
    ready = image_preparer(model)
    items = (prepare(r, settings, ready) for r in records)
    if prefetch > 0:
        items = _background(items, prefetch)
    return label_items(model, items, settings, on_batch)


@torch.no_grad()
def label_pair(model, image, caption: str, settings: LabelSettings = LabelSettings()):
    """The pseudo-labels of one image–caption pair, made as `label_shard` makes them (the caption's noun
    phrases, the scoring words, the threshold, the per-phrase cap), as a `GroundingResult` on the caption's
    own noun-phrase prompt: its boxes are the regions an ODVG line would hold. The pair is grounded alone
    (a batch pads, which moves scores slightly, as officially). A pair the command would reject raises the
    reject's reason (PromptError for the caption, ImageError for the image)."""
    settings.validate()
    model.eval()
    item = prepare(Record(key="pair", file_name=str(image) if isinstance(image, (str, Path)) else "image",
                          image=image, caption=caption), settings)
    if isinstance(item, dict):
        err = ImageError if item["reason"] in IMAGE_REJECTS else PromptError
        raise err(item["detail"])
    result = _predict(model, [item], settings)[0]
    idx = np.asarray(kept_boxes(result, settings), dtype=np.int64)
    return dataclasses.replace(result, prompt=item.prompt, boxes=result.boxes[idx], scores=result.scores[idx],
                               phrase_ids=result.phrase_ids[idx], token_scores=result.token_scores[idx])


def _background(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a worker thread, up to `depth` ahead (decoding, rendering and noun-phrase tagging
    overlap the model, which releases the GIL). Order is kept; a worker's exception is re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work():
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            q.put((end, e))

    t = threading.Thread(target=work, name="glip-label-reader", daemon=True)
    t.start()
    try:
        while True:
            x, err = q.get()
            if x is end:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
        # let the worker leave before the interpreter does (an interrupt ends the run here): a thread still
        # inside a decoder at exit can abort the process instead of letting it exit cleanly
        t.join(timeout=10)


# --------------------------------------------------------------------------------------------------
# output: shard files and the manifest
# --------------------------------------------------------------------------------------------------
def _suffix(shard: tuple[int, int]) -> str:
    return "" if shard[1] == 1 else f".{shard[0]}-of-{shard[1]}"


def write_shard(out_dir: str | Path, name: str, result: ShardResult) -> dict:
    """Write `shards/<name>.rejects.jsonl` then `shards/<name>.jsonl` (each atomically) and return the
    manifest entry of the shard (counts, score histogram, sha256 of the ODVG file)."""
    d = Path(out_dir) / "shards"
    data = jsonl_bytes(result.records)
    atomic_write_bytes(d / f"{name}.rejects.jsonl", jsonl_bytes(result.rejects))
    atomic_write_bytes(d / f"{name}.jsonl", data)
    return {"name": name, "file": f"shards/{name}.jsonl", **result.stats(), "sha256": hashlib.sha256(data).hexdigest()}


class LabelRun:
    """The manifest of a run in `out_dir` (one per `shard=(i, n)` slice)."""

    def __init__(self, out_dir: str | Path, shard: tuple[int, int] = (0, 1)):
        self.out, self.shard = Path(out_dir), shard
        self.path = self.out / f"manifest{_suffix(shard)}.json"
        self.data: dict = {}

    def start(self, settings: dict, resume: bool) -> set[str]:
        """Load or create the manifest; the names of the shards already complete (resume only)."""
        self._check_siblings(settings)
        if self.path.is_file():
            if not resume:
                raise ConfigError(f"{self.out} already holds a labelling run ({self.path.name}); pass --resume to "
                                  "continue it or choose another --out")
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise ConfigError(f"{self.path}: not a valid manifest") from None
            if self.data.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(self.data.get("settings", {}))
                              if settings.get(k) != self.data.get("settings", {}).get(k))
                raise ConfigError(f"{self.path}: the run there used other settings ({', '.join(diff)}); resume with "
                                  "the same ones or choose another --out")
        else:
            import glip

            self.data = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "settings": settings,
                         "versions": {"glip": glip.__version__, "torch": torch.__version__}, "shards": []}
            self.save()
        done = set()
        for e in self.data["shards"]:
            p = self.out / e["file"]
            if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"]:
                done.add(e["name"])
        self.data["shards"] = [e for e in self.data["shards"] if e["name"] in done]
        return done

    def _check_siblings(self, settings: dict) -> None:
        """The other slices' manifests in the folder: slices of one run share the shard files' folder, so they must
        split the input the same way (else they label the same shards) and use the same settings."""
        mine = {k: v for k, v in settings.items() if k != "shard"}
        for other in sorted(self.out.glob("manifest*.json")):
            if other == self.path:
                continue
            try:
                theirs = json.loads(other.read_text()).get("settings", {})
            except (OSError, json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{other}: not a valid manifest") from None
            n = (theirs.get("shard") or [0, 1])[1]
            if n != self.shard[1]:
                raise ConfigError(f"{self.out} holds a labelling run split {n} way(s) ({other.name}); a slice "
                                  f"{self.shard[0]}/{self.shard[1]} would write over its shard files: use --shard I/{n} "
                                  "or choose another --out")
            if {k: v for k, v in theirs.items() if k != "shard"} != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if k != "shard" and mine.get(k) != theirs.get(k))
                raise ConfigError(f"{other}: another slice of this run used other settings ({', '.join(diff)}); "
                                  "label every slice with the same ones or choose another --out")

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")

    def add(self, entry: dict) -> None:
        self.data["shards"] = sorted([e for e in self.data["shards"] if e["name"] != entry["name"]] + [entry],
                                     key=lambda e: e["index"])
        self.save()
        rejects = b"".join((self.out / "shards" / f"{e['name']}.rejects.jsonl").read_bytes() for e in self.data["shards"])
        atomic_write_bytes(self.out / f"rejects{_suffix(self.shard)}.jsonl", rejects)

    def totals(self) -> dict:
        shards = self.data["shards"]
        hist = [sum(e["score_histogram"][k] for e in shards) for k in range(_HIST_BINS)]
        pairs = sum(e["records"] for e in shards)
        regions = sum(e["regions"] for e in shards)
        return {"shards": len(shards), "pairs": pairs, "regions": regions,
                "regions_per_pair": round(regions / max(pairs, 1), 3),
                "pairs_with_regions": sum(e["with_regions"] for e in shards),
                "rejects": sum(e["rejects"] for e in shards),
                "score_histogram": {f"{k / _HIST_BINS:.1f}-{(k + 1) / _HIST_BINS:.1f}": hist[k]
                                    for k in range(_HIST_BINS) if hist[k]}}


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" → (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m[1]), int(m[2])


# --------------------------------------------------------------------------------------------------
# the local driver
# --------------------------------------------------------------------------------------------------
def _shard_stream(shards: Iterator, settings: LabelSettings, depth: int, prepare_image=None):
    """(shard, iterator of its prepared items) for each shard, prepared by one background worker that runs
    ahead across shard boundaries. Each item iterator must be consumed before the next shard is taken."""
    marker_start, marker_end = object(), object()

    def flat():
        for shard in shards:
            yield marker_start, shard
            for r in shard:
                yield None, prepare(r, settings, prepare_image)
            yield marker_end, shard

    stream = _background(flat(), depth) if depth > 0 else flat()
    for kind, shard in stream:
        assert kind is marker_start

        def items():
            for k, x in stream:
                if k is marker_end:
                    return
                yield x

        yield shard, items()


@dataclass
class RunPlan:
    """What every driver (this local one, `glip.label_ray`) sets up before the first shard and does after
    each: the validated settings, the opened dataset, the manifest and the shards still to label."""

    settings: LabelSettings
    shard: tuple[int, int]
    out: Path
    ds: Dataset
    run: LabelRun
    done: set[str]
    records_per_shard: int

    def todo(self) -> Iterator[Shard]:
        """This slice's input shards that the manifest does not list as complete, in input order."""
        i, n = self.shard
        return (s for s in self.ds.shards(self.records_per_shard) if s.index % n == i and s.name not in self.done)

    def total_pairs(self) -> int | None:
        size = self.ds.size
        return None if size is None else -(-size // self.shard[1]) if self.shard[1] > 1 else size

    def add(self, s: Shard, entry: dict) -> None:
        """Record a written shard (`write_shard`'s entry) in the manifest."""
        self.run.add({"index": s.index, **entry,
                      "input": s.source if s.source != self.ds.spec else f"{self.ds.spec}#{s.name}"})

    def finish(self, counts: dict, reasons: dict, n_done: int, seconds: float, **extra) -> dict:
        """The summary (written to summary.json): totals of the manifest and this run's counts."""
        summary = {**self.run.totals(), "this_run": {"shards": n_done, "shards_skipped": len(self.done), **counts,
                                                     "rejects_by_reason": dict(sorted(reasons.items())),
                                                     "seconds": round(seconds, 2),
                                                     "pairs_per_s": round((counts["pairs"] + counts["rejects"]) / seconds, 2)
                                                     if seconds > 0 else None, **extra},
                   "out": str(self.out), "manifest": self.run.path.name}
        atomic_write_text(self.out / f"summary{_suffix(self.shard)}.json", json.dumps(summary, indent=1) + "\n")
        return summary


def check_labelable(ds: Dataset) -> Dataset:
    """`ds`, if it has captions to label; DataError for a detection dataset (category names, no captions)."""
    if getattr(ds, "task", None) == "detection":
        raise DataError(f"{ds.spec}: labelling needs image–caption pairs, and this is a detection dataset (boxes "
                        "with category names, no captions): give a folder:, jsonl:, csv: or webdataset: corpus")
    return ds


def plan_run(data: str | Dataset, out: str | Path, settings: LabelSettings | None = None, *,
             shard: tuple[int, int] | str = (0, 1), resume: bool = False, records_per_shard: int = RECORDS_PER_SHARD,
             model_name: str = "", device: torch.device | None = None, **kw) -> RunPlan:
    """Validate the settings (against the model's `device` when given), prove `out` writable, open the dataset
    and start (or resume) the manifest."""
    if settings is not None and kw:
        raise ConfigError("give either settings or its fields, not both")
    try:
        settings = (settings or LabelSettings(**kw)).validate()
    except TypeError as e:
        raise ConfigError(f"unknown labelling setting: {e}") from None
    if device is not None:  # a precision the device cannot run would reject every pair
        check_precision(settings.precision, device)
    shard = parse_shard(shard) if isinstance(shard, str) else tuple(shard)
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard must be (I, N) with 0 <= I < N, got {shard}")
    out = check_writable(out)                       # before any work
    ds = check_labelable(open_dataset(data))
    run = LabelRun(out, shard)
    done = run.start({"model": model_name, "data": ds.spec, "records_per_shard": records_per_shard,
                      "shard": list(shard), **settings.to_json()}, resume)
    return RunPlan(settings, shard, out, ds, run, done, records_per_shard)


@torch.no_grad()
def label(model, data: str | Dataset, out: str | Path, settings: LabelSettings | None = None, *,
          shard: tuple[int, int] | str = (0, 1), resume: bool = False, records_per_shard: int = RECORDS_PER_SHARD,
          model_name: str = "", progress: bool = True, prefetch: int = 32, **kw) -> dict:
    """Label a dataset (spec or Dataset) into `out`: see the module docstring. Settings come as a
    `LabelSettings` or as its fields (`threshold=`, `batch_size=`, ...). Returns the summary (also written
    to summary.json): pairs, regions, regions per pair, score histogram, rejects by reason, time."""
    device = next(model.parameters()).device if hasattr(model, "parameters") else None
    plan = plan_run(data, out, settings, shard=shard, resume=resume, records_per_shard=records_per_shard,
                    model_name=model_name, device=device, **kw)
    settings = plan.settings
    model.eval()
    from tqdm import tqdm

    bar = tqdm(total=plan.total_pairs(), disable=not progress, desc="label", unit="pair", dynamic_ncols=True)
    counts = {"pairs": 0, "regions": 0, "rejects": 0}

    def on_batch(n, regions, rejects):
        counts["pairs"] += n - rejects
        counts["regions"] += regions
        counts["rejects"] += rejects
        bar.update(n)
        bar.set_postfix(boxes=counts["regions"], rejects=counts["rejects"], refresh=False)

    t0 = time.perf_counter()
    reasons: dict[str, int] = {}
    n_done = 0
    for s, items in _shard_stream(plan.todo(), settings, prefetch, image_preparer(model)):
        result = label_items(model, items, settings, on_batch)
        plan.add(s, write_shard(plan.out, s.name, result))
        for r in result.rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        n_done += 1
    bar.close()
    return plan.finish(counts, reasons, n_done, time.perf_counter() - t0)


def format_summary(s: dict) -> str:
    t = s["this_run"]
    lines = [f"labelled {s['pairs']} pairs in {s['shards']} shards: {s['regions']} regions "
             f"({s['regions_per_pair']} per pair, {s['pairs_with_regions']} pairs with at least one), "
             f"{s['rejects']} rejects",
             f"this run: {t['shards']} shards ({t['shards_skipped']} already done), {t['seconds']} s, "
             f"{t['pairs_per_s']} pairs/s"]
    if t["rejects_by_reason"]:
        lines.append("rejects: " + ", ".join(f"{k} {v}" for k, v in t["rejects_by_reason"].items()))
    if s["score_histogram"]:
        lines.append("scores: " + "  ".join(f"{k}: {v}" for k, v in s["score_histogram"].items()))
    lines.append(f"wrote {s['out']}/shards/*.jsonl, {s['manifest']}")
    return "\n".join(lines)


__all__ = ["ARTICLES", "LabelRun", "LabelSettings", "RunPlan", "Prepared", "ShardResult", "check_labelable",
           "check_writable", "format_summary",
           "known_vocabulary", "known_word_prompt", "label", "label_batch", "label_items", "label_shard",
           "parse_shard", "plan_run", "prepare", "read_vocabulary", "resolve_score_words", "scoring_prompt", "write_shard"]
