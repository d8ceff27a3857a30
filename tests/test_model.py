"""The model against the official implementation: fixtures (stage by stage), checkpoint manifests,
official-layout checkpoints round-tripping through our format, and the pure-PyTorch DCN."""
from __future__ import annotations

import collections
import math
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import KEYS, REPO, fixture_dirs
from hypothesis import given, settings
from hypothesis import strategies as st

from glip import GLIP, GLIPConfig, gemm, get_preset
from glip.checkpoint import IGNORED, CheckpointError, infer_config, read_official
from glip.dyhead import deform_conv2d, reinterpret
from glip.parity import run_parity
from glip.prompts import from_categories, tokenize


# --- parity with the official implementation ---------------------------------------------------------
@pytest.mark.parametrize("fixture", fixture_dirs(), ids=lambda p: p.name)
def test_parity_with_official_fixture(fixture):
    rep = run_parity(fixture)
    assert rep.ok, rep.table()
    names = {r.name for r in rep.rows}
    # every stage of the pipeline was actually compared
    for must in ("images", "input_ids", "backbone.c3", "fpn.p7", "bert.hidden", "tower.p3", "head.logits.p3"):
        assert must in names


def test_parity_cli_exit_codes(tiny_fixture, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "glip", "parity", str(tiny_fixture)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PARITY OK" in ok.stdout and "head.logits.p3" in ok.stdout
    # a corrupted checkpoint must make the parity command fail
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "io.pt", "image.png"):
        (bad / f).symlink_to(tiny_fixture / f)
    sd = torch.load(tiny_fixture / "model.pth", weights_only=True)
    sd["model"]["module.rpn.head.bias0"] = sd["model"]["module.rpn.head.bias0"] + 0.5
    torch.save(sd, bad / "model.pth")
    fail = subprocess.run([sys.executable, "-m", "glip", "parity", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert fail.returncode == 1 and "MISMATCH" in fail.stdout


# --- key layout of the released checkpoints ------------------------------------------------------------
def _manifest(name):
    path = KEYS / f"glip-official-keys-{name}.tsv"
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows[key.removeprefix("module.")] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype)
    return rows


@pytest.mark.parametrize("preset,manifest", [("glip-t-a", "TA"), ("glip-t", "T"), ("glip-l", "L")])
def test_state_dict_matches_official_manifest(preset, manifest):
    rows = _manifest(manifest)
    with torch.device("meta"):  # no 1 GB allocations
        model = GLIP(get_preset(preset))
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    theirs = {k: v for k, v in rows.items() if not IGNORED.search(k) or "cls_logits" in k}
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs))[:5], sorted(set(theirs) - set(ours))[:5])
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert {k: v[1] for k, v in ours.items()} == {k: v[1] for k, v in theirs.items()}
    # and the architecture is recoverable from the tensors alone
    inferred = infer_config(model.state_dict())
    ref = get_preset(preset)
    for f in ("swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size", "channels",
              "num_dyhead_blocks", "early_fusion", "fused_dot_product"):
        assert getattr(inferred, f) == getattr(ref, f), f
    assert inferred.bert == ref.bert


# --- official-layout checkpoints → our format → back ------------------------------------------------------
SMALL = GLIPConfig(swin_embed_dim=16, swin_depths=(2, 2, 2, 2), swin_num_heads=(1, 2, 4, 8), channels=32,
                   num_dyhead_blocks=2, fusion_embed_dim=64, max_query_len=32, min_size_test=96, max_size_test=128,
                   bert=dict(get_preset("glip-t").bert, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, vocab_size=30522))


def _official_file(model, path, extra=True):
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    if extra:  # what released files also carry
        sd["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
        for i in range(5):
            sd[f"module.rpn.anchor_generator.cell_anchors.{i}"] = torch.zeros(1, 4)
    torch.save({"model": sd, "model_ema": {k: v * 0 for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
                "iteration": 7}, path)


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.2) + (1.0 if "norm" in name.lower() else 0.0))


def _outputs(model, image):
    res = model.predict(image, ["red circle", "blue square"], threshold=0.0)
    model.predictor.clear_cache()
    return res


