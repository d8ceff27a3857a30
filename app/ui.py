"""The Gradio UI: one gr.Blocks with four tabs (Ground, Deep fusion, Teacher vs student, Prompt lab).

No model math here: callbacks call `model.predict` / `model.predictor.token_heatmaps` and `glip.explain`,
and render with `app.render`. Per-user state (gr.State) only holds the last request's parameters; every
view re-asks the predictor, whose caches make a repeat of the same image + prompt cost post-processing only.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from glip import explain
from glip.checkpoint import CheckpointError
from glip.data import NOVEL_WORDS, make_sample
from glip.draw import phrase_color
from glip.image import ImageError, load_image
from glip.prompts import PromptError, from_caption
from glip.pseudo import known_word_prompt
from glip.train.data import ATTRIBUTE_WORDS

from . import render
from .models import STUDENT, TEACHER, ModelManager

log = logging.getLogger("glip.app")
ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "assets" / "metrics.json"
MODES = {"auto": "auto", "category list": "categories", "caption": "caption"}
HEAD_MEAN = "mean of heads"
AGG_MEAN, AGG_ROLLOUT = "mean over layers", "rollout over layers"
COMBINE = {"attention mass per pixel": "density", "each level normalised": "max"}
TABLE_HEADERS = ["#", "phrase", "score", "x1", "y1", "x2", "y2"]
USER_ERRORS = (ImageError, PromptError, CheckpointError, ValueError)

CSS = """
.glip-legend {display:flex; flex-wrap:wrap; gap:6px; margin:4px 0}
.glip-chip {border:2px solid; border-radius:12px; padding:1px 8px; font-size:0.9em}
.glip-chip i {display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px}
.glip-banner {border-left:5px solid #f58231; padding-left:10px; background:rgba(245,130,49,0.08)}
"""


# --- helpers -------------------------------------------------------------------------------------------
def _spaces_gpu():
    """`spaces.GPU` when the `spaces` package imports (a no-op outside ZeroGPU Spaces), else identity."""
    try:
        import spaces

        return spaces.GPU
    except Exception:  # noqa: BLE001 - not on Spaces
        return lambda fn: fn


gpu = _spaces_gpu()


def friendly(fn):
    """User mistakes → gr.Error with the library's message; anything else → a short gr.Error (the
    traceback goes to the server log only). The app keeps serving either way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("Out of memory: try a smaller input size or fewer phrases.", print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            log.error("callback %s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(f"Something went wrong ({e.__class__.__name__}); the app is still running — try again "
                           "or with other inputs.", print_exception=False) from None

    return wrapper


def guard_input(component, what: str):
    """Make a component's preprocessing fail with a clear gr.Error (no traceback): a corrupt upload or an
    out-of-range API value then reads e.g. 'Could not read the image: ...' and the app keeps serving."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception as e:  # noqa: BLE001 - includes gr.Error, re-raised quietly
            msg = e.message if isinstance(e, gr.Error) else f"{e.__class__.__name__}"
            raise gr.Error(f"{what}: {msg}", print_exception=False) from None

    component.preprocess = preprocess
    return component


def _digest(image) -> str:
    import hashlib

    return hashlib.sha1(load_image(image).tobytes()).hexdigest()


class Scratch:
    """Files for downloads / generated images, in one temp folder; the oldest are deleted (bounded)."""

    def __init__(self, keep: int = 256):
        self.root = Path(tempfile.mkdtemp(prefix="glip_app_"))
        self.dirs: deque[Path] = deque()
        self.keep = keep
        self.lock = threading.Lock()

    def new_dir(self) -> Path:
        d = self.root / uuid.uuid4().hex[:12]
        d.mkdir()
        with self.lock:
            self.dirs.append(d)
            while len(self.dirs) > self.keep:
                shutil.rmtree(self.dirs.popleft(), ignore_errors=True)
        return d


def make_examples(folder: Path) -> list[list[str]]:
    """Synthetic scenes for the examples gallery (written once): [image path, prompt]."""
    folder.mkdir(parents=True, exist_ok=True)
    picks = [("gold_det", 0), ("gold_ground", 1), ("web", 2), ("test_novel", 3), ("gold_det", 4), ("gold_ground", 5)]
    out = []
    for split, i in picks:
        s = make_sample(split, i, 0)
        p = folder / f"{split}_{i}.png"
        if not p.is_file():
            s.image.save(p)
        out.append([str(p), s.caption.strip()])
    return out


# --- the app ---------------------------------------------------------------------------------------------
class Explorer:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.scratch = Scratch()
        self.examples = make_examples(self.scratch.root / "examples")
        self.cuda = torch.cuda.is_available()
        # fallback random weights put ~100 near-identical boxes over everything: show fewer by default
        self.max_dets = 10 if manager.missing_shipped() else 100

    # --- shared -----------------------------------------------------------------------------------------
    def model(self, name: str):
        return self.manager.get(name or self.manager.default())

    @staticmethod
    def _phrases(text: str | None) -> list[str] | None:
        if not text or not text.strip():
            return None
        return [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]

    def _params(self, image, prompt, mode, phrases, model_name, thr, nms, max_boxes, size, precision) -> dict:
        if image is None:
            raise gr.Error("Add an image first (upload, paste, or pick an example).", print_exception=False)
        if not prompt or not str(prompt).strip():
            raise gr.Error("The prompt is empty: type a caption ('a red circle next to a star') or categories "
                           "('circle . star').", print_exception=False)
        return {"image": image, "prompt": str(prompt), "mode": MODES.get(mode, "auto"), "phrases": self._phrases(phrases),
                "model": model_name or self.manager.default(), "threshold": float(thr), "nms_iou": float(nms),
                "max_dets": int(max_boxes), "min_size": int(size) or None, "precision": precision if self.cuda else "fp32"}

    def _predict(self, p: dict, output_attentions: bool = False, fusion: bool = True, threshold=None, max_dets=None):
        model = self.model(p["model"])
        size = p.get("min_size")
        return model, model.predict(
            p["image"], p["prompt"], phrases=p.get("phrases"), mode=p.get("mode", "auto"),
            threshold=p["threshold"] if threshold is None else threshold, nms_iou=p.get("nms_iou"),
            max_dets=max_dets or p.get("max_dets", 100), min_size=size, max_size=max(size, 1333) if size else None,
            precision=p.get("precision", "fp32"), output_attentions=output_attentions, fusion=fusion)

    def _image(self, p: dict):
        return load_image(p["image"])

    # --- tab 1: ground ----------------------------------------------------------------------------------
    def token_choices(self, result) -> list[str]:
        out = [f"phrase {j + 1}: {lab}" for j, lab in enumerate(render.phrase_labels(result.prompt.phrases))]
        out += [f"token {t.index}: {t.text}" for t in result.tokens if not t.special]
        return out

    @staticmethod
    def parse_choice(choice: str | None):
        """'phrase 2: …' → ('phrase', 1); 'token 5: …' → ('token', 5)."""
        if not choice:
            return "phrase", 0
        kind, rest = choice.split(" ", 1)
        return kind, int(rest.split(":", 1)[0]) - (1 if kind == "phrase" else 0)

    def ground(self, image, prompt, mode, phrases, model_name, thr, nms, max_boxes, size, precision):
        t0 = time.perf_counter()
        p = self._params(image, prompt, mode, phrases, model_name, thr, nms, max_boxes, size, precision)
        try:
            self.model(p["model"])
        except CheckpointError as e:  # e.g. an official model offline: say so, and show the default model
            gr.Warning(f"{e} — showing {self.manager.default()} instead.")
            p["model"] = self.manager.default()
        model, res = self._predict(p)
        ms = (time.perf_counter() - t0) * 1000
        return self._ground_outputs(p, model, res, ms)

    def _ground_outputs(self, p, model, res, ms, heat: bool = True):
        im = self._image(p)
        annotated = render.annotate(res, im)
        segs, cmap = render.highlighted_prompt(res.prompt)
        counts = [int((res.phrase_ids == j).sum()) for j in range(len(res.prompt.phrases))]
        table = self.table(res)
        out_dir = self.scratch.new_dir()
        png, js = out_dir / "glip_annotated.png", out_dir / "glip_detections.json"
        annotated.save(png)
        coco = res.to_coco(file_name=Path(str(p["image"])).name if isinstance(p["image"], str) else "image.png")
        coco["detections"] = res.to_json()
        js.write_text(json.dumps(coco, indent=1))
        choices = self.token_choices(res)
        pick = gr.Dropdown(choices=choices, value=choices[0] if choices else None) if heat else gr.skip()
        heat = (self.heat_gallery(model, res, im, ("phrase", 0)) if res.prompt.phrases else []) if heat else gr.skip()
        bars = self.box_bars(res, 0) if len(res) else None
        st = model.predictor.stats
        status = (f"`{p['model']}`: **{len(res)}** boxes above {p['threshold']:.2f} · {len(res.prompt.phrases)} phrases · "
                  f"{len(res.tokens)} tokens · {ms:.0f} ms · network runs so far: image {st['image_runs']}, "
                  f"text {st['text_runs']}, fusion+head {st['head_runs']}"
                  + (" · *fallback model (random weights)*" if self.manager.is_fallback(p["model"]) else ""))
        if not len(res):
            gr.Warning(f"No box scores above {p['threshold']:.2f}. Lower the score threshold in 'Advanced'.")
        return (annotated, gr.HighlightedText(value=segs, color_map=cmap), render.legend_html(res.prompt.phrases, counts),
                table, [str(png), str(js)], bars, pick, heat, status, p)

    def table(self, res):
        rows = []
        for i in range(min(len(res), render.MAX_SHOWN_BOXES)):
            x1, y1, x2, y2 = (round(float(v), 1) for v in res.boxes[i])
            rows.append([i + 1, res.phrases[i], round(float(res.scores[i]), 3), x1, y1, x2, y2])
        df = pd.DataFrame(rows, columns=TABLE_HEADERS)
        colors = [phrase_color(int(j)) for j in res.phrase_ids[: len(rows)]]
        return df.style.apply(lambda col: [f"background-color: {c}; color: white" for c in colors]
                              if col.name == "phrase" else [""] * len(col), axis=0).format(
            {"score": "{:.3f}", "x1": "{:.1f}", "y1": "{:.1f}", "x2": "{:.1f}", "y2": "{:.1f}"})

    def box_bars(self, res, i: int):
        i = int(i)
        if not 0 <= i < len(res):
            return None
        cols = render.token_colors(res.tokens, res.prompt)
        return render.token_bars(res.tokens, res.token_scores[i], cols,
                                 f"Box #{i + 1} ({res.phrases[i]}, score {res.scores[i]:.2f}): σ(S_ground) per token",
                                 mark=explain.phrase_tokens(res.prompt, res.tokens, int(res.phrase_ids[i])))

    def heat_gallery(self, model, res, im, sel):
        kind, k = sel
        if kind == "phrase":
            levels, comb = model.predictor.token_heatmaps(res, phrase=k)
            name = render.phrase_labels(res.prompt.phrases)[k]
        else:
            levels, comb = model.predictor.token_heatmaps(res, token_ids=[k])
            name = res.tokens[k].text
        out = [(render.heat_overlay(im, comb.numpy()),
                f"'{name}': σ(S_ground), levels combined (max), max {float(comb.max()):.2f}")]
        hw, strides = res.states[0].hw, model.config.anchor_strides
        for lv, m in enumerate(levels):
            up = explain.upsample(m, strides[lv], hw, im.size, mode="nearest")
            out.append((render.heat_overlay(im, up.numpy()),
                        f"P{lv + 3} (stride {strides[lv]}), {m.shape[0]}×{m.shape[1]}, max {float(m.max()):.2f}"))
        return out

    def on_row_select(self, p, evt: gr.SelectData):
        if not p:
            return gr.skip(), gr.skip()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        model, res = self._predict(p)
        if not 0 <= row < len(res):
            return gr.skip(), gr.skip()
        return self.box_bars(res, row), render.annotate(res, self._image(p), highlight=row)

    def on_token_pick(self, p, choice):
        if not p or not choice:
            return gr.skip()
        model, res = self._predict(p)
        return self.heat_gallery(model, res, self._image(p), self.parse_choice(choice))

    def on_prompt_select(self, p, evt: gr.SelectData):
        """Click on a highlighted phrase in the prompt → its heat map."""
        if not p:
            return gr.skip(), gr.skip()
        label = evt.value[1] if isinstance(evt.value, (list, tuple)) and len(evt.value) > 1 else None
        model, res = self._predict(p)
        labels = render.phrase_labels(res.prompt.phrases)
        if label not in labels:
            return gr.skip(), gr.skip()
        j = labels.index(label)
        return gr.Dropdown(value=self.token_choices(res)[j]), self.heat_gallery(model, res, self._image(p), ("phrase", j))

    def rethreshold(self, p, thr, nms, max_boxes):
        """Score / NMS / max-box changes: re-render from the cache (no network run)."""
        if not p:
            return (gr.skip(),) * 10
        p = dict(p, threshold=float(thr), nms_iou=float(nms), max_dets=int(max_boxes))
        t0 = time.perf_counter()
        model, res = self._predict(p)
        return self._ground_outputs(p, model, res, (time.perf_counter() - t0) * 1000, heat=False)  # maps: threshold-free

    def ground_json(self, image, prompt, model_name, threshold):
        """Public API: (image, prompt, model, threshold) → GroundingResult.to_json()."""
        p = self._params(image, prompt, "auto", None, model_name, threshold if threshold is not None else 0.5,
                         0.6, 100, 0, "fp32")
        p["nms_iou"] = None
        return self._predict(p)[1].to_json()

    # --- tab 2: deep fusion ------------------------------------------------------------------------------
    def fusion_setup(self, p):
        if not p:
            raise gr.Error("Run a prediction in the Ground tab first.", print_exception=False)
        model, res = self._predict(p, output_attentions=True)
        if not res.attentions:
            raise gr.Error("This model has no deep fusion layers (X-MHA), so there is no attention to show.",
                           print_exception=False)
        L = len(res.attentions)
        heads = res.attentions[0].text_to_image.shape[1]
        layers = [f"layer {i + 1}" for i in range(L)] + [AGG_MEAN, AGG_ROLLOUT]
        tok = self.token_choices(res)
        boxes = [f"box {i + 1}: {res.phrases[i]} {res.scores[i]:.2f}" for i in range(min(len(res), 30))]
        return (gr.Dropdown(choices=tok, value=tok[0] if tok else None), gr.Dropdown(choices=layers, value=layers[-1]),
                gr.Dropdown(choices=[HEAD_MEAN] + [f"head {h + 1}" for h in range(heads)], value=HEAD_MEAN),
                gr.Dropdown(choices=boxes, value=boxes[0] if boxes else None),
                f"{L} fusion layers × {heads} heads · {res.attentions[0].text_to_image.shape[-1]} image positions "
                f"(P3..P7 {res.attentions[0].level_shapes}) · {res.attentions[0].text_to_image.shape[2]} tokens")

    @staticmethod
    def _head(choice):
        return None if not choice or choice == HEAD_MEAN else int(choice.split()[1]) - 1

    def _tokens_of(self, res, choice):
        kind, k = self.parse_choice(choice)
        if kind == "phrase":
            ids = explain.phrase_tokens(res.prompt, res.tokens, k)
            return ids, render.phrase_labels(res.prompt.phrases)[k]
        return [k], res.tokens[k].text

    def fusion_text_to_image(self, p, token_choice, layer_choice, head_choice, combine):
        """Selected token(s) → where they look: combined + per level for the chosen layer/aggregate,
        and the layer strip (every layer + rollout) with its sharpness curve."""
        if not p or not token_choice:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        model, res = self._predict(p, output_attentions=True)
        atts, hw, im = res.attentions, res.states[0].hw, self._image(p)
        strides = model.config.anchor_strides
        ids, name = self._tokens_of(res, token_choice)
        if not ids:
            raise gr.Error("That phrase has no tokens inside the first 256-token chunk.", print_exception=False)
        head = self._head(head_choice)
        how = COMBINE.get(combine, "density")
        per_layer = explain.token_to_image_per_layer(atts, ids, head)

        def to_map(vec):
            levels = explain.split_levels(vec, atts[0].level_shapes, hw, strides)
            return levels, explain.combine_levels(levels, hw, im.size, strides, how)

        if layer_choice == AGG_MEAN:
            vec = explain.aggregate(per_layer, "mean")
        elif layer_choice == AGG_ROLLOUT:
            vec = explain.aggregate(per_layer, "rollout")
        else:
            vec = per_layer[int(str(layer_choice).split()[1]) - 1]
        levels, comb = to_map(vec)
        hname = "head mean" if head is None else f"head {head + 1}"
        main = [(render.heat_overlay(im, comb.numpy()), f"'{name}' → image, {layer_choice}, {hname}, levels combined")]
        for lv, m in enumerate(levels):
            up = explain.upsample(m, strides[lv], hw, im.size, mode="nearest")
            main.append((render.heat_overlay(im, up.numpy()), f"P{lv + 3}: {m.shape[0]}×{m.shape[1]}, mass {float(m.sum()):.2f}"))
        strip, sharp = [], []
        for i, v in enumerate(per_layer):
            sharp.append(explain.sharpness(v))
            strip.append((render.heat_overlay(im, to_map(v)[1].numpy()), f"layer {i + 1} · sharp {sharp[-1]:.3f}"))
        roll = explain.aggregate(per_layer, "rollout")
        strip.append((render.heat_overlay(im, to_map(roll)[1].numpy()), f"rollout · sharp {explain.sharpness(roll):.3f}"))
        strip = render.tile(strip)
        fig = render.sharpness_plot(sharp + [explain.sharpness(roll)], [f"L{i + 1}" for i in range(len(per_layer))] + ["roll"],
                                    f"How focused '{name}' is, by depth ({hname})")
        return main, strip, fig, f"Text → image for **{name}** (token ids {ids})."

    def fusion_image_to_text(self, p, box_choice, head_choice, layer_choice, point=None):
        """A box (or a clicked point) → its attention over the prompt tokens, per layer and aggregated."""
        if not p:
            return gr.skip(), gr.skip(), gr.skip()
        model, res = self._predict(p, output_attentions=True)
        atts, hw, im = res.attentions, res.states[0].hw, self._image(p)
        strides = model.config.anchor_strides
        head = self._head(head_choice)
        if point is not None:
            where = f"point ({point[0]:.0f}, {point[1]:.0f})"
            rows = [explain.image_to_text_at(a, point, hw, im.size, head, strides)[1] for a in atts]
            shown = render.mark_point(im, point)
        else:
            if not box_choice or not len(res):
                W, H = im.size
                box, where = [0, 0, W, H], "the whole image"
            else:
                i = int(box_choice.split(":")[0].split()[1]) - 1
                box, where = res.boxes[i].tolist(), f"box {i + 1} ({res.phrases[i]})"
            rows = [explain.image_to_text_in_box(a, box, hw, im.size, head, strides)[1] for a in atts]
            col = phrase_color(int(res.phrase_ids[i])) if box_choice and len(res) else "#ffffff"
            shown = render.draw_boxes(im, [box], [""], [col], width=3)
        mean, roll = explain.aggregate(rows, "mean"), explain.aggregate(rows, "rollout")
        mat = torch.stack(rows + [mean, roll]).numpy()
        labels = [f"layer {i + 1}" for i in range(len(rows))] + ["mean", "rollout"]
        hname = "head mean" if head is None else f"head {head + 1}"
        fig = render.layer_token_matrix(res.tokens, mat, f"Image → text attention of {where} ({hname})", labels)
        if layer_choice == AGG_MEAN:
            vec, lname = mean, AGG_MEAN
        elif layer_choice == AGG_ROLLOUT or not layer_choice:
            vec, lname = roll, AGG_ROLLOUT
        else:
            k = int(str(layer_choice).split()[1]) - 1
            vec, lname = rows[k], layer_choice
        bars = render.token_bars(res.tokens, vec.numpy(), render.token_colors(res.tokens, res.prompt),
                                 f"{where} → tokens, {lname}, {hname}", ylabel="attention", ylim=None)
        return shown, fig, bars

    def on_fusion_click(self, p, head_choice, layer_choice, evt: gr.SelectData):
        if not p or evt.index is None:
            return gr.skip(), gr.skip(), gr.skip()
        x, y = evt.index[:2]
        return self.fusion_image_to_text(p, None, head_choice, layer_choice, point=(float(x), float(y)))

    def ablation(self, p):
        if not p:
            raise gr.Error("Run a prediction in the Ground tab first.", print_exception=False)
        model, on = self._predict(p)
        if not model.has_fusion:
            raise gr.Error("This model has no fusion layers to switch off.", print_exception=False)
        _, off = self._predict(p, fusion=False)
        _, on0 = self._predict(p, threshold=0.0, max_dets=1000)        # best score of every phrase
        _, off0 = self._predict(p, fusion=False, threshold=0.0, max_dets=1000)
        im = self._image(p)
        a, b = explain.best_phrase_scores(on0), explain.best_phrase_scores(off0)
        names = render.phrase_labels(on.prompt.phrases)
        df = pd.DataFrame({"phrase": names, "fusion on": [round(float(v), 3) for v in a],
                           "fusion off": [round(float(v), 3) for v in b], "Δ (on − off)": [round(float(v), 3) for v in a - b]})
        fig = render.phrase_compare_plot(names, a.tolist(), b.tolist(), "fusion on", "fusion off",
                                         "Best score per phrase with and without deep fusion")
        return (render.annotate(on, im), render.annotate(off, im), df, fig,
                f"Fusion on: {len(on)} boxes · fusion off: {len(off)} boxes (threshold {p['threshold']:.2f}). "
                "Without X-MHA the image features never see the prompt: only the final dot product grounds.")

    # --- tab 3: teacher vs student --------------------------------------------------------------------------
    def web_gallery(self, seed: int, n: int = 8):
        out = []
        for i in range(n):
            s = make_sample("web", i, int(seed))
            out.append((s.image, s.caption))
        return out

    def pick_sample(self, seed, index):
        s = make_sample("web", int(index), int(seed))
        d = self.scratch.new_dir()
        path = d / s.file_name
        s.image.save(path)
        return str(path), s.caption, {"split": "web", "index": int(index), "seed": int(seed), "caption": s.caption,
                                      "digest": _digest(s.image)}

    def on_gallery_pick(self, seed, evt: gr.SelectData):
        return (int(evt.index),) + self.pick_sample(seed, int(evt.index))

    def new_sample(self, seed):
        i = random.randrange(0, 10_000)
        return (i,) + self.pick_sample(seed, i)

    def compare(self, image, caption, sample_state, t_thr, s_thr, iou, best_only: bool = True):
        if image is None:
            raise gr.Error("Pick a web sample or add an image.", print_exception=False)
        if not caption or not caption.strip():
            raise gr.Error("The caption is empty.", print_exception=False)
        prompt = from_caption(caption)
        teacher, student = self.model(TEACHER), self.model(STUDENT)
        im = load_image(image)
        # scored as `python -m glip pseudo-label` scores: by each phrase's gold-vocabulary words
        tr = teacher.predict(im, known_word_prompt(prompt, ATTRIBUTE_WORDS), threshold=float(t_thr),
                             max_dets=self.max_dets)
        sr = student.predict(im, prompt, threshold=float(s_thr), max_dets=self.max_dets)
        if best_only:  # as `pseudo-label` keeps them (max_per_phrase=1)
            tr, sr = tr.best_per_phrase(1), sr.best_per_phrase(1)
        names = render.phrase_labels(prompt.phrases)
        segs, cmap = render.highlighted_prompt(prompt, NOVEL_WORDS)
        t_img = render.annotate(tr, im)
        s_img = render.annotate(sr, im)
        gt_img, gt = None, None
        known = bool(sample_state) and sample_state.get("caption") == caption and sample_state.get("digest") == _digest(im)
        if known:
            s = make_sample(sample_state["split"], sample_state["index"], sample_state["seed"])
            gt = self._gt_boxes(s, prompt)
            gt_img = render.draw_boxes(im, gt[0], [names[j] for j in gt[1]], [phrase_color(j) for j in gt[1]], dashed=True)
        agree = explain.agreement(names, (tr.boxes, tr.phrase_ids), (sr.boxes, sr.phrase_ids), float(iou))
        rows = []
        gt_t = explain.agreement(names, gt, (tr.boxes, tr.phrase_ids), float(iou)) if gt else None
        gt_s = explain.agreement(names, gt, (sr.boxes, sr.phrase_ids), float(iou)) if gt else None
        for j, r in enumerate(agree):
            novel = any(w in NOVEL_WORDS for w in r["phrase"].lower().replace("#", " ").split())
            row = {"phrase": r["phrase"], "novel": "yes" if novel else "", "teacher": r["n_a"], "student": r["n_b"],
                   "matched": r["matched"], "teacher only": r["only_a"], "student only": r["only_b"]}
            if gt:
                row.update({"truth": gt_t[j]["n_a"], "teacher found": gt_t[j]["matched"], "student found": gt_s[j]["matched"]})
            rows.append(row)
        df = pd.DataFrame(rows)
        tot = sum(r["matched"] for r in agree)
        summary = (f"Teacher: {len(tr)} pseudo-labels (> {float(t_thr):.2f}) · student: {len(sr)} boxes (> {float(s_thr):.2f}) · "
                   f"{tot} matched at IoU ≥ {float(iou):.2f}.")
        if gt:
            summary += (f" Hidden truth: {len(gt[0])} boxes; teacher found {sum(r['matched'] for r in gt_t)}, "
                        f"student found {sum(r['matched'] for r in gt_s)}.")
        else:
            summary += " No ground truth for your own image."
        fb = [n for n in (TEACHER, STUDENT) if self.manager.is_fallback(n)]
        if fb:
            summary += f" *({', '.join(fb)}: fallback random weights.)*"
        return (gr.HighlightedText(value=segs, color_map=cmap), gt_img, t_img, s_img, df, summary)

    @staticmethod
    def _gt_boxes(sample, prompt):
        """Ground-truth boxes labelled with the prompt phrase whose span overlaps the true phrase's most."""
        boxes, labels = [], []
        for ph in sample.phrases:
            b, e = ph.span
            best, j_best = 0, None
            for j, spans in enumerate(prompt.spans):
                ov = max(max(0, min(e, se) - max(b, sb)) for sb, se in spans)
                if ov > best:
                    best, j_best = ov, j
            if j_best is None:
                continue
            for k in ph.box_ids:
                boxes.append(sample.objs[k].box)
                labels.append(j_best)
        return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, int)

    def metrics(self):
        fig, note = render.metrics_plot(METRICS)
        return gr.Plot(value=fig, visible=fig is not None), note

    # --- tab 4: prompt lab -----------------------------------------------------------------------------------
    def prompt_lab(self, image, prompt_a, prompt_b, model_name, thr):
        res = []
        for pr in (prompt_a, prompt_b):
            p = self._params(image, pr, "auto", None, model_name, thr, 0.6, self.max_dets, 0, "fp32")
            p["nms_iou"] = None
            res.append((self._predict(p)[1], self._predict(p, threshold=0.0, max_dets=1000)[1]))
        im = load_image(image)
        (ra, ra0), (rb, rb0) = res
        a, b = explain.best_phrase_scores(ra0), explain.best_phrase_scores(rb0)
        na, nb = render.phrase_labels(ra.prompt.phrases), render.phrase_labels(rb.prompt.phrases)
        n = max(len(na), len(nb))
        rows = []
        for j in range(n):
            sa = float(a[j]) if j < len(a) else float("nan")
            sb = float(b[j]) if j < len(b) else float("nan")
            rows.append({"#": j + 1, "phrase A": na[j] if j < len(na) else "", "best A": round(sa, 3),
                         "phrase B": nb[j] if j < len(nb) else "", "best B": round(sb, 3), "Δ (B − A)": round(sb - sa, 3)})
        m = min(len(na), len(nb))
        fig = render.phrase_compare_plot([f"{x} | {y}" for x, y in zip(na[:m], nb[:m])], a[:m].tolist(), b[:m].tolist(),
                                         "prompt A", "prompt B", "Best score per phrase: A vs B (paired by position)")
        sa_segs, sa_map = render.highlighted_prompt(ra.prompt)
        sb_segs, sb_map = render.highlighted_prompt(rb.prompt)
        return (render.annotate(ra, im), gr.HighlightedText(value=sa_segs, color_map=sa_map),
                render.annotate(rb, im), gr.HighlightedText(value=sb_segs, color_map=sb_map), pd.DataFrame(rows), fig)


