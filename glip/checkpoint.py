"""Checkpoints: the official `.pth` ↔ this project's format (safetensors + config JSON).

Official files are `{'model': DDP state_dict ('module.' prefix), 'model_ema', 'optimizer', ...}`;
only 'model' is used (GLIP issue #59). They load with `torch.load(weights_only=True, mmap=True)`
so the EMA and optimizer copies are never read into memory. The architecture is inferred from
the tensors (Swin width/depths/heads/window, DyHead blocks, fusion or not, BERT size); what the
tensors cannot tell (BERT head count, thresholds, input size) comes from `config=`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from .config import PRESETS, GLIPConfig, get_preset
from .errors import CheckpointError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FORMAT_VERSION = 1
# keys that real checkpoints carry and a port need not use (mmdet's converter skips the same groups)
IGNORED = re.compile(r"(pooler|resizer|anchor_generator|cls_logits|position_ids)")
# what the tensors decide; everything else comes from the user's config (or the defaults)
STRUCTURAL = ("swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size", "channels",
              "num_dyhead_blocks", "early_fusion", "fusion_embed_dim", "num_classes")


TEXT_PREFIX = "language_backbone."


def _minilm_state_dict() -> dict[str, torch.Tensor]:
    from .language import minilm_state_dict

    return minilm_state_dict()


# Text encoders whose weights ship in a pip package: a checkpoint of ours may leave them out (frozen, stock).
TEXT_ENCODERS = {"all-MiniLM-L6-v2": _minilm_state_dict}




# --- reading ------------------------------------------------------------------------------------
def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The 'model' state dict of an official .pth, 'module.' stripped (only if every key has it)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        ckpt = _load_plain(path)
    except Exception as e:
        raise CheckpointError(f"{path.name}: not a loadable PyTorch checkpoint ({e.__class__.__name__}: {e})") from e
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: expected a dict with a 'model' state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_plain(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path.name}: not a loadable PyTorch checkpoint ({e.__class__.__name__}: {e})") from e


def infer_config(sd: dict[str, torch.Tensor], base: GLIPConfig | None = None) -> GLIPConfig:
    """Recover the architecture from tensor names and shapes."""
    base = base or GLIPConfig()
    try:
        embed = sd["backbone.body.patch_embed.proj.weight"].shape[0]
        bert_words = sd["language_backbone.body.model.embeddings.word_embeddings.weight"]
        channels = sd["backbone.fpn.fpn_inner2.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"Not a GLIP checkpoint: missing {e.args[0]!r} (is this a GLIP model file?)") from e
    depths, heads = [], []
    for s in range(16):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.body\.layers\.{s}\.blocks\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        heads.append(sd[f"backbone.body.layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1])
    table = sd["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (int(round(table ** 0.5)) + 1) // 2
    tower = {int(m.group(1)) for k in sd if (m := re.match(r"rpn\.head\.dyhead_tower\.(\d+)\.DyConv\.0\.conv\.weight", k))}
    early = any(".b_attn." in k for k in sd)
    fusion_embed = sd["rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight"].shape[0] if early else base.fusion_embed_dim
    layers = {int(m.group(1)) for k in sd
              if (m := re.match(r"language_backbone\.body\.model\.encoder\.layer\.(\d+)\.", k))}
    hidden = bert_words.shape[1]
    bert = dict(base.bert)
    if bert["hidden_size"] != hidden:  # head count is not in the tensors: 64-wide heads unless told
        bert["num_attention_heads"] = {768: 12, 384: 12, 1024: 16}.get(hidden, max(1, hidden // 64))
    bert.update(
        vocab_size=bert_words.shape[0], hidden_size=hidden, num_hidden_layers=max(layers) + 1 if layers else 0,
        intermediate_size=sd["language_backbone.body.model.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["language_backbone.body.model.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["language_backbone.body.model.embeddings.token_type_embeddings.weight"].shape[0],
    )
    cls = sd.get("rpn.head.cls_logits.weight")
    return dataclasses.replace(
        base, swin_embed_dim=embed, swin_depths=tuple(depths), swin_num_heads=tuple(heads), swin_window_size=window,
        channels=channels, num_dyhead_blocks=len(tower), early_fusion=early,
        fused_dot_product=early if base.fused_dot_product else False, fusion_embed_dim=fusion_embed,
        num_classes=cls.shape[0] + 1 if cls is not None else base.num_classes, bert=bert,
    )


def resolve_config(config) -> GLIPConfig | None:
    """config= accepts None, a GLIPConfig, a preset name, or a path (our JSON / official yaml or keys JSON)."""
    if config is None or isinstance(config, GLIPConfig):
        return config
    if isinstance(config, dict):
        return GLIPConfig.from_dict(config)
    if isinstance(config, str) and config.lower().replace("_", "-") in PRESETS:
        return get_preset(config)
    path = Path(config)
    if path.is_file():
        return GLIPConfig.load(path)
    raise CheckpointError(f"config={config!r} is neither a preset ({sorted(PRESETS)}) nor a config file")


def merge_config(inferred: GLIPConfig, user: GLIPConfig | None) -> GLIPConfig:
    """Structure from the tensors, everything else (and BERT head count) from the user's config."""
    if user is None:
        return inferred
    kw = {f: getattr(inferred, f) for f in STRUCTURAL}
    bert = dict(user.bert)
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        bert[k] = inferred.bert[k]
    if user.bert["hidden_size"] != inferred.bert["hidden_size"]:
        bert["num_attention_heads"] = inferred.bert["num_attention_heads"]
    kw["bert"] = bert
    kw["fused_dot_product"] = user.fused_dot_product and inferred.early_fusion
    return dataclasses.replace(user, **kw)