@pytest.mark.parametrize("fp16", [False, True])
def test_official_checkpoint_round_trip(tmp_path, fp16):
    torch.manual_seed(0)
    model = GLIP(SMALL).eval()
    _randomise(model)
    _official_file(model, tmp_path / "official.pth")
    a = GLIP.from_pretrained(tmp_path / "official.pth", config=SMALL, device="cpu")
    image = (torch.rand(100, 140, 3) * 255).byte().numpy()
    ref = _outputs(a, image)
    assert len(ref) > 0
    b = GLIP.from_pretrained(tmp_path / "official.pth", config=SMALL, device="cpu")
    b.save_pretrained(tmp_path / "ours", fp16=fp16)
    c = GLIP.from_pretrained(tmp_path / "ours", device="cpu")  # beside `a` (from_pretrained picks CUDA when present)
    assert c.config == a.config
    out = _outputs(c, image)
    if not fp16:
        for k, v in a.state_dict().items():
            assert torch.equal(v, c.state_dict()[k]), k
        assert (ref.boxes == out.boxes).all() and (ref.scores == out.scores).all()
    else:  # fp16 storage: weights within half precision, predictions close
        for k, v in a.state_dict().items():
            assert torch.allclose(v.float(), c.state_dict()[k].float(), rtol=1e-3, atol=1e-3), k
        assert abs(float(ref.scores[0]) - float(out.scores[0])) < 2e-2
    # our format is much smaller than an official file (which carries EMA + optimizer)
    official_size = (tmp_path / "official.pth").stat().st_size
    ours_size = (tmp_path / "ours" / "model.safetensors").stat().st_size
    assert ours_size < official_size / (3.5 if fp16 else 1.8)


