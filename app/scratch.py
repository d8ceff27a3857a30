"""The app's scratch folder (generated images, downloads for the user, decoded data URLs) in the system temp dir.

Named `glip_app_<pid>_<random>` so that a later start can tell a dead instance's folder (removed) from a
running one's (kept). Removed on a normal exit (`close()`, also registered with atexit); a bounded number of
per-request subfolders are kept, the oldest deleted first.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

PREFIX = "glip_app_"
STALE_UNOWNED_S = 24 * 3600     # folders without a live owner's pid in the name: removed when this old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: str | Path | None = None) -> list[Path]:
    """Remove scratch folders of app processes that are gone (and unowned ones older than a day)."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for d in root.glob(PREFIX + "*"):
        if not d.is_dir():
            continue
        parts = d.name[len(PREFIX):].split("_", 1)
        pid = int(parts[0]) if parts[0].isdigit() and len(parts) == 2 else None
        try:
            stale = (not _alive(pid)) if pid is not None else time.time() - d.stat().st_mtime > STALE_UNOWNED_S
        except OSError:
            continue
        if stale and pid != os.getpid():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class Scratch:
    def __init__(self, keep: int = 256, root: str | Path | None = None):
        self.removed_stale = clean_stale(root)
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_", dir=root))
        self.dirs: deque[Path] = deque()
        self.keep = keep
        self.lock = threading.Lock()
        atexit.register(self.close)

    def new_dir(self) -> Path:
        d = self.root / uuid.uuid4().hex[:12]
        d.mkdir(parents=True)
        with self.lock:
            self.dirs.append(d)
            while len(self.dirs) > self.keep:
                shutil.rmtree(self.dirs.popleft(), ignore_errors=True)
        return d

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