def load_state(model, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that names every missing / unexpected / mis-shaped key (ignorable groups aside)."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not IGNORED.search(k) or k in own}
    missing = [k for k in own if k not in sd and not IGNORED.search(k)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            problems.append(f"{len(keys)} {title}: " + ", ".join(keys[:8]) + more)
    if problems:
        raise CheckpointError(f"{source} does not match the GLIP architecture ({model.config.name}): " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)


# --- our format -----------------------------------------------------------------------------------
def save_model(model, out_dir: str | Path, fp16: bool = False, exclude_text_encoder: bool = False) -> Path:
    """`out_dir/model.safetensors` + `out_dir/config.json`.

    exclude_text_encoder=True leaves the `language_backbone.*` tensors out (a frozen, stock text encoder:
    `read_ours` refills them from the pip-packaged weights named by `config.text_encoder`)."""
    from safetensors.torch import save_file

    if exclude_text_encoder and model.config.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"exclude_text_encoder needs a text encoder that ships offline ({sorted(TEXT_ENCODERS)}), "
                         f"not {model.config.text_encoder!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if exclude_text_encoder and k.startswith(TEXT_PREFIX):
            continue
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.half()
        sd[k] = v.contiguous()
    meta = {"format": "glip-explorer", "version": str(FORMAT_VERSION)}
    if exclude_text_encoder:
        meta["text_encoder_excluded"] = model.config.text_encoder
    save_file(sd, str(out / "model.safetensors"), metadata=meta)
    d = model.config.to_dict()
    (out / "config.json").write_text(json.dumps(d, indent=1))
    return out


def read_ours(folder: Path) -> tuple[dict[str, torch.Tensor], GLIPConfig]:
    from safetensors.torch import load_file

    try:
        sd = load_file(str(folder / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{folder}/model.safetensors is not a valid safetensors file ({e})") from e
    cfg = GLIPConfig.load(folder / "config.json")
    sd = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in sd.items()}
    if cfg.text_encoder in TEXT_ENCODERS and not any(k.startswith(TEXT_PREFIX) for k in sd):
        sd.update({TEXT_PREFIX + "body.model." + k: v for k, v in TEXT_ENCODERS[cfg.text_encoder]().items()})
    return sd, cfg


# --- entry point ------------------------------------------------------------------------------------
def shipped_models() -> dict[str, Path]:
    if not ASSETS.is_dir():
        return {}
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / "model.safetensors").is_file()}


def load_model(src, config=None, device=None, dtype=None):
    """GLIP.from_pretrained: see the module docstring for accepted sources."""
    from .model import GLIP

    user = resolve_config(config)
    src_s = str(src)
    shipped = shipped_models()
    if isinstance(src, str) and src.lower() in PRESETS and not Path(src).exists():
        model = GLIP(user or get_preset(src))                         # random weights (benchmarks, tests)
    elif (Path(src_s) / "prompt.safetensors").is_file():                # a tuned prompt on top of its base model
        from .prompt_tuning import load_prompted

        return load_prompted(src_s, config=config, device=device, dtype=dtype)
    elif src_s in shipped:
        sd, cfg = read_ours(shipped[src_s])
        model = _build(cfg, user, sd, f"shipped model {src_s!r}")
    elif Path(src_s).is_dir():
        if not (Path(src_s) / "model.safetensors").is_file():
            raise CheckpointError(f"{src_s}: folder without model.safetensors (expected this project's format)")
        sd, cfg = read_ours(Path(src_s))
        model = _build(cfg, user, sd, src_s)
    elif Path(src_s).is_file():
        if src_s.endswith(".safetensors"):
            sd, cfg = read_ours(Path(src_s).parent)
        else:
            sd = read_official(src_s)
            cfg = infer_config(sd, user)
        model = _build(cfg, user, sd, Path(src_s).name)
    elif re.match(r"^(hf://)?[\w.-]+/[\w.-]+/.+\.pth$", src_s):
        return load_model(hf_download(src_s), config=config, device=device, dtype=dtype)
    else:
        known = sorted(PRESETS) + sorted(shipped)
        raise CheckpointError(f"Unknown model {src_s!r}: not a file, folder, preset or shipped model ({known}), "
                              "nor a Hugging Face 'owner/repo/file.pth'")
    model.eval()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _build(cfg: GLIPConfig, user: GLIPConfig | None, sd, source: str):
    from .model import GLIP

    model = GLIP(merge_config(cfg, user))
    load_state(model, sd, source)
    return model


def hf_download(spec: str) -> str:
    """'owner/repo/file.pth' (optionally 'hf://…') → local path via huggingface_hub (online only)."""
    spec = spec.removeprefix("hf://")
    owner, repo, filename = spec.split("/", 2)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise CheckpointError(f"{spec}: downloading from Hugging Face is disabled (HF_HUB_OFFLINE is set); "
                              "download the .pth yourself and pass its path")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise CheckpointError("Downloading from Hugging Face needs `pip install huggingface_hub`") from e
    try:
        return hf_hub_download(f"{owner}/{repo}", filename)
    except Exception as e:
        raise CheckpointError(f"Could not download {spec} from Hugging Face ({e.__class__.__name__}): "
                              "are you online? Otherwise download it yourself and pass the path") from e


def convert(src, out_dir, fp16: bool = False, config=None) -> Path:
    """Official .pth (or anything load_model reads) → our format."""
    return save_model(load_model(src, config=config), out_dir, fp16=fp16)