def _file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of `path` (/proc/self/maps)."""
    target = str(path.resolve())
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_official_weights_stay_memory_mapped_and_training_leaves_the_file_alone(tmp_path):
    torch.manual_seed(0)
    model = GLIP(SMALL).eval()
    _randomise(model)
    path = tmp_path / "official.pth"
    _official_file(model, path)
    before = path.read_bytes()
    a = GLIP.from_pretrained(path, config=SMALL, device="cpu")
    spans = _file_mappings(path)
    assert spans, "the checkpoint is not memory-mapped"
    state = a.state_dict()
    for k, v in state.items():  # every tensor is the file's, not a copy in the model's own memory
        assert any(lo <= v.data_ptr() < hi for lo, hi in spans), k
        assert torch.equal(v, model.state_dict()[k]), k
    with torch.no_grad():  # what an optimiser step does: in-place writes, copy-on-write pages
        for p in a.parameters():
            p.add_(1.0)
    assert path.read_bytes() == before
    b = GLIP.from_pretrained(path, config=SMALL, device="cpu")
    for k, v in b.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    p = next(a.parameters())
    assert torch.equal(p, next(model.parameters()) + 1.0)


def test_a_file_without_an_ignorable_group_keeps_its_initial_values(tmp_path):
    torch.manual_seed(0)
    model = GLIP(SMALL).eval()
    _randomise(model)
    sd = {"module." + k: v for k, v in model.state_dict().items() if not k.startswith("rpn.head.cls_logits.")}
    torch.save({"model": sd}, tmp_path / "no_cls.pth")
    torch.manual_seed(123)
    a = GLIP.from_pretrained(tmp_path / "no_cls.pth", config=SMALL, device="cpu")
    torch.manual_seed(123)
    init = GLIP(SMALL).state_dict()
    for k, v in a.state_dict().items():
        if k.startswith("rpn.head.cls_logits."):  # the initialisation's values, not uninitialised memory
            assert torch.equal(v, init[k]) and not torch.equal(v, model.state_dict()[k]), k
        else:
            assert torch.equal(v, model.state_dict()[k]), k


def _mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(), "c": torch.randn(2, 3).bfloat16(),
            "d": torch.arange(6).view(2, 3), "e": torch.tensor(3.5), "f": torch.zeros(0, 4), "g": torch.tensor([True, False]),
            "h": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g), "w": torch.randn(64, 32, generator=g),
            "x": torch.randn(16, generator=g).double()}


@pytest.mark.parametrize("writer", ["library", "ours"])
def test_safetensors_files_read_and_written_here_equal_the_library(tmp_path, writer):
    from safetensors.torch import load_file, save_file

    from glip.tensorfile import read_safetensors, write_safetensors

    sd, path = _mixed_tensors(), tmp_path / "m.safetensors"
    (save_file if writer == "library" else write_safetensors)(sd, path, metadata={"format": "pt"})
    ours, ref = read_safetensors(path), load_file(path)  # the library reads our files too
    assert ours.keys() == ref.keys() == sd.keys()
    for k, v in sd.items():
        for got in (ours[k], ref[k]):
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        assert ours[k].data_ptr() % 64 == 0 or ours[k].numel() == 0, k
    data = path.read_bytes()
    if writer == "ours":
        assert (8 + int.from_bytes(data[:8], "little")) % 64 == 0  # the data starts aligned
    for name, bad in (("truncated", data[:-5]), ("garbage", b"\x10" + data[1:]), ("empty", b""), ("short", data[:12])):
        (tmp_path / f"{name}.safetensors").write_bytes(bad)
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            read_safetensors(tmp_path / f"{name}.safetensors")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_our_format_weights_stay_memory_mapped_and_training_leaves_the_file_alone(tmp_path):
    torch.manual_seed(0)
    model = GLIP(SMALL).eval()
    _randomise(model)
    model.save_pretrained(tmp_path / "ours")
    path = tmp_path / "ours" / "model.safetensors"
    before = path.read_bytes()
    a = GLIP.from_pretrained(tmp_path / "ours", device="cpu")
    spans = _file_mappings(path)
    mapped = total = 0
    for k, v in a.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
        inside = any(lo <= v.data_ptr() < hi for lo, hi in spans)
        assert inside or v.nbytes % 64, k  # every 64-byte multiple is written aligned and mapped, not copied
        mapped, total = mapped + inside * v.nbytes, total + v.nbytes
    assert mapped > 0.95 * total
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(2.0)
    assert path.read_bytes() == before
    a.save_pretrained(tmp_path / "ours")  # over the file it is mapped from: a new file renamed into place
    b = GLIP.from_pretrained(tmp_path / "ours", device="cpu")
    for k, v in b.state_dict().items():
        ref = model.state_dict()[k]
        assert torch.equal(v, ref * 2 if ref.is_floating_point() and k in dict(model.named_parameters()) else ref), k


def test_checkpoint_of_another_dtype_is_converted(tmp_path):
    torch.manual_seed(0)
    model = GLIP(SMALL).eval()
    _randomise(model)
    sd = {"module." + k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "half.pth")
    a = GLIP.from_pretrained(tmp_path / "half.pth", config=SMALL, device="cpu")
    for k, v in a.state_dict().items():
        ref = model.state_dict()[k]
        assert v.dtype == ref.dtype, k
        assert torch.equal(v, ref.half().to(ref.dtype) if ref.is_floating_point() else ref), k


def test_config_from_official_keys_json(tiny_fixture):
    cfg = GLIPConfig.load(tiny_fixture / "config.json")
    assert cfg.channels == 64 and cfg.num_dyhead_blocks == 2 and cfg.bert["num_attention_heads"] == 2
    assert cfg.min_size_test == 200 and cfg.max_size_test == 333 and cfg.swin_num_heads == (2, 4, 8, 16)


def test_official_yaml_config(tmp_path):
    (tmp_path / "glip.yaml").write_text(
        "MODEL:\n  SWINT:\n    EMBED_DIM: 192\n    DEPTHS: [2, 2, 18, 2]\n  DYHEAD:\n    NUM_CONVS: 8\n"
        "INPUT:\n  MIN_SIZE_TEST: 640\n")
    cfg = GLIPConfig.load(tmp_path / "glip.yaml")
    assert cfg.swin_embed_dim == 192 and cfg.swin_depths == (2, 2, 18, 2) and cfg.num_dyhead_blocks == 8
    assert cfg.min_size_test == 640


# --- wrong checkpoints give clear errors ---------------------------------------------------------------
def test_wrong_checkpoints(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a loadable"):
        GLIP.from_pretrained(tmp_path / "garbage.pth")
    (tmp_path / "notes.txt").write_text("these are not weights\n" * 50)
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint: truncated, or another kind"):
        GLIP.from_pretrained(tmp_path / "notes.txt")
    torch.save({"model": {"w": torch.zeros(1)}, "extra": collections.OrderedDict(a=Fraction(1, 3))},
               tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="refused to load.*fractions.Fraction") as e:
        GLIP.from_pretrained(tmp_path / "pickled.pth")
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)  # never advise running the file
    torch.save({"model": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="Not a GLIP checkpoint"):
        GLIP.from_pretrained(tmp_path / "other.pth")
    model = GLIP(SMALL)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.rpn.head.bbox_pred.weight"] = torch.zeros(5, 32, 1, 1)
    del sd["module.rpn.head.centerness.bias"]
    sd["module.rpn.head.surprise"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        GLIP.from_pretrained(tmp_path / "broken.pth", config=SMALL)
    msg = str(e.value)
    assert "rpn.head.centerness.bias" in msg and "rpn.head.surprise" in msg and "rpn.head.bbox_pred.weight" in msg
    with pytest.raises(CheckpointError, match="Unknown model"):
        GLIP.from_pretrained("no-such-model-anywhere")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        GLIP.from_pretrained("GLIPModel/GLIP/glip_tiny_model_o365_goldg.pth")


def test_official_loader_strips_module_prefix(tiny_fixture):
    sd = read_official(tiny_fixture / "model.pth")
    assert not any(k.startswith("module.") for k in sd)
    assert "rpn.head.log_scale" in sd


# --- modulated deformable convolution ------------------------------------------------------------------
def naive_dcn(x, offset, mask, weight, bias, stride, pad):
    """Direct transcription of the DCNv2 im2col kernel (float64 loops)."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.float64)

    def px(b, c, y, xx):
        return float(x[b, c, y, xx]) if 0 <= y < H and 0 <= xx < W else 0.0

    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                cols = torch.zeros(C, kh * kw, dtype=torch.float64)
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        y = ho * stride - pad + i + float(offset[b, 2 * k, ho, wo])
                        xx = wo * stride - pad + j + float(offset[b, 2 * k + 1, ho, wo])
                        if not (-1 < y < H and -1 < xx < W):
                            continue
                        y0, x0 = math.floor(y), math.floor(xx)
                        ly, lx = y - y0, xx - x0
                        for c in range(C):
                            v = ((1 - ly) * (1 - lx) * px(b, c, y0, x0) + (1 - ly) * lx * px(b, c, y0, x0 + 1)
                                 + ly * (1 - lx) * px(b, c, y0 + 1, x0) + ly * lx * px(b, c, y0 + 1, x0 + 1))
                            cols[c, k] = v * float(mask[b, k, ho, wo])
                out[b, :, ho, wo] = weight.double().reshape(O, -1) @ cols.reshape(-1) + bias.double()
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 2]), st.floats(0.1, 3.0), st.integers(0, 10_000))
def test_dcn_matches_naive_kernel(H, W, stride, spread, seed):
    g = torch.Generator().manual_seed(seed)
    B, C, O = 2, 3, 4
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    Ho, Wo = (H + 2 - 3) // stride + 1, (W + 2 - 3) // stride + 1
    offset = torch.randn(B, 18, Ho, Wo, generator=g, dtype=torch.float64) * spread
    offset[0, 0, 0, 0] = -1.0  # exactly on the -1 border
    mask = torch.rand(B, 9, Ho, Wo, generator=g, dtype=torch.float64)
    weight = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64)
    ours = deform_conv2d(x, offset, mask, weight, bias, stride, 1, use_torchvision=False)
    ref = naive_dcn(x, offset, mask, weight, bias, stride, 1)
    assert torch.allclose(ours, ref, atol=1e-9), (ours - ref).abs().max()


