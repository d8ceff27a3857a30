"""A model folder's config.json is data: ranges and consistency with the tensor shapes (read from the
safetensors header) are checked before anything is allocated, and errors name the offending key."""
from __future__ import annotations

import json

import pytest
import torch

import glip.model
from glip import GLIP, CheckpointError, ConfigError, GLIPConfig, get_preset
from glip.config import LIMITS

MICRO = get_preset("toy").replace(min_size_test=64, max_size_test=64, num_dyhead_blocks=1, swin_embed_dim=16,
                                  swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    GLIP(MICRO).save_pretrained(out, exclude_text_encoder=True)
    return out


@pytest.fixture()
def edited(folder, tmp_path):
    """A copy of the saved model whose config.json is edited by the test."""
    def make(**changes):
        d = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if k.startswith("bert."):
                d["bert"][k[5:]] = v
            else:
                d[k] = v
        out = tmp_path / "edited"
        out.mkdir(exist_ok=True)
        (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        (out / "config.json").write_text(json.dumps(d))
        return out
    return make


@pytest.fixture()
def builds(monkeypatch):
    """Every GLIP the code under test constructs (on any device, the meta device included)."""
    seen = []
    init = glip.model.GLIP.__init__

    def spy(self, config=None):
        seen.append(config)
        init(self, config)
    monkeypatch.setattr(glip.model.GLIP, "__init__", spy)
    return seen


def test_the_saved_folder_loads(folder):
    m = GLIP.from_pretrained(folder, device="cpu")
    assert m.config.swin_embed_dim == 16 and m.config.num_dyhead_blocks == 1


@pytest.mark.parametrize("key,value", [("swin_embed_dim", 20000), ("num_dyhead_blocks", 100000),
                                       ("max_query_len", 1e9), ("max_query_len", 1_000_000_000),
                                       ("bert.num_hidden_layers", 10_000), ("channels", -4),
                                       ("swin_depths", [2, 2, 2]), ("swin_window_size", "7"), ("early_fusion", 1)])
def test_out_of_range_configs_fail_before_any_model_is_built(edited, builds, key, value):
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as e:
        GLIP.from_pretrained(edited(**{key: value}))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
    assert builds == []  # not even on the meta device


@pytest.mark.parametrize("key,value,tensors", [("swin_embed_dim", 24, "16"), ("num_dyhead_blocks", 2, "1"),
                                               ("channels", 64, "32"), ("swin_depths", [2, 2, 4, 2], "(2, 2, 2, 2)"),
                                               ("early_fusion", False, "True")])
def test_in_range_configs_that_disagree_with_the_tensor_shapes_name_the_key(edited, builds, key, value, tensors):
    with pytest.raises(CheckpointError, match=rf"{key} = .* but the tensors have {tensors.replace('(', '[(]').replace(')', '[)]')}"):
        GLIP.from_pretrained(edited(**{key: value}))
    assert builds == []


def test_tensor_shapes_are_checked_against_the_architecture_before_reading_them(folder, tmp_path, builds, monkeypatch):
    """A file whose header holds one mis-shaped and one foreign tensor: refused by comparing the header with
    a model built on the meta device, before the tensors are read."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    sd["rpn.head.bbox_pred.weight"] = torch.zeros(5, 32, 1, 1)
    sd["rpn.head.surprise"] = torch.zeros(3)
    out = tmp_path / "bad"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    import safetensors.torch

    def no_read(*a, **k):
        raise AssertionError("tensors were read before the shapes were checked")
    monkeypatch.setattr(safetensors.torch, "load_file", no_read)
    with pytest.raises(CheckpointError, match=r"rpn\.head\.bbox_pred\.weight.*rpn\.head\.surprise|rpn\.head\.surprise.*bbox_pred"):
        GLIP.from_pretrained(out)
    assert all(c is not None for c in builds) and len(builds) == 1  # the meta-device skeleton only


def test_config_file_errors_name_the_file(edited, tmp_path):
    bad = edited()
    (bad / "config.json").write_text('{"swin_embed_dim": 16,,}')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON \(line 1, column 23"):
        GLIP.from_pretrained(bad)
    (bad / "config.json").write_text('{"swin_embed_dimm": 16}')
    with pytest.raises(CheckpointError, match="Unknown GLIP config keys.*swin_embed_dimm"):
        GLIP.from_pretrained(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        GLIP.from_pretrained(bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        GLIP.from_pretrained(bad)
    yml = tmp_path / "c.yaml"
    yml.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        GLIPConfig.load(yml)


def test_presets_and_shipped_configs_are_valid():
    from glip.checkpoint import shipped_models
    from glip.config import PRESETS

    for cfg in PRESETS.values():
        cfg.validate()
    for folder in shipped_models().values():
        GLIPConfig.load(folder / "config.json")


def test_every_limit_is_enforced():
    """Each range of LIMITS rejects a value just outside it, naming the key."""
    base = get_preset("glip-t")
    for key, (lo, hi) in LIMITS.items():
        field = {"swin_depth": "swin_depths", "anchor_size": "anchor_sizes", "anchor_stride": "anchor_strides"}.get(key, key)
        for bad in (lo - 1 if isinstance(lo, int) else lo - 1e-3, hi + 1 if isinstance(hi, int) else hi + 1e-3):
            if field.startswith("bert."):
                cfg = base.replace(bert=dict(base.bert, **{field[5:]: bad}))
            elif field in ("swin_depths", "swin_num_heads", "anchor_sizes", "anchor_strides", "pixel_mean", "pixel_std"):
                old = getattr(base, field)
                cfg = base.replace(**{field: (bad,) + tuple(old[1:])})
            else:
                cfg = base.replace(**{field: bad})
            with pytest.raises(ConfigError, match=field.split(".")[-1]):
                cfg.validate()


def test_model_constructor_validates():
    with pytest.raises(ConfigError, match="gn_groups"):
        GLIP(MICRO.replace(gn_groups=5))
    with pytest.raises(ConfigError, match=r"swin_num_heads\[0\]"):
        GLIP(MICRO.replace(swin_num_heads=(3, 2, 4, 8)))
