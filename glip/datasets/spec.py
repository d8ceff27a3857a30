"""The dataset spec: one string names a dataset everywhere one is taken (CLI and Python).

    SPEC     = SCHEME ":" BODY [ "?" OPTIONS ]        OPTIONS = key=value ("&" key=value)*

    webdataset:PATTERN          tar shards: one .tar, a brace pattern (shards/{00000..00127}.tar),
                                a glob (shards/*.tar) or a folder of .tar files
    folder:DIR                  images with same-stem .txt captions, nested folders allowed
    jsonl:FILE  csv:FILE  tsv:FILE  parquet:FILE
                                a manifest: one row per pair, image path relative to the manifest;
                                options image=COLUMN caption=COLUMN (defaults image, caption), key=COLUMN
    coco:ANN.json[:IMAGES]      COCO instances JSON + image folder (default: the JSON's folder)
    odvg:FILE.jsonl[:IMAGES]    ODVG grounding or detection lines (FILE may be a `glip label` output
                                folder); option labelmap=FILE
    mdetr:FILE.json[:IMAGES]    MDETR-style COCO with captions and tokens_positive (Flickr30k Entities, GoldG)
    world:SPLIT:SEED[:N]        the synthetic world, rendered on the fly (N defaults to 200)

An unknown scheme, a missing file or a malformed spec is a one-line `DataError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glip.errors import DataError

from .records import Dataset

SCHEMES = ("webdataset", "folder", "jsonl", "csv", "tsv", "parquet", "coco", "odvg", "mdetr", "world")
OPTIONS = {"jsonl": {"image", "caption", "key"}, "csv": {"image", "caption", "key"},
           "tsv": {"image", "caption", "key"}, "parquet": {"image", "caption", "key"}, "odvg": {"labelmap"}}


@dataclass(frozen=True)
class Spec:
    scheme: str
    parts: tuple[str, ...]          # the BODY split on ":" (at most as many parts as the scheme takes)
    options: dict = field(default_factory=dict)
    text: str = ""


def parse_spec(text: str) -> Spec:
    if not isinstance(text, str) or ":" not in text:
        raise DataError(f"dataset spec {text!r} has no scheme: write SCHEME:..., one of {', '.join(SCHEMES)}")
    scheme, body = text.split(":", 1)
    if scheme not in SCHEMES:
        raise DataError(f"unknown dataset scheme {scheme!r} in {text!r}: use one of {', '.join(SCHEMES)}")
    body, _, query = body.partition("?")
    options = {}
    for item in filter(None, query.split("&")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise DataError(f"{text}: option {item!r} is not key=value")
        if k not in OPTIONS.get(scheme, set()):
            allowed = ", ".join(sorted(OPTIONS.get(scheme, ()))) or "none"
            raise DataError(f"{text}: unknown option {k!r} for {scheme} (allowed: {allowed})")
        options[k] = v
    max_parts = {"coco": 2, "odvg": 2, "mdetr": 2, "world": 3}.get(scheme, 1)
    parts = tuple(body.split(":", max_parts - 1))
    if not parts[0]:
        raise DataError(f"{text}: nothing after {scheme}:")
    if scheme == "world" and len(parts) < 2:
        raise DataError(f"{text}: write world:SPLIT:SEED[:N]")
    return Spec(scheme, parts, options, text)


def _existing(path: str, spec: Spec, what: str = "file") -> Path:
    p = Path(path).expanduser()
    ok = p.is_dir() if what == "folder" else p.is_file()
    if not ok:
        if p.exists():  # the path is there, but the other kind
            raise DataError(f"{spec.text}: {p} is a {'file' if p.is_file() else 'folder'}, not a {what}")
        raise DataError(f"{spec.text}: {what} not found: {p}")
    return p


def open_dataset(spec: str | Dataset) -> Dataset:
    """A `Dataset` for a spec string (a Dataset passes through)."""
    if isinstance(spec, Dataset):
        return spec
    s = parse_spec(spec)
    if s.scheme == "world":
        from .world import WorldDataset

        split, seed = s.parts[0], s.parts[1]
        n = s.parts[2] if len(s.parts) > 2 else "200"
        try:
            seed_i, n_i = int(seed), int(n)
        except ValueError:
            raise DataError(f"{s.text}: SEED and N must be integers (world:SPLIT:SEED[:N])") from None
        return WorldDataset(split, seed_i, n_i, spec=s.text)
    if s.scheme == "webdataset":
        from .webdataset import WebDataset, expand_shards

        return WebDataset(expand_shards(s.parts[0], s.text), spec=s.text)
    if s.scheme == "folder":
        from .folder import FolderDataset

        return FolderDataset(_existing(s.parts[0], s, "folder"), spec=s.text)
    if s.scheme in ("jsonl", "csv", "tsv", "parquet"):
        from .manifest import ManifestDataset

        return ManifestDataset(_existing(s.parts[0], s), s.scheme, spec=s.text, **s.options)
    images = Path(s.parts[1]).expanduser() if len(s.parts) > 1 and s.parts[1] else None
    ann = Path(s.parts[0]).expanduser()
    if not (ann.is_file() or (s.scheme == "odvg" and ann.is_dir())):
        raise DataError(f"{s.text}: file not found: {ann}")
    if images is not None and not images.is_dir():
        raise DataError(f"{s.text}: image folder not found: {images}")
    if s.scheme == "coco":
        from .coco import CocoDataset

        return CocoDataset(ann, images, spec=s.text)
    if s.scheme == "mdetr":
        from .mdetr import MdetrDataset

        return MdetrDataset(ann, images, spec=s.text)
    from .odvg import OdvgDataset

    labelmap = _existing(s.options["labelmap"], s) if "labelmap" in s.options else None
    return OdvgDataset(ann, images, labelmap=labelmap, spec=s.text)


__all__ = ["SCHEMES", "Spec", "open_dataset", "parse_spec"]
