"""Where does a trained toy GLIP keep colour and shape? Linear probes along the image path.

    python -m glip.train.diagnose --model toy-teacher --n 60 --seed 5

For every object of `n` fresh test_det scenes it reads the feature vector under the object's centre at
each stage — the input pixel, the patch embedding, the Swin stages C2–C4, the FPN level the object's
size maps to (P3 below 48 px, else P4) and the same level after the DyHead (what S_ground scores) — and
fits a softmax-regression probe for the object's colour and for its shape on 70% of the objects,
reporting accuracy on the other 30%. Chance is 1/6 for either. A stage where colour accuracy collapses
is where the network stopped carrying colour: S_ground cannot use what the region features lack.

Two more views of the same question, on the S_ground side: `attribute_token_accuracy` (do the six colour
words' logits pick the object's colour at its centre?) and `projection_spread` (how alike the text
projection makes the colour words).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

STAGES = ("pixel", "patch embed", "C2", "C3", "C4", "FPN", "DyHead")


@torch.no_grad()
def stage_features(model, n: int = 60, seed: int = 5) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """{stage: (objects, channels)} features under each object's centre, and the objects' colours / shapes."""
    from glip.data import make_sample
    from glip.preprocess import Preprocessor

    cfg, pre = model.config, Preprocessor(model.config)
    model.eval()
    body = model.backbone.body
    enc = pre.tokenize(["object"])
    text = model.encode_text(enc["input_ids"], enc["attention_mask"])
    feats = {k: [] for k in STAGES}
    colors, shapes = [], []
    for i in range(n):
        s = make_sample("test_det", i, seed)
        x = pre.image(s.image)[None]
        seen = {}
        hooks = [body.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("grid", o.shape[-2:])),
                 body.patch_embed.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("pe", o)),
                 body.register_forward_hook(lambda m, i, o: seen.__setitem__("C", list(o)))]  # a copy: the backbone pops C2
        try:
            fpn = model.encode_image(x)
        finally:
            for h in hooks:
                h.remove()
        pe = seen["pe"].transpose(1, 2).reshape(1, -1, *seen["grid"])  # (1, HW, C) tokens → (1, C, H, W)
        cs = seen["C"]
        vis = model.ground(fpn, text).visual
        f = x.shape[-1] / s.image.size[0]
        for o in s.objs:
            b = [v * f for v in o.box]
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            lvl = 0 if max(b[2] - b[0], b[3] - b[1]) < 48 else 1
            at = lambda t, stride: t[0, :, int(cy // stride), int(cx // stride)].float().numpy()  # noqa: E731
            feats["pixel"].append(at(x, 1))
            feats["patch embed"].append(at(pe, 4))
            for j, name in enumerate(("C2", "C3", "C4")):
                feats[name].append(at(cs[j], 4 * 2 ** j))
            feats["FPN"].append(at(fpn[lvl], cfg.anchor_strides[lvl]))
            feats["DyHead"].append(at(vis[lvl], cfg.anchor_strides[lvl]))
            colors.append(o.color)
            shapes.append(o.shape)
    return {k: np.stack(v) for k, v in feats.items()}, colors, shapes


def probe_accuracy(x: np.ndarray, labels: list[str], train_frac: float = 0.7, l2: float = 1e-3,
                   steps: int = 200) -> float:
    """Held-out accuracy of a softmax regression on standardised features (LBFGS, L2)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    X = torch.as_tensor(x, dtype=torch.float64)
    n_tr = int(len(y) * train_frac)
    mu, sd = X[:n_tr].mean(0), X[:n_tr].std(0) + 1e-6
    X = (X - mu) / sd
    w = torch.zeros(X.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X[:n_tr] @ w + b, y[:n_tr]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((X[n_tr:] @ w + b).argmax(1) == y[n_tr:]).double().mean())


def probe(model, n: int = 60, seed: int = 5) -> dict[str, dict[str, float]]:
    feats, colors, shapes = stage_features(model, n, seed)
    return {k: {"colour": round(probe_accuracy(v, colors), 3), "shape": round(probe_accuracy(v, shapes), 3)}
            for k, v in feats.items()} | {"n_objects": len(colors)}