def dcn_case(g, C, H, W, stride, B=2, O=4):
    """A float64 DCN problem: map, offsets (spread 2), modulation, weight, bias for a 3×3 conv, padding 1."""
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    offset = torch.randn(B, 18, Ho, Wo, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, 9, Ho, Wo, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64), torch.randn(O, generator=g, dtype=torch.float64)
    return x, offset, mask, weight, bias


def test_dcn_chunked_columns_match_naive_kernel(monkeypatch):
    """Several GEMM chunks per image (2 positions each), batch 2, stride 1 and 2, a 1-pixel map."""
    import glip.dyhead as dyhead

    monkeypatch.setattr(dyhead, "CHUNK_ROWS", 18)
    g = torch.Generator().manual_seed(3)
    for H, W, stride in ((4, 5, 1), (5, 3, 2), (1, 1, 1)):
        x, offset, mask, weight, bias = dcn_case(g, 3, H, W, stride)
        ref = naive_dcn(x, offset, mask, weight, bias, stride, 1)
        with torch.no_grad():  # inference writes the chunks in place; autograd concatenates them
            inf = deform_conv2d(x, offset, mask, weight, bias, stride, 1, use_torchvision=False)
        grad = deform_conv2d(x, offset, mask, weight, None, stride, 1, use_torchvision=False) + bias.view(1, -1, 1, 1)
        assert torch.allclose(inf, ref, atol=1e-9) and torch.allclose(grad.detach(), ref, atol=1e-9)