# --- layout ------------------------------------------------------------------------------------------------
INTRO = """# GLIP Explorer
GLIP turns **object detection into phrase grounding**: the image (Swin + FPN) and the prompt (BERT) are fused
by bi-directional cross-attention (**X-MHA**) in every head layer, and each box is scored against each *token*
(S_ground = box features · token features). Type categories (`circle . star`) or a caption, and follow each
phrase's colour from the prompt to its boxes, its token scores and its heat map."""


def build_demo(manager: ModelManager | None = None) -> gr.Blocks:
    ex = Explorer(manager or ModelManager())
    choices, default = ex.manager.choices(), ex.manager.default()
    fb = bool(ex.manager.missing_shipped())  # fallback random weights score ~0.01-0.1: low default thresholds
    priv = {"api_visibility": "private"}

    with gr.Blocks(title="GLIP Explorer", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        banner = ex.manager.banner()
        gr.Markdown(banner, visible=bool(banner), elem_classes=["glip-banner"], elem_id="fallback-banner")
        ground_state = gr.State(None)
        sample_state = gr.State(None)

        with gr.Tabs():
            # ---------------------------------------------------------------- Ground
            with gr.Tab("Ground", id="ground"):
                with gr.Row():
                    with gr.Column(scale=5):
                        image_in = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=340,
                                            elem_id="image-in")
                        prompt_in = gr.Textbox(label="Prompt", lines=2, elem_id="prompt-in",
                                               placeholder="categories: 'red circle . blue star'   or a caption: 'a red circle next to a blue star'")
                        with gr.Row():
                            mode_in = gr.Radio(list(MODES), value="auto", label="Prompt type (auto-detected)")
                            model_in = gr.Dropdown(choices, value=default, label="Model")
                        phrases_in = gr.Textbox(label="Phrases to ground (optional, ';'-separated, caption only)",
                                                placeholder="e.g. red circle; blue star")
                        with gr.Accordion("Advanced", open=False):
                            thr_in = gr.Slider(0.0, 1.0, value=0.05 if fb else 0.3, step=0.01, label="Score threshold")
                            nms_in = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="NMS IoU")
                            max_in = gr.Slider(1, 300, value=ex.max_dets, step=1, label="Max boxes")
                            size_in = gr.Slider(0, 1333, value=0, step=32, label="Input size, shorter side (0 = model default)")
                            prec_in = gr.Radio(["fp32", "fp16", "bf16"], value="fp32", label="Precision (GPU only)",
                                               interactive=ex.cuda, visible=ex.cuda)
                        run_btn = gr.Button("Ground", variant="primary", elem_id="run-btn")
                        gr.Examples(ex.examples, inputs=[image_in, prompt_in], label="Synthetic scenes (click one)",
                                    examples_per_page=6)
                    with gr.Column(scale=6):
                        image_out = gr.Image(label="Boxes (coloured by phrase)", type="pil", interactive=False,
                                             elem_id="image-out", height=400)
                        prompt_out = gr.HighlightedText(label="Prompt (click a phrase for its heat map)",
                                                        show_legend=False, show_inline_category=False,
                                                        combine_adjacent=False, elem_id="prompt-out")
                        legend_out = gr.HTML()
                        status_out = gr.Markdown(elem_id="ground-status")
                        table_out = gr.Dataframe(headers=TABLE_HEADERS, label="Detections (select a row → token scores)",
                                                 interactive=False, elem_id="det-table", max_height=300)
                        files_out = gr.File(label="Downloads: annotated PNG, COCO-style JSON", file_count="multiple",
                                            height=120)
                with gr.Row():
                    with gr.Column(scale=5):
                        bars_out = gr.Plot(label="Per-token scores of the selected box", show_label=False)
                    with gr.Column(scale=6):
                        heat_pick = gr.Dropdown(label="Heat map for (phrase or token)", choices=[], elem_id="heat-pick")
                        heat_out = gr.Gallery(label="Dense S_ground: combined over levels, then P3..P7", columns=3,
                                              height="auto", object_fit="contain", elem_id="heat-gallery")

            # ---------------------------------------------------------------- Deep fusion
            with gr.Tab("Deep fusion", id="fusion"):
                gr.Markdown("X-MHA attention of every fusion layer for the Ground tab's image and prompt. "
                            "**Text → image**: where a token looks (softmax over all positions of all pyramid levels). "
                            "**Image → text**: how a region (box or clicked point) spreads its attention over the tokens. "
                            "Rollout multiplies the layers (mixed with the residual) to show what survives through depth.")
                with gr.Row():
                    fusion_btn = gr.Button("Compute attention", variant="primary", elem_id="fusion-btn")
                    fusion_info = gr.Markdown()
                with gr.Row():
                    tok_pick = gr.Dropdown(label="Token / phrase", choices=[])
                    layer_pick = gr.Dropdown(label="Layer", choices=[])
                    head_pick = gr.Dropdown(label="Head", choices=[])
                    combine_pick = gr.Radio(list(COMBINE), value="attention mass per pixel", label="Combine levels")
                t2i_note = gr.Markdown()
                t2i_out = gr.Gallery(label="Text → image: combined, then P3..P7", columns=6, height=230,
                                     object_fit="contain", elem_id="t2i-gallery")
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("**Layer strip** — the same token in every fusion layer, then the rollout")
                        strip_out = gr.Image(show_label=False, type="pil", interactive=False, elem_id="layer-strip")
                    sharp_out = gr.Plot(label="Sharpness by depth", scale=1, show_label=False)
                gr.Markdown("**Image → text** — pick a box, or click anywhere on the image.")
                with gr.Row():
                    box_pick = gr.Dropdown(label="Box", choices=[])
                with gr.Row():
                    click_img = gr.Image(label="Click a point", type="pil", interactive=False, height=340, scale=2,
                                         elem_id="click-img")
                    i2t_mat = gr.Plot(label="Per layer", scale=3, show_label=False, elem_id="i2t-mat")
                i2t_bars = gr.Plot(label="Selected layer / aggregate", show_label=False)
                gr.Markdown("**Ablation** — the same prediction with the fusion residuals switched off.")
                abl_btn = gr.Button("Compare with fusion off")
                with gr.Row():
                    abl_on = gr.Image(label="Fusion on", interactive=False, elem_id="abl-on")
                    abl_off = gr.Image(label="Fusion off", interactive=False)
                with gr.Row():
                    abl_df = gr.Dataframe(headers=["phrase", "fusion on", "fusion off", "Δ (on − off)"], interactive=False,
                                          label="Best score per phrase")
                    abl_plot = gr.Plot(show_label=False)
                abl_note = gr.Markdown()

            # ---------------------------------------------------------------- Teacher vs student
            with gr.Tab("Teacher vs student", id="teacher"):
                gr.Markdown("Self-training: the **teacher** (trained on gold, human-annotated data) pseudo-labels web "
                            "image–caption pairs (noun phrases of the caption, each scored by the words the teacher was "
                            "trained on, boxes above the pseudo-label threshold); "
                            "the **student** learns from them and can pick up **novel words** (highlighted) that the "
                            "gold data never contained.")
                with gr.Row():
                    with gr.Column(scale=2):
                        seed_in = gr.Number(value=0, precision=0, label="Seed")
                        index_in = gr.Number(value=0, precision=0, label="Web sample index")
                        with gr.Row():
                            new_btn = gr.Button("New sample")
                            load_btn = gr.Button("Load index")
                        gallery = gr.Gallery(value=ex.web_gallery(0), label="Web samples (click one)", columns=4,
                                             height=220, allow_preview=False)
                    with gr.Column(scale=3):
                        ts_image = gr.Image(type="filepath", label="Image (or bring your own)", height=300,
                                            sources=["upload", "clipboard"])
                        ts_caption = gr.Textbox(label="Caption", lines=2)
                        with gr.Row():
                            t_thr = gr.Slider(0.0, 1.0, value=0.05 if fb else 0.5, step=0.01, label="Teacher threshold")
                            s_thr = gr.Slider(0.0, 1.0, value=0.05 if fb else 0.3, step=0.01, label="Student threshold")
                            m_iou = gr.Slider(0.1, 0.95, value=0.5, step=0.05, label="Match IoU")
                        best_in = gr.Checkbox(value=True, label="Best box per phrase (what pseudo-labelling keeps)")
                        cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp-btn")
                ts_text = gr.HighlightedText(label="Caption: phrases and novel words", show_legend=True)
                with gr.Row():
                    gt_out = gr.Image(label="Ground truth (hidden for web data)", interactive=False)
                    teacher_out = gr.Image(label="Teacher pseudo-labels", interactive=False)
                    student_out = gr.Image(label="Student predictions", interactive=False)
                ts_summary = gr.Markdown()
                ts_df = gr.Dataframe(headers=["phrase", "novel", "teacher", "student", "matched", "teacher only", "student only"],
                                 interactive=False, label="Agreement per phrase", elem_id="ts-table")
                with gr.Accordion("Measured metrics (known vs novel)", open=True):
                    metrics_note = gr.Markdown()
                    metrics_plot = gr.Plot(show_label=False)

            # ---------------------------------------------------------------- Prompt lab
            with gr.Tab("Prompt lab", id="lab"):
                gr.Markdown("Same image, two prompts: a bare class name vs a descriptive prompt. GLIP's scores depend on "
                            "the words — and on the *other* words in the prompt (fusion mixes them).")
                with gr.Row():
                    lab_image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300,
                                         elem_id="lab-image")
                    with gr.Column():
                        pa = gr.Textbox(label="Prompt A", value="circle . star . square . heart")
                        pb = gr.Textbox(label="Prompt B", value="round circle . five-pointed star . square box . heart shape")
                        with gr.Row():
                            lab_model = gr.Dropdown(choices, value=default, label="Model")
                            lab_thr = gr.Slider(0.0, 1.0, value=0.05 if fb else 0.3, step=0.01, label="Score threshold")
                        lab_btn = gr.Button("Compare prompts", variant="primary")
                gr.Examples([[e[0]] for e in ex.examples[:4]], inputs=[lab_image], label="Synthetic scenes")
                with gr.Row():
                    with gr.Column():
                        lab_a = gr.Image(label="Prompt A", interactive=False, elem_id="lab-a")
                        lab_ta = gr.HighlightedText(show_legend=False, show_inline_category=False, label="A")
                    with gr.Column():
                        lab_b = gr.Image(label="Prompt B", interactive=False)
                        lab_tb = gr.HighlightedText(show_legend=False, show_inline_category=False, label="B")
                with gr.Row():
                    lab_df = gr.Dataframe(headers=["#", "phrase A", "best A", "phrase B", "best B", "Δ (B − A)"], interactive=False,
                                          label="Per-phrase best scores")
                    lab_plot = gr.Plot(show_label=False)

        # hidden endpoint: the public JSON API
        api_json = gr.JSON(visible=False)
        api_btn = gr.Button(visible=False)

        # ------------------------------------------------------------------ events
        for comp in (image_in, ts_image, lab_image):
            guard_input(comp, "Could not read the image (corrupt, or not an image)")
        for comp, what in ((thr_in, "Score threshold must be in [0, 1]"), (nms_in, "NMS IoU must be in [0.05, 1]"),
                           (max_in, "Max boxes must be in 1..300"), (size_in, "Input size must be in 0..1333"),
                           (t_thr, "Threshold must be in [0, 1]"), (s_thr, "Threshold must be in [0, 1]"),
                           (lab_thr, "Threshold must be in [0, 1]"), (m_iou, "Match IoU must be in [0.1, 0.95]")):
            guard_input(comp, what)
        ground_inputs = [image_in, prompt_in, mode_in, phrases_in, model_in, thr_in, nms_in, max_in, size_in, prec_in]
        ground_outputs = [image_out, prompt_out, legend_out, table_out, files_out, bars_out, heat_pick, heat_out,
                          status_out, ground_state]
        run_btn.click(gpu(friendly(ex.ground)), ground_inputs, ground_outputs, api_name="ground", concurrency_id="model",
                      api_visibility="undocumented")
        prompt_in.submit(gpu(friendly(ex.ground)), ground_inputs, ground_outputs, concurrency_id="model", **priv)
        for sl in (thr_in, nms_in, max_in):
            sl.release(friendly(ex.rethreshold), [ground_state, thr_in, nms_in, max_in], ground_outputs,
                       trigger_mode="always_last", show_progress="hidden", concurrency_id="model", **priv)
        table_out.select(friendly(ex.on_row_select), [ground_state], [bars_out, image_out], concurrency_id="model", **priv)
        heat_pick.input(friendly(ex.on_token_pick), [ground_state, heat_pick], [heat_out], concurrency_id="model", **priv)
        prompt_out.select(friendly(ex.on_prompt_select), [ground_state], [heat_pick, heat_out], concurrency_id="model", **priv)
        api_btn.click(gpu(friendly(ex.ground_json)), [image_in, prompt_in, model_in, thr_in], api_json,
                      api_name="ground_json", concurrency_id="model")

        t2i_inputs = [ground_state, tok_pick, layer_pick, head_pick, combine_pick]
        t2i_outputs = [t2i_out, strip_out, sharp_out, t2i_note]
        i2t_outputs = [click_img, i2t_mat, i2t_bars]
        (fusion_btn.click(gpu(friendly(ex.fusion_setup)), [ground_state], [tok_pick, layer_pick, head_pick, box_pick, fusion_info],
                          concurrency_id="model", **priv)
         .success(friendly(ex.fusion_text_to_image), t2i_inputs, t2i_outputs, concurrency_id="model", **priv)
         .success(friendly(ex.fusion_image_to_text), [ground_state, box_pick, head_pick, layer_pick], i2t_outputs,
                  concurrency_id="model", **priv))
        for c in (tok_pick, layer_pick, head_pick, combine_pick):
            c.input(friendly(ex.fusion_text_to_image), t2i_inputs, t2i_outputs, concurrency_id="model", **priv)
        for c in (box_pick, head_pick, layer_pick):
            c.input(friendly(ex.fusion_image_to_text), [ground_state, box_pick, head_pick, layer_pick], i2t_outputs,
                    concurrency_id="model", **priv)
        click_img.select(friendly(ex.on_fusion_click), [ground_state, head_pick, layer_pick], i2t_outputs,
                         concurrency_id="model", **priv)
        abl_btn.click(gpu(friendly(ex.ablation)), [ground_state], [abl_on, abl_off, abl_df, abl_plot, abl_note],
                      concurrency_id="model", **priv)

        sample_outputs = [index_in, ts_image, ts_caption, sample_state]
        gallery.select(friendly(ex.on_gallery_pick), [seed_in], sample_outputs, **priv)
        new_btn.click(friendly(ex.new_sample), [seed_in], sample_outputs, **priv)
        load_btn.click(friendly(lambda s, i: (int(i),) + ex.pick_sample(s, i)), [seed_in, index_in], sample_outputs, **priv)
        seed_in.submit(friendly(ex.web_gallery), [seed_in], [gallery], **priv)
        cmp_btn.click(gpu(friendly(ex.compare)), [ts_image, ts_caption, sample_state, t_thr, s_thr, m_iou, best_in],
                      [ts_text, gt_out, teacher_out, student_out, ts_df, ts_summary], concurrency_id="model", **priv)

        lab_btn.click(gpu(friendly(ex.prompt_lab)), [lab_image, pa, pb, lab_model, lab_thr],
                      [lab_a, lab_ta, lab_b, lab_tb, lab_df, lab_plot], concurrency_id="model", **priv)

        demo.load(ex.metrics, None, [metrics_plot, metrics_note], **priv)
        demo.load(lambda s, i: ex.pick_sample(s, i), [seed_in, index_in], [ts_image, ts_caption, sample_state], **priv)
    demo.explorer = ex
    return demo


def queue(demo: gr.Blocks, concurrency: int = 2, max_size: int = 32) -> gr.Blocks:
    return demo.queue(max_size=max_size, default_concurrency_limit=concurrency)


def launch_kwargs() -> dict:
    return {"css": CSS, "theme": gr.themes.Soft(), "show_error": True, "max_file_size": "20mb",
            "allowed_paths": []}


__all__ = ["build_demo", "queue", "launch_kwargs", "Explorer", "CSS"]
