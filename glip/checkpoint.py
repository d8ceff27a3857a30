"""Checkpoints: the official `.pth` ↔ this project's format (safetensors + config JSON).

Official files are `{'model': DDP state_dict ('module.' prefix), 'model_ema', 'optimizer', ...}`;
only 'model' is used. They load with `torch.load(weights_only=True, mmap=True)` so the EMA and
optimizer copies are never read into memory. The architecture is inferred from the tensors (Swin
width/depths/heads/window, DyHead blocks, fusion or not, BERT size); what the tensors cannot tell
(BERT head count, thresholds, input size) comes from `config=`.

A file is data, not code: before a single weight is read, the config is range-checked
(`GLIPConfig.validate`) and compared with the tensor shapes of the file's header (safetensors) or
memory map (.pth), and `GLIP.from_pretrained` compares every key and shape with a model built on the
meta device. A mismatch is a `CheckpointError` naming the offending config key or tensor.

This module knows files and state dicts, not the model class (`glip.model` imports it, not the reverse).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PRESETS, GLIPConfig, get_preset
from .errors import CheckpointError, ConfigError
from .tensorfile import ALIGNMENT, read_safetensors, write_safetensors
from .tensorfile import read_header as read_safetensors_header

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FORMAT_VERSION = 1
# keys that real checkpoints carry and a port need not use (mmdet's converter skips the same groups)
IGNORED = re.compile(r"(pooler|resizer|anchor_generator|cls_logits|position_ids)")
# what the tensors decide; everything else comes from the user's config (or the defaults)
STRUCTURAL = ("swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size", "channels",
              "num_dyhead_blocks", "early_fusion", "fusion_embed_dim", "num_classes")
# the BERT sizes the tensors decide (the head count is not in any shape)
BERT_SHAPED = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
               "type_vocab_size")

TEXT_PREFIX = "language_backbone."
Shapes = Mapping[str, tuple[int, ...]]


def _minilm_state_dict() -> dict[str, torch.Tensor]:
    from .language import minilm_state_dict

    return minilm_state_dict()


def _minilm_shapes() -> dict[str, tuple[int, ...]]:
    from .language import minilm_shapes

    return minilm_shapes()


# Text encoders whose weights ship in a pip package: a checkpoint of ours may leave them out (frozen, stock).
# name → (state dict loader, shapes from its header); keys relative to `language_backbone.body.model.`.
TEXT_ENCODERS: dict[str, tuple[Callable[[], dict], Callable[[], dict]]] = {
    "all-MiniLM-L6-v2": (_minilm_state_dict, _minilm_shapes),
}


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# --- reading ------------------------------------------------------------------------------------
def load_error(path: str | Path, e: Exception, what: str = "a loadable PyTorch checkpoint") -> CheckpointError:
    """One line for a file `torch.load(weights_only=True)` refused. torch's own text advises loading with
    weights_only=False, which would run the file's code: not advice to pass on, so only its finding is kept
    (the global the file asked for, or what the unpickler could not read)."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and found:
        return CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain containers "
                               f"({found.group(1)}); only weights are ever loaded from a file")
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    first = detail.group(1) if detail else (text.strip().splitlines() or [""])[0]
    return CheckpointError(f"{path}: not {what}: truncated, or another kind of file "
                           f"({e.__class__.__name__}{': ' + first[:160] if first else ''})")


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The 'model' state dict of an official .pth, 'module.' stripped (only if every key has it).
    Memory-mapped: the tensors are read from disk only when used."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        ckpt = _load_plain(path)
    except Exception as e:
        raise load_error(path.name, e) from None
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
        raise load_error(path.name, e) from None


