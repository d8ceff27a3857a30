"""glip.hub against a local stand-in for the Hugging Face Hub: resolve URLs, progress, resume after a dropped
connection, the free-disk check, a full disk, 404, an unreachable host, conversion once + cache, a Space's
preloaded file, offline mode.

`FakeHub` (also used by the app tests) is an HTTP server thread on 127.0.0.1 that answers
`/{repo}/resolve/{revision}/{filename}` with Range support, and can drop a connection part-way, throttle, or
hold a download until released. `official_checkpoint` writes a synthetic official-layout `.pth` (DDP prefix,
EMA and optimizer entries) of a GLIP with reduced widths.
"""
from __future__ import annotations

import http.server
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import glip.download
from glip import GLIP, GLIPConfig, get_preset, hub
from glip.errors import CheckpointError

# a GLIP with the official layout and reduced widths; inference_th 0 so that random weights give boxes
SMALL = GLIPConfig(swin_embed_dim=16, swin_depths=(2, 2, 2, 2), swin_num_heads=(1, 2, 4, 8), channels=32,
                   num_dyhead_blocks=2, fusion_embed_dim=64, max_query_len=64, min_size_test=96, max_size_test=128,
                   inference_th=0.0, pre_nms_top_n=50, name="glip-t-small",
                   bert=dict(get_preset("glip-t").bert, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, vocab_size=30522))


def official_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random official-layout checkpoint: {'model': 'module.'-prefixed state dict, 'model_ema', 'optimizer'}."""
    torch.manual_seed(seed)
    model = GLIP(SMALL).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.2) + (1.0 if "norm" in name.lower() else 0.0))
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    sd["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": sd, "model_ema": sd, "optimizer": {"state": {}, "param_groups": []}, "iteration": 1}, path)
    return path


def small_release(name: str = "GLIP-T", filename: str = "glip_tiny_model_o365_goldg_cc_sbu.pth") -> hub.Release:
    """A catalog entry for a real release's file name, converted with the small config."""
    real = hub.release(name)
    return hub.Release(real.name, filename, real.trained_on, SMALL, 0, real.note)