def test_dcn_channels_last_offsets_match_naive_kernel():
    """The model's offsets are channel slices of a channels-last conv output (read as views, no copy); the
    re-interpreted coarser-level offsets are NCHW. Both layouts, at inference and under autograd: the kernel."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    for stride in (1, 2):
        Ho, Wo = (5 - 1) // stride + 1, (6 - 1) // stride + 1
        om = (torch.randn(2, 27, Ho, Wo, generator=g, dtype=torch.float64) * 2).contiguous(memory_format=torch.channels_last)
        offset, mask = om[:, :18], om[:, 18:].sigmoid()
        ref = naive_dcn(x, offset, mask, weight, bias, stride, 1)
        for off, m in ((offset, mask), (offset.contiguous(), mask.contiguous())):
            with torch.no_grad():
                inf = deform_conv2d(x, off, m, weight, bias, stride, 1, use_torchvision=False)
            grad = deform_conv2d(x, off, m, weight, bias, stride, 1, use_torchvision=False)
            assert torch.allclose(inf, ref, atol=1e-9) and torch.equal(inf, grad.detach())


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_dcn_packed_weight_gemm_matches_naive_kernel(monkeypatch, library):
    """fp32 CPU inference multiplies the columns by a weight packed once per call, in the layout of the library
    in use (oneDNN or MKL); every chunk, the shorter last one included, takes the packed weight. Same values as
    the float64 reference, at fp32 rounding."""
    import glip.dyhead as dyhead

    calls = []
    call = gemm.PackedLinear.__call__
    monkeypatch.setattr(gemm.PackedLinear, "__call__",
                        lambda self, x, bias=None: calls.append((self.library, x.shape[0])) or call(self, x, bias))
    monkeypatch.setattr(dyhead, "CHUNK_ROWS", 9 * 7)
    monkeypatch.setattr(dyhead, "PACK_MIN_CHUNKS", 2)
    g = torch.Generator().manual_seed(6)
    with gemm.use(library):
        with torch.no_grad():
            packable = gemm.pack(torch.zeros(2, 3), 4, like=torch.zeros(1, 3)) is not None
        if not gemm.available(library) or not packable:
            pytest.skip(f"torch built without {library}'s packed GEMM")
        for H, W, stride in ((6, 5, 1), (9, 8, 2)):
            x, offset, mask, weight, bias = dcn_case(g, 5, H, W, stride)
            Ho, Wo = offset.shape[-2:]
            ref = naive_dcn(x, offset, mask, weight, bias, stride, 1)
            calls.clear()
            with torch.no_grad():
                ours = deform_conv2d(x.float(), offset.float(), mask.float(), weight.float(), bias.float(), stride, 1,
                                     use_torchvision=False)
            assert len(calls) == -(-2 * Ho * Wo // 7) and (library, 7) in calls  # every chunk of the batch's positions
            torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_dcn_gradients_match_finite_differences():
    """Training backpropagates through the gather: to the map, the offsets, the modulation and the weights."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(1, 18, 4, 5, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    mask = torch.rand(1, 9, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: deform_conv2d(*a, 1, 1, use_torchvision=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, offset, mask, weight, bias))


