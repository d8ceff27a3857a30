"""Shared test fixtures: the official reference fixture kept in tests/fixtures, a small official-layout model,
environment hygiene."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"          # data produced by the official implementation (see its README)
KEYS = FIXTURES / "checkpoint-keys"              # key / shape / dtype lists of the released checkpoints


def fixture_dirs() -> list[Path]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "io.pt").is_file())


@pytest.fixture(scope="session")
def tiny_fixture() -> Path:
    p = FIXTURES / "glip-official-tiny"
    assert (p / "model.pth").is_file(), f"{p} is part of the repository"
    return p


@pytest.fixture(scope="session")
def tiny_model(tiny_fixture):
    from glip import GLIP

    return GLIP.from_pretrained(tiny_fixture / "model.pth", config=tiny_fixture / "config.json")


# --- a local stand-in for the Hugging Face Hub (tests/test_hub.py), shared by the hub and app tests ----------
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from test_hub import official_checkpoint

    return official_checkpoint(tmp_path_factory.mktemp("ckpt") / "official.pth").read_bytes()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from test_hub import FakeHub

    h = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # no preloaded files from the machine
    yield h
    h.close()