class FakeHub:
    """Serves files at /{repo}/resolve/{revision}/{filename}. Per file: `drop_after` (close the connection after
    that many body bytes, once), `rate` (bytes/s), `gate` (a threading.Event the body waits for after its first
    chunk). `requests` logs (path, Range header)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.rate: dict[str, float] = {}
        self.gate: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.requests: list[tuple[str, str | None]] = []
        hubself = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hubself.requests.append((self.path, self.headers.get("Range")))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                key = f"{m.group(1)}/{m.group(3)}" if m else None
                if key not in hubself.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "15")
                    self.end_headers()
                    self.wfile.write(b"Entry not found")
                    return
                data = hubself.files[key]
                start = 0
                rng = self.headers.get("Range")
                if rng and (r := re.match(r"bytes=(\d+)-", rng)):
                    start = int(r.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                drop = hubself.drop_after.pop(key, None)
                rate = hubself.rate.get(key)
                step = 64 * 1024
                for i in range(0, len(body), step):
                    if drop is not None and i >= drop:
                        self.connection.shutdown(2)  # a dropped connection, mid-body
                        return
                    try:
                        self.wfile.write(body[i:i + step])
                        self.wfile.flush()
                    except OSError:
                        return
                    if i == 0:
                        if key in hubself.started:
                            hubself.started[key].set()
                        if key in hubself.gate:
                            hubself.gate[key].wait(60)
                    if rate:
                        time.sleep(step / rate)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"{repo}/{filename}"] = data

    def count(self, filename: str) -> int:
        return sum(p.endswith("/" + filename) for p, _ in self.requests)

    def close(self) -> None:
        for g in self.gate.values():
            g.set()
        self.server.shutdown()
        self.server.server_close()




# --- URLs, offline ---------------------------------------------------------------------------------------------
def test_resolve_url_honours_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub.resolve_url("GLIPModel/GLIP", "glip_large_model.pth") == \
        "https://huggingface.co/GLIPModel/GLIP/resolve/main/glip_large_model.pth"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert hub.release("GLIP-T (C)").url == "http://mirror.local:8080/GLIPModel/GLIP/resolve/main/glip_tiny_model_o365_goldg.pth"
    assert [r.name for r in hub.RELEASES] == ["GLIP-T (A)", "GLIP-T (C)", "GLIP-T", "GLIP-L"]
    assert all(r.trained_on for r in hub.RELEASES)


def test_offline_refuses_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="downloads are off"):
        hub.fetch(hub.release("GLIP-T"), tmp_path / "cache")


# --- download ------------------------------------------------------------------------------------------------
def test_download_reports_progress(fake_hub, tmp_path):
    data = bytes(range(256)) * 12_000  # 3 MB
    fake_hub.add("o/r", "f.bin", data)
    fake_hub.rate["o/r/f.bin"] = 6e6
    seen = []
    out = hub.download(hub.resolve_url("o/r", "f.bin"), tmp_path / "f.bin", seen.append)
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == len(data) and all(p.total == len(data) for p in seen)
    assert any(p.speed > 0 and "MB/s" in str(p) and "%" in str(p) for p in seen)


def test_a_dropped_connection_resumes_with_a_range_request(fake_hub, tmp_path):
    data = np.random.default_rng(0).bytes(2_000_000)
    fake_hub.add("o/r", "f.bin", data)
    fake_hub.drop_after["o/r/f.bin"] = 1_000_000
    with pytest.raises(CheckpointError, match="interrupted at .* of 2.0 MB .*try again to resume"):
        hub.download(hub.resolve_url("o/r", "f.bin"), tmp_path / "f.bin")
    part = tmp_path / "f.bin.part"
    have = part.stat().st_size
    assert 0 < have < len(data) and part.read_bytes() == data[:have]
    out = hub.download(hub.resolve_url("o/r", "f.bin"), tmp_path / "f.bin")
    assert out.read_bytes() == data
    assert fake_hub.requests[-1][1] == f"bytes={have}-"  # resumed, not restarted


def test_404_and_unreachable_hosts_are_clear_messages(fake_hub, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"answered HTTP 404 \(not found\)"):
        hub.download(hub.resolve_url("o/r", "missing.pth"), tmp_path / "m.pth")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(CheckpointError, match="Could not reach 127.0.0.1:9 .*are you online"):
        hub.download(hub.resolve_url("o/r", "x.pth"), tmp_path / "x.pth", timeout=5)
    assert not list(tmp_path.glob("*.part"))


def test_free_disk_is_checked_before_writing(fake_hub, tmp_path, monkeypatch):
    fake_hub.add("o/r", "f.bin", b"x" * 500_000)
    real = hub.shutil.disk_usage

    def tiny(path):
        u = real(path)
        return type(u)(u.total, u.total - 100_000, 100_000)

    monkeypatch.setattr(hub.shutil, "disk_usage", tiny)
    with pytest.raises(CheckpointError, match=r"Not enough free disk space .*500.0 KB needed, 100.0 KB free"):
        hub.download(hub.resolve_url("o/r", "f.bin"), tmp_path / "f.bin")
    assert not (tmp_path / "f.bin.part").exists()


def test_a_disk_that_fills_up_mid_download_says_so(fake_hub, tmp_path, monkeypatch):
    import errno

    fake_hub.add("o/r", "f.bin", b"y" * 3_000_000)

    class Full:
        def __init__(self, path, append):
            self.f = open(path, "ab" if append else "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, buf):
            if self.f.tell() > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.write(buf)

    monkeypatch.setattr(glip.download, "_open_part", Full)
    with pytest.raises(CheckpointError, match="disk filled up while downloading f.bin"):
        hub.download(hub.resolve_url("o/r", "f.bin"), tmp_path / "f.bin")


# --- fetch: download + convert once + cache ---------------------------------------------------------------------
def test_fetch_converts_once_caches_and_predicts(fake_hub, tmp_path, checkpoint_bytes):
    rel = small_release()
    fake_hub.add(rel.repo, rel.filename, checkpoint_bytes)
    stages = []
    folder = hub.fetch(rel, tmp_path / "cache", progress=lambda p: stages.append(p.stage))
    assert stages[0] == "download" and stages[-2:] == ["convert", "done"]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # the official file is gone once converted
    n = fake_hub.count(rel.filename)
    assert hub.fetch(rel, tmp_path / "cache") == folder and fake_hub.count(rel.filename) == n  # cached: no request
    model = GLIP.from_pretrained(folder, device="cpu")
    assert model.config.swin_embed_dim == 16 and model.config.min_size_test == 96
    res = model.predict(np.zeros((90, 120, 3), np.uint8) + 128, "cat . dog", threshold=0.0)
    assert len(res) > 0
    half = hub.fetch(rel, tmp_path / "cache", fp16=True)
    assert half != folder and (half / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size
    assert len(GLIP.from_pretrained(half, device="cpu").predict(np.zeros((90, 120, 3), np.uint8) + 128, "cat",
                                                              threshold=0.0)) > 0


def test_a_corrupt_download_is_not_kept(fake_hub, tmp_path):
    rel = small_release()
    fake_hub.add(rel.repo, rel.filename, b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="could not be converted"):
        hub.fetch(rel, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "downloads").iterdir())
    assert not hub.is_cached(rel, tmp_path / "cache")


def test_a_preloaded_file_is_used_without_downloading(fake_hub, tmp_path, checkpoint_bytes, monkeypatch):
    rel = small_release()
    snap = tmp_path / "hf-cache" / "models--GLIPModel--GLIP" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / rel.filename).write_bytes(checkpoint_bytes)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Space may run offline after the build step
    assert hub.preloaded(rel) == snap / rel.filename
    folder = hub.fetch(rel, tmp_path / "cache")
    assert hub.is_cached(rel, tmp_path / "cache") and fake_hub.requests == []
    assert (snap / rel.filename).is_file()  # the Hugging Face cache is not ours to delete
    assert folder.is_dir()
