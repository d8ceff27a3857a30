"""Files from the Hugging Face Hub without its client library: the resolve URLs
`{HF_ENDPOINT}/{repo}/resolve/{revision}/{filename}` (HF_ENDPOINT defaults to https://huggingface.co;
HF_HUB_OFFLINE=1 forbids downloads), a resumable download (`dest.part`, continued with an HTTP Range request)
with progress and a free-disk check before the first byte, and the files already in the Hugging Face cache
(what a Space's `preload_from_hub` puts there), used in place.

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
CHUNK = 1 << 20


def default_cache() -> Path:
    """Where downloaded checkpoints and their converted copies live: $GLIP_CACHE, else ~/.cache/glip-explorer."""
    return Path(os.environ.get("GLIP_CACHE") or Path.home() / ".cache" / "glip-explorer")


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


def cached_file(repo: str, filename: str, revision: str = "main") -> Path | None:
    """`filename` of `repo` in the Hugging Face cache (`preload_from_hub`, `huggingface-cli download`), if there."""
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision
    revs = [ref.read_text().strip()] if ref.is_file() else []
    for rev in revs + [revision]:
        p = folder / "snapshots" / rev / filename
        if p.is_file():
            return p
    hits = sorted((folder / "snapshots").glob(f"*/{filename}")) if (folder / "snapshots").is_dir() else []
    return hits[0] if hits else None



def console_progress(name: str, progress: ProgressFn | None = None) -> ProgressFn:
    """A progress callback that draws a download bar on stderr (and passes every report on to `progress`)."""
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


__all__ = ["Progress", "ProgressFn", "download", "resolve_url", "endpoint", "offline", "check_free_space",
           "human_bytes", "default_cache", "hf_cache_dir", "cached_file", "console_progress"]