def _word_list_prompt(model, words) -> tuple:
    """The prompt "w1. w2. ..." encoded by `model` (eval mode), and each word's first token position."""
    from glip.preprocess import Preprocessor
    from glip.prompts import get_tokenizer

    model.eval()
    enc = Preprocessor(model.config).tokenize([". ".join(words)])
    T = int(enc["attention_mask"].sum())
    tok, first, k = get_tokenizer(), [], 1  # [CLS] at 0, then each word's pieces and a "."
    for w in words:
        first.append(k)
        k += len(tok.tokenize(w)) + 1
    return model.encode_text(enc["input_ids"][:, :T], enc["attention_mask"][:, :T]), first


@torch.no_grad()
def attribute_token_accuracy(model, attr: str, n: int = 30, seed: int = 3) -> dict[str, float]:
    """Does S_ground tell the attribute words apart? Prompt = the six gold colours (or shapes), e.g.
    "red. green. blue. yellow. purple. orange"; at each object's centre, on P3/P4/P5, the argmax of the six
    words' logits (first word piece) must be the object's own word. No box enters, so this isolates the
    token scores from box quality (a 1/6 chance level, whatever the localisation)."""
    from glip.data import GOLD_COLORS, GOLD_SHAPES, make_sample
    from glip.preprocess import Preprocessor

    words = {"color": GOLD_COLORS, "shape": GOLD_SHAPES}[attr]
    pre = Preprocessor(model.config)
    text, first = _word_list_prompt(model, words)
    hits, total = np.zeros(3), 0
    for i in range(n):
        s = make_sample("test_det", i, seed)
        x = pre.image(s.image)[None]
        head = model.ground(model.encode_image(x), text)
        f = x.shape[-1] / s.image.size[0]
        for o in s.objs:
            cx, cy = (o.box[0] + o.box[2]) / 2 * f, (o.box[1] + o.box[3]) / 2 * f
            total += 1
            for lvl in range(3):
                H, W = head.bbox_reg[lvl].shape[-2:]
                stride = x.shape[-1] / W
                j = min(int(cy // stride), H - 1) * W + min(int(cx // stride), W - 1)
                hits[lvl] += words[int(head.token_logits[lvl][0, j, first].argmax())] == getattr(o, attr)
    return {f"P{lvl + 3}": round(float(hits[lvl] / max(total, 1)), 3) for lvl in range(3)}


@torch.no_grad()
def projection_spread(model, words: tuple[str, ...] | None = None) -> dict[str, float]:
    """How alike S_ground's text side makes a set of words (default: the gold colours, as one prompt):
    mean pairwise cosine of their projected token vectors, and the spread (mean distance from their
    centroid / mean norm). Cosine → 1 means the token scores differ by little more than the bias."""
    from glip.data import GOLD_COLORS

    words = tuple(words or GOLD_COLORS)
    cfg, head = model.config, model.rpn.head
    text, first = _word_list_prompt(model, words)
    seen = {}  # the projection as S_ground computes it (a hook, so the fused path is covered too)
    hook = head.dot_product_projection_text.register_forward_hook(lambda mod, i, o: seen.__setitem__("p", o))
    try:
        blank = torch.zeros(1, 3, cfg.min_size_test, cfg.min_size_test)
        model.ground(model.encode_image(blank), text)
    finally:
        hook.remove()
    proj = seen["p"][0, first]
    c = F.normalize(proj, dim=-1)
    m = len(words)
    return {"cosine": round(float(((c @ c.T).sum() - m) / (m * (m - 1))), 3),
            "spread": round(float((proj - proj.mean(0)).norm(dim=-1).mean() / proj.norm(dim=-1).mean()), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-teacher")
    ap.add_argument("--n", type=int, default=60, help="test_det scenes (about 4 objects each)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from glip.model import GLIP

    model = GLIP.from_pretrained(a.model)
    out = {"probe": probe(model, a.n, a.seed),
           "token_accuracy": {attr: attribute_token_accuracy(model, attr, n=a.n // 2) for attr in ("color", "shape")},
           "colour_projection": projection_spread(model)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
