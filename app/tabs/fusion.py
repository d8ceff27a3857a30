"""Deep fusion: the X-MHA attention of every fusion layer for the Ground tab's image and prompt (text → image,
image → text, through depth), and the ablation with fusion switched off."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
import torch

from glip import explain
from glip.draw import phrase_styles

from .. import render
from ..core import Core, components, friendly, gpu, named, user_error
from ..state import GroundRequest
from .ground import GroundTab

HEAD_MEAN = "mean of heads"
AGG_MEAN, AGG_ROLLOUT = "mean over layers", "rollout over layers"
COMBINE = {"attention mass per pixel": "density", "each level normalised": "max"}
ABOUT = """**What this attention is, and is not.** Each fusion layer lets every prompt token attend to every image
position of all five pyramid levels (text → image), and every image position attend to the tokens (image → text).
This is *not* a localisation map: the boxes come from S_ground (the Ground tab's heat maps), after more layers.
Attention is a softmax, so it must go somewhere: **[CLS]** and **[SEP]** often soak up most of it, and early layers
spread it widely. A blurry or [CLS]-heavy map is normal, not a bug; watch how it sharpens with depth."""


@dataclass
class FusionView:
    tok_pick: Any = None
    layer_pick: Any = None
    head_pick: Any = None
    box_pick: Any = None
    fusion_info: Any = None
    t2i_out: Any = None
    strip_out: Any = None
    sharp_out: Any = None
    t2i_note: Any = None
    click_img: Any = None
    i2t_mat: Any = None
    i2t_bars: Any = None
    abl_on: Any = None
    abl_off: Any = None
    abl_df: Any = None
    abl_plot: Any = None
    abl_note: Any = None


def _need(req):
    if not req:
        raise user_error("Run a prediction in the Ground tab first.")


class FusionTab:
    def __init__(self, core: Core):
        self.core = core
        self.c: dict[str, Any] = {}

    def setup(self, req: GroundRequest | None):
        _need(req)
        model, res = self.core.predict(req, output_attentions=True)
        if not res.attentions:
            raise user_error(f"{req.ran} has no deep fusion layers (X-MHA), so there is no attention to show.")
        a0 = res.attentions[0]
        L, heads = len(res.attentions), a0.text_to_image.shape[1]
        layers = [f"layer {i + 1}" for i in range(L)] + [AGG_MEAN, AGG_ROLLOUT]
        tok = GroundTab.token_choices(res)
        boxes = [f"box {i + 1}: {res.phrases[i]} {res.scores[i]:.2f}" for i in range(min(len(res), 30))]
        return FusionView(
            tok_pick=gr.Dropdown(choices=tok, value=tok[0] if tok else None),
            layer_pick=gr.Dropdown(choices=layers, value=layers[-1]),
            head_pick=gr.Dropdown(choices=[HEAD_MEAN] + [f"head {h + 1}" for h in range(heads)], value=HEAD_MEAN),
            box_pick=gr.Dropdown(choices=boxes, value=boxes[0] if boxes else None),
            fusion_info=(f"`{req.ran}`: {L} fusion layers × {heads} heads · {a0.text_to_image.shape[-1]} image positions "
                         f"(P3..P7 {a0.level_shapes}) · {a0.text_to_image.shape[2]} tokens"))

    @staticmethod
    def _head(choice):
        return None if not choice or choice == HEAD_MEAN else int(choice.split()[1]) - 1

    @staticmethod
    def _tokens_of(res, choice):
        kind, k = GroundTab.parse_choice(choice)
        if kind == "phrase":
            return explain.phrase_tokens(res.prompt, res.tokens, k), render.phrase_labels(res.prompt.phrases)[k]
        return [k], res.tokens[k].text

    def text_to_image(self, req: GroundRequest | None, token_choice, layer_choice, head_choice, combine):
        """Selected token(s) → where they look: combined + per level for the chosen layer/aggregate, and the layer
        strip (every layer + rollout) with its sharpness curve."""
        if not req or not token_choice:
            return FusionView()
        model, res = self.core.predict(req, output_attentions=True)
        atts, hw, im = res.attentions, res.states[0].hw, self.core.display(req.image)
        strides = model.config.anchor_strides
        ids, name = self._tokens_of(res, token_choice)
        if not ids:
            raise user_error("That phrase has no tokens inside the first prompt chunk.")
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
        main = [(render.heat_overlay(im, comb.numpy()), "all levels combined")]  # one short line: it overlays the tile
        for lv, m in enumerate(levels):
            up = explain.upsample(m, strides[lv], hw, im.size, mode="nearest")
            main.append((render.heat_overlay(im, up.numpy()), f"P{lv + 3}: {m.shape[0]}×{m.shape[1]}, mass {float(m.sum()):.2f}"))
        strip, sharp = [], []
        for i, v in enumerate(per_layer):
            sharp.append(explain.sharpness(v))
            strip.append((render.heat_overlay(im, to_map(v)[1].numpy()), f"layer {i + 1} · sharpness {sharp[-1]:.3f}"))
        roll = explain.aggregate(per_layer, "rollout")
        strip.append((render.heat_overlay(im, to_map(roll)[1].numpy()), f"rollout · sharpness {explain.sharpness(roll):.3f}"))
        fig = render.sharpness_plot(sharp + [explain.sharpness(roll)],
                                    [f"layer {i + 1}" for i in range(len(per_layer))] + ["rollout"],
                                    f"How focused '{name}' is, by depth ({hname})")
        return FusionView(t2i_out=main, strip_out=render.tile(strip), sharp_out=fig,
                          t2i_note=f"Text → image for **{name}** (token ids {ids}), {layer_choice}, {hname}.")

    def image_to_text(self, req: GroundRequest | None, box_choice, head_choice, layer_choice, point=None):
        """A box (or a clicked point, in display pixels) → its attention over the prompt tokens, per layer and
        aggregated."""
        if not req:
            return FusionView()
        model, res = self.core.predict(req, output_attentions=True)
        atts, hw, im = res.attentions, res.states[0].hw, self.core.display(req.image)
        frame = tuple(res.image_size)          # the boxes' frame; `im` is a display copy of it
        strides = model.config.anchor_strides
        head = self._head(head_choice)
        if point is not None:
            xy = (point[0] * frame[0] / im.width, point[1] * frame[1] / im.height)
            where = f"point ({xy[0]:.0f}, {xy[1]:.0f})"
            rows = [explain.image_to_text_at(a, xy, hw, frame, head, strides)[1] for a in atts]
            shown = render.mark_point(im, point)
        else:
            if not box_choice or not len(res):
                box, where, style = [0, 0, frame[0], frame[1]], "the whole image", None
            else:
                i = int(box_choice.split(":")[0].split()[1]) - 1
                box, where = res.boxes[i].tolist(), f"box {i + 1} ({res.phrases[i]})"
                style = phrase_styles(res.prompt.phrases)[int(res.phrase_ids[i])]
            rows = [explain.image_to_text_in_box(a, box, hw, frame, head, strides)[1] for a in atts]
            shown = render.plain_boxes(im, [box], [""], [style], source_size=frame) if style else im
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
            vec, lname = rows[int(str(layer_choice).split()[1]) - 1], layer_choice
        bars = render.token_bars(res.tokens, vec.numpy(), render.token_colors(res.tokens, res.prompt),
                                 f"{where} → tokens, {lname}, {hname}", ylabel="attention", ylim=None)
        return FusionView(click_img=shown, i2t_mat=fig, i2t_bars=bars)

    def on_click(self, req: GroundRequest | None, head_choice, layer_choice, evt: gr.SelectData):
        if not req or evt.index is None:
            return FusionView()
        x, y = evt.index[:2]
        return self.image_to_text(req, None, head_choice, layer_choice, point=(float(x), float(y)))

    def ablation(self, req: GroundRequest | None):
        _need(req)
        model, on = self.core.predict(req)
        if not model.has_fusion:
            raise user_error(f"{req.ran} has no fusion layers to switch off.")
        _, off = self.core.predict(req, fusion=False)
        _, on0 = self.core.predict(req, threshold=0.0, max_dets=1000)        # best score of every phrase
        _, off0 = self.core.predict(req, fusion=False, threshold=0.0, max_dets=1000)
        im = self.core.display(req.image)
        a, b = explain.best_phrase_scores(on0), explain.best_phrase_scores(off0)
        names = render.phrase_labels(on.prompt.phrases)
        df = pd.DataFrame({"phrase": names, "fusion on": [round(float(v), 3) for v in a],
                           "fusion off": [round(float(v), 3) for v in b], "Δ (on − off)": [round(float(v), 3) for v in a - b]})
        fig = render.phrase_compare_plot(names, a.tolist(), b.tolist(), "fusion on", "fusion off",
                                         "Best score per phrase with and without deep fusion",
                                         colors=[s.color for s in phrase_styles(on.prompt.phrases)])
        return FusionView(abl_on=render.annotate(on, im), abl_off=render.annotate(off, im), abl_df=df, abl_plot=fig,
                          abl_note=(f"`{req.ran}` · fusion on: {len(on)} boxes · fusion off: {len(off)} boxes (threshold "
                                    f"{req.threshold:.2f}). Without X-MHA the image features never see the prompt: only "
                                    "the final dot product grounds."))

    # --- layout and wiring --------------------------------------------------------------------------------------
    def build(self):
        c = self.c
        with gr.Tab("Deep fusion", id="fusion"):
            gr.Markdown("X-MHA attention of every fusion layer for the Ground tab's image and prompt. "
                        "**Text → image**: where a token looks (softmax over all positions of all pyramid levels). "
                        "**Image → text**: how a region (box or clicked point) spreads its attention over the tokens. "
                        "Rollout multiplies the layers (mixed with the residual) to show what survives through depth.")
            gr.Markdown(ABOUT, elem_classes=["glip-note"], elem_id="fusion-about")
            with gr.Row():
                c["fusion_btn"] = gr.Button("Compute attention", variant="primary", elem_id="fusion-btn")
                c["fusion_info"] = gr.Markdown()
            with gr.Row():
                c["tok_pick"] = gr.Dropdown(label="Token / phrase", choices=[])
                c["layer_pick"] = gr.Dropdown(label="Layer", choices=[])
                c["head_pick"] = gr.Dropdown(label="Head", choices=[])
                c["combine_pick"] = gr.Radio(list(COMBINE), value="attention mass per pixel", label="Combine levels")
            c["t2i_note"] = gr.Markdown()
            c["t2i_out"] = gr.Gallery(label="Text → image: combined, then P3..P7", columns=6, height="auto",
                                      object_fit="contain", elem_id="t2i-gallery")
            gr.Markdown("**Layer strip** — the same token in every fusion layer, then the rollout")
            c["strip_out"] = gr.Image(show_label=False, type="pil", interactive=False, elem_id="layer-strip")
            c["sharp_out"] = gr.Plot(label="Sharpness by depth", show_label=False, elem_id="sharpness")
            gr.Markdown("**Image → text** — pick a box, or click anywhere on the image.")
            c["box_pick"] = gr.Dropdown(label="Box", choices=[])
            with gr.Row():
                c["click_img"] = gr.Image(label="Click a point", type="pil", interactive=False, height=340, scale=2,
                                          elem_id="click-img", show_label=False)
                with gr.Column(scale=3):
                    c["i2t_mat"] = gr.Plot(label="Per layer", show_label=False, elem_id="i2t-mat")
            c["i2t_bars"] = gr.Plot(label="Selected layer / aggregate", show_label=False)
            gr.Markdown("**Ablation** — the same prediction with the fusion residuals switched off.")
            c["abl_btn"] = gr.Button("Compare with fusion off")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**Fusion on**")
                    c["abl_on"] = gr.Image(show_label=False, interactive=False, elem_id="abl-on")
                with gr.Column():
                    gr.Markdown("**Fusion off**")
                    c["abl_off"] = gr.Image(show_label=False, interactive=False)
            with gr.Row():
                c["abl_df"] = gr.Dataframe(headers=["phrase", "fusion on", "fusion off", "Δ (on − off)"],
                                           interactive=False, label="Best score per phrase")
                c["abl_plot"] = gr.Plot(show_label=False)
            c["abl_note"] = gr.Markdown()
        return self

    def wire(self, state, priv: dict):
        c = self.c

        outs = functools.partial(components, c)  # each event writes only what it sets: never a menu it reads
        setup_out = outs("tok_pick", "layer_pick", "head_pick", "box_pick", "fusion_info")
        t2i_out = outs("t2i_out", "strip_out", "sharp_out", "t2i_note")
        i2t_out = outs("click_img", "i2t_mat", "i2t_bars")
        t2i = friendly(named(self.text_to_image, c))
        i2t = friendly(named(self.image_to_text, c))
        t2i_in = [state, c["tok_pick"], c["layer_pick"], c["head_pick"], c["combine_pick"]]
        i2t_in = [state, c["box_pick"], c["head_pick"], c["layer_pick"]]
        (c["fusion_btn"].click(gpu(friendly(named(self.setup, c))), [state], setup_out, concurrency_id="model", **priv)
         .success(t2i, t2i_in, t2i_out, concurrency_id="model", **priv)
         .success(i2t, i2t_in, i2t_out, concurrency_id="model", **priv))
        for k in ("tok_pick", "layer_pick", "head_pick", "combine_pick"):
            c[k].input(t2i, t2i_in, t2i_out, concurrency_id="model", **priv)
        for k in ("box_pick", "head_pick", "layer_pick"):
            c[k].input(i2t, i2t_in, i2t_out, concurrency_id="model", **priv)
        c["click_img"].select(friendly(named(self.on_click, c)), [state, c["head_pick"], c["layer_pick"]], i2t_out,
                              concurrency_id="model", **priv)
        c["abl_btn"].click(gpu(friendly(named(self.ablation, c))), [state],
                           outs("abl_on", "abl_off", "abl_df", "abl_plot", "abl_note"), concurrency_id="model", **priv)