def infer_config(sd: Mapping, base: GLIPConfig | None = None) -> GLIPConfig:
    """Recover the architecture from tensor names and shapes (`sd`: tensors, or the shapes alone).
    Without `language_backbone.*` tensors (a text encoder left out of the file) BERT stays as in `base`."""
    base = base or GLIPConfig()
    shp = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}
    try:
        embed = shp["backbone.body.patch_embed.proj.weight"][0]
        channels = shp["backbone.fpn.fpn_inner2.weight"][0]
        table = shp["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"][0]
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"Not a GLIP checkpoint: missing {e.args[0]!r} (is this a GLIP model file?)") from e
    depths, heads = [], []
    for s in range(16):
        blocks = {int(m.group(1)) for k in shp if (m := re.match(rf"backbone\.body\.layers\.{s}\.blocks\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        heads.append(shp.get(f"backbone.body.layers.{s}.blocks.0.attn.relative_position_bias_table", (0, 0))[1])
    window = (int(round(table ** 0.5)) + 1) // 2
    tower = {int(m.group(1)) for k in shp if (m := re.match(r"rpn\.head\.dyhead_tower\.(\d+)\.DyConv\.0\.conv\.weight", k))}
    early = any(".b_attn." in k for k in shp)
    fusion_key = "rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight"
    fusion_embed = shp[fusion_key][0] if early and fusion_key in shp else base.fusion_embed_dim
    bert = dict(base.bert)
    words = shp.get("language_backbone.body.model.embeddings.word_embeddings.weight")
    if words is not None:
        layers = {int(m.group(1)) for k in shp
                  if (m := re.match(r"language_backbone\.body\.model\.encoder\.layer\.(\d+)\.", k))}
        hidden = words[1]
        if bert["hidden_size"] != hidden:  # head count is not in the tensors: 64-wide heads unless told
            bert["num_attention_heads"] = {768: 12, 384: 12, 1024: 16}.get(hidden, max(1, hidden // 64))
        get = lambda k, i: shp.get(f"language_backbone.body.model.{k}", (None, None))[i]  # noqa: E731
        bert.update(
            vocab_size=words[0], hidden_size=hidden, num_hidden_layers=max(layers) + 1 if layers else 0,
            intermediate_size=get("encoder.layer.0.intermediate.dense.weight", 0) or bert["intermediate_size"],
            max_position_embeddings=get("embeddings.position_embeddings.weight", 0) or bert["max_position_embeddings"],
            type_vocab_size=get("embeddings.token_type_embeddings.weight", 0) or bert["type_vocab_size"],
        )
    cls = shp.get("rpn.head.cls_logits.weight")
    return dataclasses.replace(
        base, swin_embed_dim=embed, swin_depths=tuple(depths), swin_num_heads=tuple(heads), swin_window_size=window,
        channels=channels, num_dyhead_blocks=len(tower), early_fusion=early,
        fused_dot_product=early if base.fused_dot_product else False, fusion_embed_dim=fusion_embed,
        num_classes=cls[0] + 1 if cls is not None else base.num_classes, bert=bert,
    )


def check_config(cfg: GLIPConfig, shapes: Shapes, source: str) -> None:
    """The config's structural keys against the tensors' shapes (read without loading them); raises
    CheckpointError naming the first key that disagrees."""
    inferred = infer_config(shapes, base=cfg)
    for key in STRUCTURAL:
        if key == "fusion_embed_dim" and not inferred.early_fusion:
            continue
        want, got = getattr(cfg, key), getattr(inferred, key)
        if (tuple(want) if isinstance(want, (list, tuple)) else want) != got:
            raise CheckpointError(f"{source}: {key} = {want!r} but the tensors have {got!r}")
    if any(k.startswith(TEXT_PREFIX) for k in shapes):
        for key in BERT_SHAPED:
            if cfg.bert.get(key) != inferred.bert[key]:
                raise CheckpointError(f"{source}: bert.{key} = {cfg.bert.get(key)!r} but the tensors have "
                                      f"{inferred.bert[key]!r}")


def validated(cfg: GLIPConfig, source: str) -> GLIPConfig:
    """`cfg.validate()` with the failure reported as a CheckpointError of `source`."""
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def resolve_config(config) -> GLIPConfig | None:
    """config= accepts None, a GLIPConfig, a preset name, or a path (our JSON / official yaml or keys JSON)."""
    if config is None:
        return None
    if isinstance(config, GLIPConfig):
        return config.validate()
    if isinstance(config, dict):
        return GLIPConfig.from_dict(config).validate()
    if isinstance(config, str) and config.lower().replace("_", "-") in PRESETS:
        return get_preset(config)
    path = Path(config)
    if path.is_file():
        return GLIPConfig.load(path)
    raise CheckpointError(f"config={str(config)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config file")


def merge_config(inferred: GLIPConfig, user: GLIPConfig | None) -> GLIPConfig:
    """Structure from the tensors, everything else (and BERT head count) from the user's config."""
    if user is None:
        return inferred
    kw = {f: getattr(inferred, f) for f in STRUCTURAL}
    bert = dict(user.bert)
    for k in BERT_SHAPED:
        bert[k] = inferred.bert[k]
    if user.bert["hidden_size"] != inferred.bert["hidden_size"]:
        bert["num_attention_heads"] = inferred.bert["num_attention_heads"]
    kw["bert"] = bert
    kw["fused_dot_product"] = user.fused_dot_product and inferred.early_fusion
    return dataclasses.replace(user, **kw)


def check_shapes(own: Shapes, found: Shapes, source: str, name: str = "GLIP") -> None:
    """Every key and shape the model has against what a file holds (ignorable groups aside); one
    CheckpointError listing every missing / unexpected / mis-shaped key."""
    found = {k: v for k, v in found.items() if not IGNORED.search(k) or k in own}
    missing = [k for k in own if k not in found and not IGNORED.search(k)]
    unexpected = [k for k in found if k not in own]
    shapes = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(own[k])}"
              for k in found if k in own and tuple(found[k]) != tuple(own[k])]
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            problems.append(f"{len(keys)} {title}: " + ", ".join(keys[:8]) + more)
    if problems:
        raise CheckpointError(f"{source} does not match the GLIP architecture ({name}): " + "; ".join(problems))


def load_state(model, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that names every missing / unexpected / mis-shaped key (ignorable groups aside)."""
    own = model.state_dict()
    check_shapes(shapes_of(own), shapes_of(sd), source, model.config.name)
    # The model takes the file's tensors as its own (assign) instead of copying them into its initial weights:
    # a memory-mapped checkpoint then stays on disk until a forward reads it (copy-on-write if trained), so a
    # load never holds two copies and rows never read (most of BERT's word table) never become resident.
    # Copied instead: a tensor of another dtype or device, and one off torch's 64-byte alignment (unaligned
    # operands take other kernel paths, whose sums differ in the last bits from the same weights copied).
    take, copy = {}, {}
    for k, v in sd.items():
        if k in own:
            mine = own[k]
            same = (v.dtype, v.device) == (mine.dtype, mine.device) and v.data_ptr() % ALIGNMENT == 0
            (take if same else copy)[k] = v
    model.load_state_dict(copy, strict=False)
    model.load_state_dict(take, strict=False, assign=True)


# --- our format -----------------------------------------------------------------------------------
def save_model(model, out_dir: str | Path, fp16: bool = False, exclude_text_encoder: bool = False) -> Path:
    """`out_dir/model.safetensors` + `out_dir/config.json`.

    exclude_text_encoder=True leaves the `language_backbone.*` tensors out (a frozen, stock text encoder:
    `read_ours` refills them from the pip-packaged weights named by `config.text_encoder`)."""
    from .datasets.writers import atomic_write_text

    if exclude_text_encoder and model.config.text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"exclude_text_encoder needs a text encoder that ships offline ({sorted(TEXT_ENCODERS)}), "
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
    # Written under a temporary name and renamed, so an interrupted save never leaves a truncated model (and a
    # process that has the old file memory-mapped keeps reading the old inode).
    tmp = out / "model.safetensors.tmp"
    write_safetensors(sd, tmp, metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(model.config.to_dict(), indent=1))
    return out


def _umask() -> int:
    try:  # read without changing it (os.umask sets it, a race with other threads)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file, from its header alone (no tensor is read)."""
    return {k: shape for k, (_, shape, _, _) in read_safetensors_header(path)[1].items()}


@dataclass
class Pretrained:
    """What a model source holds, checked but not yet loaded: the config, the tensor shapes (None: no
    weights, a preset's random initialisation) and `tensors()` to read them."""
    config: GLIPConfig
    source: str
    shapes: dict[str, tuple[int, ...]] | None = None
    _read: Callable[[], dict[str, torch.Tensor]] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return self._read() if self._read is not None else {}


def _ours(folder: Path, user: GLIPConfig | None, source: str) -> Pretrained:
    """Our folder: config.json validated, then compared with the safetensors header, before any tensor is read."""
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: config.json is missing beside model.safetensors")
    try:
        cfg = GLIPConfig.load(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    shapes = read_header(weights)
    check_config(cfg, shapes, f"{folder / 'config.json'}")
    excluded = not any(k.startswith(TEXT_PREFIX) for k in shapes)
    if excluded and cfg.text_encoder in TEXT_ENCODERS:
        shapes.update({TEXT_PREFIX + "body.model." + k: v for k, v in TEXT_ENCODERS[cfg.text_encoder][1]().items()})
    cfg = validated(merge_config(cfg, user), source)

    def read() -> dict[str, torch.Tensor]:
        return read_ours(folder)[0]
    return Pretrained(cfg, source, shapes, read)


def read_ours(folder: Path) -> tuple[dict[str, torch.Tensor], GLIPConfig]:
    """Tensors (fp16 widened to fp32; an excluded stock text encoder refilled) and the config of our folder."""
    folder = Path(folder)
    try:
        cfg = GLIPConfig.load(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    sd = read_safetensors(folder / "model.safetensors")
    sd = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in sd.items()}
    if cfg.text_encoder in TEXT_ENCODERS and not any(k.startswith(TEXT_PREFIX) for k in sd):
        sd.update({TEXT_PREFIX + "body.model." + k: v for k, v in TEXT_ENCODERS[cfg.text_encoder][0]().items()})
    return sd, cfg


# --- entry point ------------------------------------------------------------------------------------
def shipped_models() -> dict[str, Path]:
    if not ASSETS.is_dir():
        return {}
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / "model.safetensors").is_file()}


def read_pretrained(src, config=None) -> Pretrained:
    """Resolve a model source (see `GLIP.from_pretrained`) to its checked config and tensor shapes."""
    user = resolve_config(config)
    src_s = str(src)
    shipped = shipped_models()
    if isinstance(src, str) and src.lower() in PRESETS and not Path(src).exists():
        return Pretrained(user or get_preset(src), src)                 # random weights (benchmarks, tests)
    if src_s in shipped:
        return _ours(shipped[src_s], user, f"shipped model {src_s!r}")
    path = Path(src_s)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{src_s}: folder without model.safetensors (expected this project's format)")
        return _ours(path, user, src_s)
    if path.is_file():
        if src_s.endswith(".safetensors"):
            return _ours(path.parent, user, src_s)
        sd = read_official(path)
        cfg = validated(merge_config(infer_config(sd, user), user), path.name)
        return Pretrained(cfg, path.name, shapes_of(sd), lambda: sd)
    if re.match(r"^(hf://)?[\w.-]+/[\w.-]+/.+\.pth$", src_s):
        return read_pretrained(hf_download(src_s), config=config)
    known = sorted(PRESETS) + sorted(shipped)
    raise CheckpointError(f"Unknown model {src_s!r}: not a file, folder, preset or shipped model ({', '.join(known)}), "
                          "nor a Hugging Face 'owner/repo/file.pth'")


def hf_download(spec: str) -> str:
    """'owner/repo/file.pth' (optionally 'hf://…') → a local path: the Hugging Face cache's copy when one is
    there, else a resumable download (`glip.download`, progress on stderr) into the model cache."""
    from . import download as dl

    owner, repo, filename = spec.removeprefix("hf://").split("/", 2)
    local = dl.cached_file(f"{owner}/{repo}", filename)
    if local is not None:
        return str(local)
    if dl.offline():
        raise CheckpointError(f"{spec}: downloading from Hugging Face is disabled (HF_HUB_OFFLINE is set); "
                              "download the .pth yourself and pass its path")
    dest = dl.default_cache() / "downloads" / f"{owner}--{repo}" / filename
    return str(dl.download(dl.resolve_url(f"{owner}/{repo}", filename), dest, dl.console_progress(filename)))
