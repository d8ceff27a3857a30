"""The accelerator path of inference (`glip.runtime.host_tiled` false): whole-map kernels instead of the CPU's
cache-sized tiles, the same results, and no host sync anywhere in the forward.

Run here on the CPU by switching `host_tiled` off, which is what a GPU does."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glip.backbone as backbone
import glip.dyhead as dyhead
import glip.fusion as fusion
import glip.runtime as runtime
from glip.model import GLIP

# ops that make the host wait for the device: a value read back (bool / int / item), an output whose size
# depends on the data (boolean indexing, nonzero), a tensor built from host data (an upload)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "lift_fresh"}


def _inputs(model, dtype):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 96, 160, generator=g, dtype=dtype)  # 96×160: Swin pads every stage's last windows
    ids = torch.randint(1000, 2000, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # the second prompt is padded: X-MHA's fill and both softmaxes see padding
    return images, ids, mask


def _forward(model, images, ids, mask):
    with torch.no_grad():
        feats = model.encode_image(images)
        text = model.encode_text(ids, mask)
        return feats, model.ground(feats, text, output_attentions=True)


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return GLIP.from_pretrained(tiny_fixture / "model.pth", config=tiny_fixture / "config.json").eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double().eval()


def test_device_path_equals_the_tiled_cpu_path(model64, monkeypatch):
    images, ids, mask = _inputs(model64, torch.float64)
    # small tiles, so that the CPU path really runs many slices, bands and chunks
    for mod, name, value in ((backbone, "CHUNK_BYTES", 1 << 14), (dyhead, "CHUNK_ROWS", 9 * 37),
                             (dyhead, "BAND_BYTES", 1 << 12), (fusion, "NORM_BAND_BYTES", 1 << 12),
                             (fusion, "LOGIT_BAND_BYTES", 1 << 12)):
        monkeypatch.setattr(mod, name, value)
    feats_cpu, out_cpu = _forward(model64, images, ids, mask)
    monkeypatch.setattr(runtime, "host_tiled", lambda t: False)
    feats_dev, out_dev = _forward(model64, images, ids, mask)
    for a, b in zip(feats_cpu, feats_dev):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for field in ("token_logits", "bbox_reg", "centerness", "visual"):
        for a, b in zip(getattr(out_cpu, field), getattr(out_dev, field)):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_cpu.text, out_dev.text, atol=1e-9, rtol=1e-9)
    assert len(out_cpu.attentions) == len(out_dev.attentions) > 0
    for a, b in zip(out_cpu.attentions, out_dev.attentions):
        torch.testing.assert_close(a.image_to_text, b.image_to_text, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(a.text_to_image, b.text_to_image, atol=1e-10, rtol=1e-9)


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(a, (list, tuple)) and any(getattr(t, "dtype", None) == torch.bool for t in a) for a in args)
        if name in SYNC_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_device_path_has_no_host_sync_and_the_cpu_path_is_detected(model, monkeypatch):
    images, ids, mask = _inputs(model, torch.float32)
    _forward(model, images, ids, mask)  # warm-up: first-call allocations
    with _Syncs() as cpu:
        _forward(model, images, ids, mask)
    assert cpu.seen, "the probe must see the CPU path's data-dependent branches, or it proves nothing"
    monkeypatch.setattr(runtime, "host_tiled", lambda t: False)
    with _Syncs() as dev:
        _forward(model, images, ids, mask)
    assert dev.seen == []


def test_dcn_over_a_batch_is_each_image_alone():
    """The DCN gathers the whole batch from one stacked table; image b's rows must come from its own map."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 7, 6, generator=g, dtype=torch.float64)
    offset = torch.randn(3, 18, 7, 6, generator=g, dtype=torch.float64) * 3  # far enough to reach the borders
    mask = torch.rand(3, 9, 7, 6, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        batch = dyhead.deform_conv2d(x, offset, mask, weight, bias, use_torchvision=False)
        alone = [dyhead.deform_conv2d(x[i:i + 1], offset[i:i + 1], mask[i:i + 1], weight, bias, use_torchvision=False)
                 for i in range(3)]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-12, rtol=1e-12)
