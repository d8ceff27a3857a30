"""Which models the app offers, and how they are loaded without making anyone wait for someone else's download.

Menu: a local checkpoint (`--model PATH` / `GLIP_MODEL`), the two shipped toy models, and the released GLIP
checkpoints (`glip.hub.RELEASES`), each with what it was trained on. Loading runs in one background thread
per model; the manager's lock only guards its dictionaries, never a load. A model that needs the network
(a release not yet converted) is never waited for inside a request: the request is told it is not ready
(with the download's progress) and runs another model, saying so. A failed load is remembered for
`failure_ttl` seconds, so every pick of it gets the same message at once instead of a new attempt.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glip import GLIP, get_preset, hub
from glip.checkpoint import shipped_models
from glip.errors import CheckpointError

log = logging.getLogger("glip.app")
STUDENT, TEACHER = "toy-student", "toy-teacher"
FAST_FAIL_S = 1.0
TOYS = (STUDENT, TEACHER)
TOY_ABOUT = {
    STUDENT: "toy · the synthetic world's coloured shapes, gold data + three rounds of its own pseudo-labels",
    TEACHER: "toy · the synthetic world's coloured shapes, gold data only",
}
LOCAL_HINT = ("To use a file you already have: `python app.py --model PATH` or `GLIP_MODEL=PATH python app.py` "
              "(PATH: an official .pth or a converted folder).")
FALLBACK_NOTE = ("**Demo mode:** the shipped toy models (`assets/{names}`) are not there, so this app runs a "
                 "*randomly initialised* toy GLIP (with a pretrained MiniLM text encoder). Every view works and shows "
                 "the real mechanics, but the boxes and scores are meaningless.")


def cache_dir() -> Path:
    return hub.default_cache()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Choice:
    name: str                         # the menu label
    kind: str                         # "local" | "toy" | "release"
    about: str                        # what it is / what it was trained on
    release: hub.Release | None = None
    path: str | None = None

    @property
    def toy(self) -> bool:
        return self.kind == "toy"


class ModelNotReady(CheckpointError):
    """A model that is still being downloaded or converted (the message carries the progress)."""


@dataclass
class LoadStatus:
    state: str = "idle"               # idle | downloading | converting | loading | ready | failed
    progress: hub.Progress | None = None
    message: str = ""
    since: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> bool:
        return self.state in ("downloading", "converting", "loading")


@dataclass
class Resolved:
    model: GLIP
    name: str                         # the model that runs
    asked: str                        # the model that was picked
    note: str = ""                    # why they differ (empty when they do not)


class ModelManager:
    """Loads models on demand (one background thread each) and keeps at most `max_models` (LRU)."""

    def __init__(self, local: str | None = None, max_models: int = 3, cache: str | Path | None = None,
                 releases: tuple[hub.Release, ...] = hub.RELEASES, failure_ttl: float = 600.0, fp16: bool = False):
        self.local = local or os.environ.get("GLIP_MODEL") or None
        self.max_models = max_models
        self.cache = Path(cache) if cache else cache_dir()
        self.failure_ttl = failure_ttl
        self.fp16 = fp16
        self.models: OrderedDict[str, GLIP] = OrderedDict()
        self.status_of: dict[str, LoadStatus] = {}
        self.done: dict[str, threading.Event] = {}
        self.fallback: set[str] = set()   # toy names running random weights
        self.lock = threading.Lock()
        self.menu: OrderedDict[str, Choice] = OrderedDict()
        if self.local:
            label = f"local: {Path(self.local).name}"
            self.menu[label] = Choice(label, "local", f"local checkpoint {self.local}", path=self.local)
        for name in TOYS:
            self.menu[name] = Choice(name, "toy", TOY_ABOUT[name])
        for rel in releases:
            self.menu[rel.name] = Choice(rel.name, "release", f"{rel.trained_on} — {rel.note}" if rel.note else rel.trained_on,
                                         release=rel)

    # --- what can be chosen --------------------------------------------------------------------------------
    def choices(self) -> list[str]:
        return list(self.menu)

    def choice(self, name: str) -> Choice:
        if name not in self.menu:
            raise CheckpointError(f"Unknown model {name!r}; choose one of {self.choices()}")
        return self.menu[name]

    def is_toy(self, name: str) -> bool:
        return name in self.menu and self.menu[name].toy

    def on_disk(self, name: str) -> bool:
        """Loadable without the network and without a conversion (toy, local, converted release)."""
        c = self.menu.get(name)
        if c is None:
            return False
        if c.kind != "release":
            return True
        return hub.is_cached(c.release, self.cache, self.fp16)

    def local_real(self) -> list[str]:
        """Real GLIPs that need no download: converted releases, then a Space's preloaded files."""
        rels = [n for n, c in self.menu.items() if c.kind == "release"]
        return ([n for n in rels if self.on_disk(n)] +
                [n for n in rels if not self.on_disk(n) and hub.preloaded(self.menu[n].release)])

    def default(self) -> str:
        """A local checkpoint, else a real GLIP already on this machine (GLIP-T first), else the toy student."""
        if self.local:
            return next(iter(self.menu))
        real = self.local_real()
        for name in ("GLIP-T",) + tuple(real):
            if name in real:
                return name
        return STUDENT

    def missing_shipped(self) -> list[str]:
        have = shipped_models()
        return [n for n in TOYS if n not in have]

    def banner(self) -> str:
        missing = self.missing_shipped()
        return FALLBACK_NOTE.format(names=", ".join(missing)) if missing else ""

    def is_fallback(self, name: str) -> bool:
        return name in self.fallback or (name in TOYS and name in self.missing_shipped())

    # --- loading ---------------------------------------------------------------------------------------------
    def status(self, name: str) -> LoadStatus:
        with self.lock:
            if name in self.models:
                return LoadStatus("ready")
            return self.status_of.get(name, LoadStatus())

    def start(self, name: str) -> LoadStatus:
        """Begin loading `name` in the background (no-op if it is loaded, loading, or failed recently)."""
        self.choice(name)
        with self.lock:
            self._start_locked(name)
            return self.status_of.get(name, LoadStatus("ready"))

    def _start_locked(self, name: str) -> bool:
        """Start a load unless one is running, done, or failed within `failure_ttl`; True if it started one."""
        if name in self.models:
            return False
        st = self.status_of.get(name)
        if st is not None and (st.busy or (st.state == "failed" and time.monotonic() - st.since < self.failure_ttl)):
            return False
        self.status_of[name] = LoadStatus("loading")
        self.done[name] = threading.Event()
        threading.Thread(target=self._worker, args=(name, self.done[name]), name=f"load {name}", daemon=True).start()
        return True

    def get(self, name: str | None = None) -> GLIP:
        """The model for a menu label. Waits for a load from disk; raises ModelNotReady while a release is being
        downloaded or converted, and CheckpointError (the remembered message) if loading failed."""
        name = name or self.default()
        c = self.choice(name)
        with self.lock:
            if name in self.models:
                self.models.move_to_end(name)
                return self.models[name]
            self._start_locked(name)
            st, done = self.status_of[name], self.done[name]
        if st.state == "failed":
            raise CheckpointError(st.message)
        if c.kind == "release" and not self.on_disk(name):
            # a download is never waited for; an attempt that has not reached the server yet gets a moment to
            # fail fast (offline, 404, connection refused) so that the first answer is the real one
            if not done.wait(FAST_FAIL_S if st.state == "loading" else 0):
                raise ModelNotReady(self.describe(name))
        done.wait()
        with self.lock:
            if name in self.models:
                return self.models[name]
            raise CheckpointError(self.status_of[name].message or f"{name} could not be loaded.")

    def wait(self, name: str) -> GLIP:
        """Load `name` now, downloading and converting it if needed (startup: the default model)."""
        self.start(name)
        with self.lock:
            done = self.done.get(name)
        if done is not None:
            done.wait()
        return self.get(name)

    def resolve(self, name: str | None, fallback: str | None = None) -> Resolved:
        """The picked model if it can run now, else `fallback` (default: the toy student), with a note saying
        which model ran and why."""
        name = name or self.default()
        try:
            return Resolved(self.get(name), name, name)
        except CheckpointError as e:
            other = fallback or STUDENT
            if other == name:
                raise
            return Resolved(self.get(other), other, name, f"{e} — **{other}** ran instead.")

    def _worker(self, name: str, done: threading.Event) -> None:
        c = self.menu[name]
        try:
            model = self._load(c)
        except Exception as e:  # noqa: BLE001 - remembered and shown to every user of this model
            msg = str(e) if isinstance(e, CheckpointError) else f"{e.__class__.__name__}: {e}"
            if not isinstance(e, CheckpointError):
                log.exception("loading %s failed", name)
            if c.kind in ("release", "local"):
                msg = f"{name} could not be loaded: {msg} {LOCAL_HINT}"
            with self.lock:
                self.status_of[name] = LoadStatus("failed", message=msg)
            log.warning("%s", msg)
        else:
            with self.lock:
                self.models[name] = model
                while len(self.models) > self.max_models:
                    self.models.popitem(last=False)
                self.status_of[name] = LoadStatus("ready")
        finally:
            done.set()

    def _progress(self, name: str):
        def report(p: hub.Progress) -> None:
            state = {"download": "downloading", "convert": "converting"}.get(p.stage, "loading")
            with self.lock:
                self.status_of[name] = LoadStatus(state, p, since=self.status_of.get(name, LoadStatus()).since)
        return report

    def _load(self, c: Choice) -> GLIP:
        dev = device()
        if c.kind == "local":
            return GLIP.from_pretrained(c.path, device=dev)
        if c.kind == "toy":
            if c.name in shipped_models():
                return GLIP.from_pretrained(c.name, device=dev)
            self.fallback.add(c.name)
            return random_toy(seed=0 if c.name == STUDENT else 1).to(dev)
        folder = hub.fetch(c.release, self.cache, fp16=self.fp16, progress=self._progress(c.name), console=True)
        with self.lock:
            self.status_of[c.name] = LoadStatus("loading")
        return GLIP.from_pretrained(str(folder), device=dev)

    def notes(self, names=None) -> str:
        """`describe` of each model (of `names`, default the whole menu) that is on its way (downloading,
        converting, loading) or failed: what the page says about models; one that simply loads on first use
        needs no note."""
        names = self.menu if names is None else dict.fromkeys(names)
        return "\n\n".join(self.describe(n) for n in names
                            if n in self.menu and (self.status(n).busy or self.status(n).state == "failed"))

    def describe(self, name: str) -> str:
        """One line on a model's state, for the UI: ready / downloading 40% … / failed: why."""
        st = self.status(name)
        if st.state == "ready":
            return f"{name} is ready."
        if st.state == "downloading" and st.progress:
            return f"{name} is downloading: {st.progress}. It will be used as soon as it is ready."
        if st.state == "converting":
            return f"{name} is downloaded and being converted to this project's format (once)."
        if st.state == "loading":
            return f"{name} is loading."
        if st.state == "failed":
            return st.message
        c = self.menu.get(name)
        if c and c.kind == "release" and not self.on_disk(name):
            return f"{name} is not downloaded yet ({hub.human_bytes(c.release.size)})."
        return f"{name} is not loaded yet."


def random_toy(seed: int = 0) -> GLIP:
    """A random-weights toy GLIP with the pretrained MiniLM text encoder (the app's stand-in)."""
    from glip.language import load_pretrained_text_encoder

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GLIP(get_preset("toy"))
    finally:
        torch.random.set_rng_state(state)
    load_pretrained_text_encoder(model.language_backbone, "all-MiniLM-L6-v2")
    # Random heads score every box at about the 0.01 prior, under the 0.05 candidate filter: the app predicts
    # with candidate_threshold=0 for it (`Core.predict`); fewer candidates keep NMS cheap.
    model.config = model.config.replace(pre_nms_top_n=100)
    return model.eval()
