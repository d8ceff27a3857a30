"""The released GLIP checkpoints on the Hugging Face Hub: download once (resumable, with progress), convert
once into this project's format, and cache the result.

Files are fetched from the Hub's resolve URLs, `{HF_ENDPOINT}/{repo}/resolve/{revision}/{filename}`
(HF_ENDPOINT defaults to https://huggingface.co; HF_HUB_OFFLINE=1 forbids downloads), into
`<cache>/downloads/<file>.part`, resumed with an HTTP Range request after an interruption. The free disk
space is checked before the first byte is written (the download plus its converted copy). A file that a
Space preloaded into the Hugging Face cache (`preload_from_hub`) is used in place, without a download.
The official `.pth` (model + EMA + optimizer, ~4x the weights) is loaded (`GLIP.from_pretrained`) and saved
(`save_pretrained`) into `<cache>/<slug>/` (safetensors + config.json, optionally fp16) and then deleted.

Every failure is a `CheckpointError` with a one-line message that says what to do next.
"""
from __future__ import annotations

import errno
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO = "GLIPModel/GLIP"
CHUNK = 1 << 20


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


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(filename)}"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


# --- progress --------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class Progress:
    stage: str                # "download" | "convert" | "done"
    done: int = 0             # bytes on disk so far (a resumed download starts at what the .part held)
    total: int | None = None  # bytes of the whole file, when the server says
    speed: float = 0.0        # bytes per second, over the last few seconds

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None

    def __str__(self) -> str:
        if self.stage == "convert":
            return "converting to safetensors"
        if self.stage == "done":
            return "ready"
        of = f" / {human_bytes(self.total)} ({100 * self.fraction:.0f}%)" if self.total else ""
        return f"{human_bytes(self.done)}{of} · {human_bytes(self.speed)}/s"


ProgressFn = Callable[[Progress], None]


class _Rate:
    """Bytes per second over a sliding window of a few seconds."""

    def __init__(self, window: float = 3.0):
        self.window, self.points = window, []

    def __call__(self, done: int) -> float:
        now = time.monotonic()
        self.points = [(t, d) for t, d in self.points if now - t <= self.window] + [(now, done)]
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


# --- download --------------------------------------------------------------------------------------------
def _open_part(path: Path, append: bool):
    return open(path, "ab" if append else "wb")


def _total_from(resp, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size) from a 200 or 206 answer."""
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m:
            raise CheckpointError(f"{resp.url}: the server answered a resume request without a usable Content-Range")
        start, total = int(m.group(1)), m.group(2)
        return start, (int(total) if total != "*" else None)
    length = resp.headers.get("Content-Length")
    return 0, (int(length) if length else None)


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"Not enough free disk space in {folder}: {human_bytes(need)} needed, "
                              f"{human_bytes(free)} free. Free some space (or set GLIP_CACHE to another disk) and try again.")


def download(url: str, dest: str | Path, progress: ProgressFn | None = None, reserve: int = 0,
             timeout: float = 30.0) -> Path:
    """`url` → `dest`, through `dest.part` (resumed with a Range request if it exists). `reserve`: bytes that
    must stay free besides the file (for its converted copy). Returns `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "glip-explorer", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    name = Path(urllib.parse.urlparse(url).path).name
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the .part is the whole file
            os.replace(part, dest)
            return dest
        what = {401: "needs a login", 403: "access refused", 404: "not found"}.get(e.code, e.reason)
        raise CheckpointError(f"Could not download {name}: {url} answered HTTP {e.code} ({what}).") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(f"Could not reach {urllib.parse.urlparse(url).netloc} to download {name} ({reason}): "
                              "are you online?") from None
    with resp:
        start, total = _total_from(resp, have)
        if start != have:  # the server ignored the range: start over
            have = 0
        check_free_space(dest.parent, (total - have if total else 0) + reserve)
        rate, done, last = _Rate(), have, 0.0
        rate(done)
        if progress:
            progress(Progress("download", done, total, 0.0))
        try:
            with _open_part(part, append=have > 0) as f:
                while True:
                    try:
                        buf = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                        raise _Interrupted(e) from None
                    if not buf:
                        break
                    f.write(buf)
                    done += len(buf)
                    now = time.monotonic()
                    if progress and (now - last > 0.25 or (total and done == total)):
                        progress(Progress("download", done, total, rate(done)))
                        last = now
        except _Interrupted as e:
            raise CheckpointError(f"The download of {name} was interrupted at {human_bytes(done)}"
                                  + (f" of {human_bytes(total)}" if total else "")
                                  + f" ({e.cause.__class__.__name__}); try again to resume it.") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(f"The disk filled up while downloading {name} ({human_bytes(done)} written to "
                                      f"{part}); free some space and try again to resume it.") from None
            raise CheckpointError(f"Could not write {part} ({e.strerror or e}).") from None
    if total is not None and done != total:
        raise CheckpointError(f"The download of {name} was interrupted at {human_bytes(done)} of {human_bytes(total)} "
                              "(the connection closed early); try again to resume it.")
    os.replace(part, dest)
    if progress:
        progress(Progress("download", done, total or done, 0.0))
    return dest


class _Interrupted(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


# --- the Hugging Face cache (what a Space preloads) ------------------------------------------------------
def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def preloaded(rel: Release) -> Path | None:
    """The release's file in the Hugging Face cache (`preload_from_hub`, `huggingface-cli download`), if there."""
    folder = hf_cache_dir() / f"models--{rel.repo.replace('/', '--')}"
    ref = folder / "refs" / rel.revision
    revs = [ref.read_text().strip()] if ref.is_file() else []
    for rev in revs + [rel.revision]:
        p = folder / "snapshots" / rev / rel.filename
        if p.is_file():
            return p
    hits = sorted((folder / "snapshots").glob(f"*/{rel.filename}")) if (folder / "snapshots").is_dir() else []
    return hits[0] if hits else None


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
    report = _with_console(progress, rel.name) if console else progress
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


def _with_console(progress: ProgressFn | None, name: str) -> ProgressFn:
    from tqdm import tqdm

    bar = None

    def report(p: Progress) -> None:
        nonlocal bar
        if p.stage == "download":
            if bar is None:
                bar = tqdm(total=p.total, initial=p.done, unit="B", unit_scale=True, desc=f"download {name}",
                           dynamic_ncols=True)
            bar.update(p.done - bar.n)
        elif bar is not None:
            bar.close()
            bar = None
        if progress:
            progress(p)

    return report


__all__ = ["Release", "RELEASES", "release", "Progress", "download", "fetch", "preloaded", "is_cached",
           "converted_dir", "resolve_url", "endpoint", "offline", "check_free_space", "human_bytes"]