def test_dcn_half_precision_offsets_sample_in_float32():
    """Under autocast the offsets may arrive in bf16; sample positions are formed in fp32 (bf16 cannot
    hold 100.25), so the result matches the fp32 computation up to bf16 rounding of the values."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 120, 130, generator=g)
    offset, mask = torch.rand(1, 18, 120, 130, generator=g) * 0.5, torch.rand(1, 9, 120, 130, generator=g)
    weight, bias = torch.randn(3, 4, 3, 3, generator=g) * 0.1, torch.zeros(3)
    with torch.no_grad():
        ref = deform_conv2d(x, offset, mask, weight, bias, 1, 1, use_torchvision=False)
        low = deform_conv2d(x, offset.bfloat16().float(), mask, weight, bias, 1, 1, use_torchvision=False)
        half = deform_conv2d(x, offset.bfloat16(), mask, weight, bias, 1, 1, use_torchvision=False)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, low, atol=1e-5, rtol=1e-5)  # only the bf16 rounding of the offsets themselves
    assert (half - ref).abs().max() < 0.1


def test_dcn_torchvision_path_agrees():
    tv = pytest.importorskip("torchvision.ops")
    del tv
    g = torch.Generator().manual_seed(1)
    for H, W, s in ((1, 1, 1), (1, 7, 1), (6, 5, 2), (9, 12, 1)):
        x = torch.randn(1, 8, H, W, generator=g)
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        off, m = torch.randn(1, 18, Ho, Wo, generator=g) * 2, torch.rand(1, 9, Ho, Wo, generator=g)
        w, b = torch.randn(5, 8, 3, 3, generator=g), torch.randn(5, generator=g)
        a = deform_conv2d(x, off, m, w, b, s, 1, use_torchvision=False)
        t = deform_conv2d(x, off, m, w, b, s, 1, use_torchvision=True)
        assert torch.allclose(a, t, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 6), H=st.integers(1, 9), W=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_sample_table_is_the_map_inside_a_zero_border(B, C, H, W, seed):
    """Rows of the table: the channels-last map padded by 1 before and 2 after in both directions with zeros,
    whatever the fresh memory held (new allocations are filled with NaN here)."""
    from glip.dyhead import sample_table

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    empty = torch.Tensor.new_empty
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: empty(self, *a, **k).fill_(float("nan")))
        table = sample_table(x)
    ref = F.pad(x, (1, 2, 1, 2)).permute(0, 2, 3, 1).reshape(B, (H + 3) * (W + 3), C)
    assert torch.equal(table, ref)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 6), O=st.integers(1, 30), H=st.integers(1, 9), W=st.integers(1, 9),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_offset_conv_from_the_sample_table_equals_conv2d(B, C, O, H, W, bias, seed):
    """The offset conv as one GEMM over the zero-bordered table plus 9 shifted sums: F.conv2d's values
    (float64), at inference (sums in place) and under autograd (same gradients)."""
    from glip.dyhead import conv3x3_from_table, sample_table

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(O, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(x, w, b, padding=1)
    with torch.no_grad():
        inf = conv3x3_from_table(sample_table(x), H, W, w, b)
    out = conv3x3_from_table(sample_table(x), H, W, w, b)
    assert out.shape == ref.shape == inf.shape
    torch.testing.assert_close(inf, ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = [x, w] + ([b] if bias else [])
    for ga, gr in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(ga, gr, atol=1e-12, rtol=1e-12)


def test_offset_reinterpretation_is_a_memory_view_not_a_crop():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    r = reinterpret(t, 2, 3)
    assert r.shape == (2, 3, 2, 3)
    assert torch.equal(r[1].flatten(), t[1].flatten()[: 3 * 2 * 3])
    assert not torch.equal(r, t[:, :, :2, :3])  # a crop would differ
    assert reinterpret(t, 4, 5) is t


# --- inference memory savings change no value ------------------------------------------------------------
def test_inference_slices_and_in_place_sums_match_the_autograd_forward(monkeypatch):
    """Inference runs Swin's blocks, patch merging and the X-MHA input norm in slices of tokens, the X-MHA in
    bands of positions, DyReLU in bands of rows, the residuals and the DyConv branch sums in place; with autograd
    on, everything runs in one piece out of place. Same values."""
    import glip.backbone as backbone
    import glip.dyhead as dyhead
    import glip.fusion as fusion

    monkeypatch.setattr(backbone, "CHUNK_BYTES", 4096)  # many slices, including a partial last one
    monkeypatch.setattr(fusion, "NORM_BAND_BYTES", 4096 + 12)  # the fused pyramid normed in uneven bands
    monkeypatch.setattr(fusion, "LOGIT_BAND_BYTES", 3000)  # X-MHA logits in many bands
    monkeypatch.setattr(dyhead, "BAND_BYTES", 700)  # DyReLU's second line a few rows at a time
    torch.manual_seed(0)
    cfg = get_preset("toy").replace(early_fusion=True)
    model = GLIP(cfg).eval()
    x = torch.randn(1, 3, 96, 128)
    enc = tokenize(from_categories(["red circle", "person"]).caption, max_len=cfg.max_query_len)
    with torch.no_grad():
        a = model(x, enc["input_ids"], enc["attention_mask"])
    b = model(x, enc["input_ids"], enc["attention_mask"])
    for fa, fb in zip(a.features + a.head.visual, b.features + b.head.visual):
        torch.testing.assert_close(fa, fb.detach(), atol=2e-5, rtol=1e-5)
    for la, lb in zip(a.head.token_logits, b.head.token_logits):
        torch.testing.assert_close(la, lb.detach(), atol=2e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 17), W=st.integers(1, 17), shift=st.booleans(),
       chunk=st.sampled_from([64, 4096, 1 << 22]), seed=st.integers(0, 2**16))
def test_swin_block_in_place_slices_equal_the_padded_rolled_partitioned_block(B, H, W, shift, chunk, seed):
    """Inference gathers window slots by index and adds into the residual in place; training pads, rolls,
    partitions and reverses whole maps. Same block, same values (float64), padding and shift masks included."""
    import glip.backbone as backbone

    torch.manual_seed(seed)
    ws = 4
    blk = backbone.SwinBlock(8, 2, ws, ws // 2 if shift else 0, 2.0, 0.0).double().eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.5)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    mask = backbone.shift_window_mask(Hp, Wp, ws, ws // 2, "cpu").double()
    x = torch.randn(B, H * W, 8, dtype=torch.float64)
    ref = blk(x.clone(), H, W, mask)  # grad mode: the whole-map path
    old, backbone.CHUNK_BYTES = backbone.CHUNK_BYTES, chunk
    try:
        with torch.no_grad():
            y = x.clone()
            out = blk(y, H, W, mask)
    finally:
        backbone.CHUNK_BYTES = old
    assert out.data_ptr() == y.data_ptr()  # in place
    torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 13), W=st.integers(1, 13), chunk=st.sampled_from([64, 1 << 22]),
       seed=st.integers(0, 2**16))
def test_patch_merging_in_bands_equals_the_whole_map(B, H, W, chunk, seed):
    import glip.backbone as backbone

    torch.manual_seed(seed)
    pm = backbone.PatchMerging(6).double()
    with torch.no_grad():
        for p in pm.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(B, H * W, 6, dtype=torch.float64)
    ref = pm(x, H, W)  # grad mode: the whole map
    old, backbone.CHUNK_BYTES = backbone.CHUNK_BYTES, chunk
    try:
        with torch.no_grad():
            out = pm(x, H, W)
    finally:
        backbone.CHUNK_BYTES = old
    assert out.shape == ref.shape == (B, ((H + 1) // 2) * ((W + 1) // 2), 12)
    torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=1e-12)


# --- model behaviour --------------------------------------------------------------------------------------
def test_attention_capture_is_opt_in_and_consistent(tiny_model):
    enc = tokenize(from_categories(["red circle", "person"]).caption)
    x = torch.zeros(1, 3, 128, 160)
    with torch.no_grad():
        a = tiny_model(x, enc["input_ids"], enc["attention_mask"])
        b = tiny_model(x, enc["input_ids"], enc["attention_mask"], output_attentions=True)
    assert a.head.attentions == []
    assert len(b.head.attentions) == tiny_model.config.num_dyhead_blocks
    att = b.head.attentions[0]
    n_img = sum(h * w for h, w in att.level_shapes)
    assert att.image_to_text.shape == (1, 8, n_img, 256) and att.text_to_image.shape == (1, 8, 256, n_img)
    valid = int(enc["attention_mask"].sum())
    assert torch.allclose(att.image_to_text.sum(-1), torch.ones(1, 8, n_img), atol=1e-5)
    assert float(att.image_to_text[..., valid:].abs().max()) == 0.0  # padded tokens get no attention
    assert torch.allclose(att.text_to_image.sum(-1), torch.ones(1, 8, 256), atol=1e-5)
    for la, lb in zip(a.head.token_logits, b.head.token_logits):  # capturing does not change the outputs
        assert torch.equal(la, lb)


def test_xmha_runs_in_half_precision_with_padded_tokens():
    """Regression (found on an H200): the official -9e15 fill for padded tokens overflowed fp16
    (predict(precision="fp16") raised). Half precision must run and match fp32 closely; padded tokens
    must get zero image→text attention."""
    from glip.fusion import BiMultiHeadAttention

    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim=16, l_dim=12, embed_dim=32, num_heads=4, dropout=0.0).eval()
    v, l = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        dv32, dl32, (p_v32, _) = attn(v, l, mask, keep_attention=True)
        dv16, dl16, (p_v16, _) = attn.half()(v.half(), l.half(), mask, keep_attention=True)
    assert torch.isfinite(dv16).all() and torch.isfinite(dl16).all()
    assert p_v16[0, :, :, 3:].abs().max() == 0 and p_v32[0, :, :, 3:].abs().max() == 0
    torch.testing.assert_close(dv16.float(), dv32, atol=5e-3, rtol=5e-2)
    torch.testing.assert_close(dl16.float(), dl32, atol=5e-3, rtol=5e-2)


@settings(max_examples=6, deadline=None)
@given(layers=st.integers(1, 2), heads=st.sampled_from([1, 2, 4]), T=st.integers(2, 12), pad=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_bert_equals_transformers_bert_model(layers, heads, T, pad, seed):
    """The written-out BERT is transformers' BertModel (eager attention, no pooler) with the official
    -10000 padding mask: same keys, same outputs at every position (padded ones included)."""
    transformers = pytest.importorskip("transformers")
    from glip.language import BertModel

    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=24, hidden_act="gelu", max_position_embeddings=32, type_vocab_size=2,
               layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    ref = transformers.BertModel(transformers.BertConfig(**cfg, attn_implementation="eager"),
                                 add_pooling_layer=False).eval().double()
    ours = BertModel(cfg).eval().double()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all("position_ids" in k or "token_type_ids" in k for k in unexpected)
    ids = torch.randint(1, 50, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, max(1, T - pad):] = 0
    ext = (1.0 - mask[:, None, None, :].double()) * -10000.0  # the official extended mask
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=ext).last_hidden_state
        got = ours(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_import_glip_does_not_load_transformers_model_code():
    code = ("import sys, glip\n"
            "from glip.prompts import tokenize\n"
            "bad = [m for m in sys.modules if m.startswith(('transformers.models.bert.modeling', 'transformers.modeling'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_saved_models_follow_the_umask_and_leave_no_temporary_file(tmp_path):
    import os
    import stat

    m = GLIP(get_preset("toy").replace(swin_embed_dim=16, swin_num_heads=(1, 2, 4, 8), channels=32,
                                       fusion_embed_dim=64, num_dyhead_blocks=1))
    old = os.umask(0o022)
    try:
        m.save_pretrained(tmp_path / "m", exclude_text_encoder=True)
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name
