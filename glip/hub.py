"""The released GLIP checkpoints on the Hugging Face Hub: download once (resumable, with progress), convert
once into this project's format, and cache the result.

Files are fetched from the Hub's resolve URLs, `{HF_ENDPOINT}/{repo}/resolve/{revision}/{filename}`
(HF_ENDPOINT defaults to https://huggingface.co; HF_HUB_OFFLINE=1 forbids downloads), into
`<cache>/downloads/<file>.part` (`glip.download`), resumed with an HTTP Range request after an interruption. The free disk
space is checked before the first byte is written (the download plus its converted copy). A file that a
Space preloaded into the Hugging Face cache (`preload_from_hub`) is used in place, without a download.
The official `.pth` (model + EMA + optimizer, ~4x the weights) is loaded (`GLIP.from_pretrained`) and saved
(`save_pretrained`) into `<cache>/<slug>/` (safetensors + config.json, optionally fp16) and then deleted.

Every failure is a `CheckpointError` with a one-line message that says what to do next.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .download import (  # noqa: F401 - re-exported: the hub's download side
    Progress,
    ProgressFn,
    cached_file,
    check_free_space,
    console_progress,
    default_cache,
    download,
    endpoint,
    hf_cache_dir,
    human_bytes,
    offline,
    resolve_url,
)
from .errors import CheckpointError

REPO = "GLIPModel/GLIP"


@dataclass(frozen=True)
class Release:
    """A released checkpoint: where it is, what it was trained on, and the config (a preset name, a path or
    a GLIPConfig) that fills in what the tensors do not say (text encoder head count, input size, thresholds)."""
    name: str
    filename: str
    trained_on: str
    config: object
    size: int                  # bytes of the official file (for messages and the disk check's estimate)
    note: str = ""
    repo: str = REPO
    revision: str = "main"

    @property
    def url(self) -> str:
        return resolve_url(self.repo, self.filename, self.revision)

    @property
    def slug(self) -> str:
        return re.sub(r"[^\w.-]+", "_", f"{self.repo}--{Path(self.filename).stem}")


RELEASES: tuple[Release, ...] = (
    Release("GLIP-T (A)", "glip_a_tiny_o365.pth", "Objects365", "glip-t-a", 2_430_000_000,
            "no deep fusion (the dot product of plain BERT and Swin features)"),
    Release("GLIP-T (C)", "glip_tiny_model_o365_goldg.pth", "Objects365 + GoldG", "glip-t", 3_710_104_213,
            "the paper's teacher: it pseudo-labelled the web captions GLIP-T learned from"),
    Release("GLIP-T", "glip_tiny_model_o365_goldg_cc_sbu.pth", "Objects365 + GoldG + CC3M + SBU (pseudo-labels)",
            "glip-t", 3_710_104_213, "the student of GLIP-T (C): better on rare concepts (LVIS MiniVal APr 14.3 → "
            "17.6), not on COCO (46.7 vs 46.6)"),
    Release("GLIP-L", "glip_large_model.pth", "FourODs + GoldG + CC3M + CC12M + SBU (pseudo-labels)", "glip-l",
            6_896_153_761, "the large model (Swin-L)"),
)


def release(name: str) -> Release:
    for r in RELEASES:
        if name in (r.name, r.filename):
            return r
    raise CheckpointError(f"Unknown released checkpoint {name!r}; known: {[r.name for r in RELEASES]}")


# --- download + convert, cached --------------------------------------------------------------------------
def converted_dir(rel: Release, cache: str | Path, fp16: bool = False) -> Path:
    return Path(cache) / (rel.slug + ("-fp16" if fp16 else ""))


def is_cached(rel: Release, cache: str | Path, fp16: bool = False) -> bool:
    d = converted_dir(rel, cache, fp16)
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def fetch(rel: Release, cache: str | Path, fp16: bool = False, progress: ProgressFn | None = None,
          console: bool = False) -> Path:
    """The release converted into our format under `cache` (downloading and converting it first if needed).
    `console=True` also shows a progress bar on stderr."""
    out = converted_dir(rel, cache, fp16)
    if is_cached(rel, cache, fp16):
        return out
    cache = Path(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"Cannot create the model cache {cache} ({e.strerror or e}); set GLIP_CACHE to a "
                              "writable folder.") from None
    report = console_progress(rel.name, progress) if console else progress
    src = preloaded(rel)
    downloaded = src is None
    if src is None:
        if offline():
            raise CheckpointError(f"{rel.name} is not downloaded and downloads are off (HF_HUB_OFFLINE is set); "
                                  f"get {rel.url} yourself and load the file directly.")
        # the converted copy is about a quarter of the official file (weights only), an eighth in fp16
        src = download(rel.url, cache / "downloads" / rel.filename, report, reserve=rel.size // (8 if fp16 else 4))
    if report:
        report(Progress("convert"))
    from .model import GLIP

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        GLIP.from_pretrained(src, config=rel.config, device=None).save_pretrained(tmp, fp16=fp16)
    except CheckpointError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if downloaded:  # a corrupt download must not be converted again on the next try
            Path(src).unlink(missing_ok=True)
        raise CheckpointError(f"{rel.name}: the downloaded file could not be converted ({e})") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{rel.name}: could not write the converted copy to {cache} ({e.strerror or e}).") from None
    if is_cached(rel, cache, fp16):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    if downloaded:
        Path(src).unlink(missing_ok=True)
    if report:
        report(Progress("done"))
    return out


def preloaded(rel: Release) -> Path | None:
    """The release's file in the Hugging Face cache, if a Space preloaded it (or `huggingface-cli download`)."""
    return cached_file(rel.repo, rel.filename, rel.revision)


__all__ = ["Release", "RELEASES", "release", "Progress", "download", "fetch", "preloaded", "is_cached",
           "converted_dir", "resolve_url", "endpoint", "offline", "check_free_space", "human_bytes"]
