"""Prompt tuning (paper §4.4, official `language_prompt_v2`): a learned vector per token position, added to
the text features before the grounding head, on top of a frozen model.

The official model holds it as `tunable_linear = Linear(768, 1000, bias=False)` (weight zero-initialised) and
adds `weight[:T]` to both `embedded` and `hidden`; here `GLIP.tunable_linear` is a `PromptEmbedding` with the
same state-dict key (`tunable_linear.weight`, (L, D)). Zero-initialised, a fresh prompt leaves every output of
the base model unchanged.

A tuned prompt is saved as a small folder that names its base model:

    prompt.safetensors   tunable_linear.weight, (max_query_len, D)
    prompt.json          base model, base fingerprint, training card

`GLIP.from_pretrained(folder)` loads the base model and attaches the prompt.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .language import TextFeatures

PROMPT_FILE = "prompt.safetensors"
PROMPT_CARD = "prompt.json"
KEY = "tunable_linear.weight"


class PromptEmbedding(nn.Module):
    """weight (L, D): row t is added to the features of token position t (t < L)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(length, dim))

    def forward(self, text: TextFeatures) -> TextFeatures:
        T = text.hidden.shape[1]
        if T > self.weight.shape[0]:
            raise ValueError(f"the prompt embedding covers {self.weight.shape[0]} token positions, the query has {T}")
        w = self.weight[:T].to(text.hidden.dtype)
        return TextFeatures(hidden=text.hidden + w, embedded=text.embedded + w, masks=text.masks)


def attach_prompt(model, weight: torch.Tensor | None = None) -> PromptEmbedding:
    """Give `model` a prompt embedding (zeros, or `weight`) covering its whole query; returns it."""
    cfg = model.config
    prompt = PromptEmbedding(cfg.max_query_len, cfg.lang_dim)
    if weight is not None:
        if weight.ndim != 2 or weight.shape[1] != cfg.lang_dim or weight.shape[0] < cfg.max_query_len:
            raise CheckpointError(f"prompt embedding of shape {tuple(weight.shape)} does not fit this model "
                                  f"(needs ({cfg.max_query_len}+, {cfg.lang_dim}))")
        prompt.weight.data.copy_(weight[:cfg.max_query_len].float())
    dev = next(model.parameters()).device
    model.tunable_linear = prompt.to(dev)
    return prompt


def base_fingerprint(model) -> str:
    """sha256 of the grounding projection's weights: tells whether a prompt is loaded onto the model it was
    tuned on (a prompt is a point in one model's feature space)."""
    h = hashlib.sha256()
    for t in (model.rpn.head.dot_product_projection_text.weight, model.rpn.head.bias_lang, model.rpn.head.bias0):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_prompt(model, out_dir: str | Path, base: str, card: dict | None = None) -> Path:
    """Write `model.tunable_linear` as a prompt folder for the base model `base` (a `from_pretrained` source)."""
    from safetensors.torch import save_file

    if model.tunable_linear is None:
        raise ValueError("the model has no prompt embedding to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({KEY: model.tunable_linear.weight.detach().to("cpu", torch.float32).contiguous()}, str(out / PROMPT_FILE),
              metadata={"format": "glip-explorer-prompt", "version": "1"})
    info = {"base_model": base, "base_fingerprint": base_fingerprint(model), "length": model.config.max_query_len,
            "dim": model.config.lang_dim, "training": card or {}}
    (out / PROMPT_CARD).write_text(json.dumps(info, indent=1))
    return out


def read_prompt(folder: str | Path) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        info = json.loads((folder / PROMPT_CARD).read_text())
        weight = load_file(str(folder / PROMPT_FILE))[KEY]
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: not a prompt folder (missing {Path(e.filename).name})") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{folder}: malformed prompt folder ({e.__class__.__name__}: {e})") from None
    except Exception as e:  # safetensors' own errors
        raise CheckpointError(f"{folder}/{PROMPT_FILE} is not a valid safetensors file ({e})") from None
    if not isinstance(info, dict) or "base_model" not in info:
        raise CheckpointError(f"{folder}/{PROMPT_CARD}: no base_model")
    return weight, info


def load_prompt(model, folder: str | Path, check_base: bool = True):
    """Attach the prompt saved in `folder` to `model` (its base model); returns the model."""
    weight, info = read_prompt(folder)
    if check_base and info.get("base_fingerprint") not in (None, base_fingerprint(model)):
        raise CheckpointError(f"{folder}: this prompt was tuned on {info['base_model']!r}, not on the given model "
                              "(its grounding weights differ)")
    attach_prompt(model, weight)
    return model


def is_prompt_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PROMPT_FILE).is_file()


def prompt_base(folder: str | Path) -> str:
    """The base model a prompt folder's card names (`GLIP.from_pretrained` loads it, then `load_prompt`)."""
    _, info = read_prompt(folder)
    base = info["base_model"]
    if is_prompt_folder(base):
        raise CheckpointError(f"{folder}: its base model {base!r} is itself a prompt folder")
    return base


__all__ = ["PromptEmbedding", "attach_prompt", "save_prompt", "load_prompt", "prompt_base", "read_prompt",
           "is_prompt_folder", "base_fingerprint"]
