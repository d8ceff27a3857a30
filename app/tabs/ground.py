"""Ground: image + prompt → boxes coloured by phrase, the highlighted prompt, a detections table, per-token scores
of a selected box, dense S_ground heat maps, downloads; and the public `/ground_json` API."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from glip import explain
from glip.draw import phrase_styles

from .. import render
from ..core import Core, friendly, gpu, named, outputs, warn
from ..examples import example_picker
from ..limits import MAX_PHRASES, MAX_PROMPT_CHARS
from ..state import GroundRequest

MODES = {"auto": "auto", "category list": "categories", "caption": "caption"}
SHOW = ("auto", "best box per phrase", "all boxes")
CROWDED = 12            # "auto" shows the best box per phrase above this many boxes
TABLE_HEADERS = ["#", "phrase", "score", "x1", "y1", "x2", "y2"]


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


@dataclass
class GroundView:
    image_out: Any = None
    prompt_out: Any = None
    legend_out: Any = None
    table_out: Any = None
    files_out: Any = None
    bars_out: Any = None
    heat_pick: Any = None
    heat_out: Any = None
    status_out: Any = None
    note_out: Any = None
    state: Any = None


class GroundTab:
    def __init__(self, core: Core):
        self.core = core
        self.c: dict[str, Any] = {}

    # --- callbacks ----------------------------------------------------------------------------------------------
    def ground(self, image, prompt, mode, phrases, model_name, thr, nms, max_boxes, size, precision, show="auto",
               progress=gr.Progress()):
        t0 = time.perf_counter()
        req = self.core.request(image, prompt, MODES.get(mode, "auto"), phrases, model_name, thr, nms, max_boxes, size,
                                precision)
        r = self.core.resolve(req.model)
        req = req.replace(ran=r.name)
        if r.note:
            warn(r.note)
        return self._view(req, show, t0, note=r.note, progress=progress)

    def rethreshold(self, req: GroundRequest | None, thr, nms, max_boxes, show="auto"):
        """Score / NMS / max-box / show changes: re-render from the predictor's cache (no network run)."""
        if not req:
            return GroundView()
        req = req.replace(threshold=float(thr), nms_iou=float(nms), max_dets=int(max_boxes))
        return self._view(req, show, time.perf_counter(), heat=False)

    def _view(self, req: GroundRequest, show: str, t0: float, heat: bool = True, note: str = "",
              progress=None) -> GroundView:
        model, full = self.core.predict(req.replace(best_only=False), progress=progress)
        best = show == "best box per phrase" or (show == "auto" and len(full) > CROWDED)
        req = req.replace(best_only=best)
        res = full.best_per_phrase(1) if best else full
        ms = (time.perf_counter() - t0) * 1000
        im = self.core.display(req.image)
        out_dir = self.core.scratch.new_dir()
        png, js = out_dir / "glip_annotated.png", out_dir / "glip_detections.json"
        annotated = render.annotate(res, im)
        annotated.save(png)
        coco = res.to_coco(file_name=Path(req.image).name)
        coco["detections"] = res.to_json()
        js.write_text(json.dumps(coco, indent=1))
        segs, cmap = render.highlighted_prompt(res.prompt)
        counts = [int((res.phrase_ids == j).sum()) for j in range(len(res.prompt.phrases))]
        view = GroundView(image_out=annotated, prompt_out=gr.HighlightedText(value=segs, color_map=cmap),
                          legend_out=render.legend_html(res.prompt.phrases, counts), table_out=self.table(res),
                          files_out=[str(png), str(js)],
                          bars_out=self.box_bars(res, 0) if len(res) else gr.update(value=None),  # no stale chart
                          state=req)
        if heat:
            choices = self.token_choices(res)
            view.heat_pick = gr.Dropdown(choices=choices, value=choices[0] if choices else None)
            view.heat_out = self.heat_gallery(model, res, im, ("phrase", 0)) if res.prompt.phrases else []
        st = model.predictor.stats
        if best and len(full) > len(res):
            shown = f"the best box of each phrase ({len(full)} above the threshold: pick 'all boxes' to see them)"
        elif len(res) > render.MAX_SHOWN_BOXES:
            shown = (f"{render.MAX_SHOWN_BOXES} of the {len(res)} boxes (the image and the table show at most "
                     f"{render.MAX_SHOWN_BOXES})")
        else:
            shown = _count(len(res), "box", "boxes")
        ran = f"`{req.ran}`" + (f" (you picked `{req.model}`)" if req.ran != req.model else "")
        size = self.core.input_size(model, req.min_size)[0] or model.config.min_size_test
        view.status_out = (f"{ran}: showing {shown} above {req.threshold:.2f} · "
                           f"{_count(len(res.prompt.phrases), 'phrase', 'phrases')} · input {size} px · "
                           f"{_count(len(res.tokens), 'token', 'tokens')} · {ms:.0f} ms · network runs so far: image {st['image_runs']}, "
                           f"text {st['text_runs']}, fusion+head {st['head_runs']}"
                           + (" · *fallback model (random weights)*" if self.core.manager.is_fallback(req.ran) else ""))
        view.note_out = "\n\n".join(x for x in (note, self.core.framing(req.ran, req.image)) if x)
        if not len(full):
            warn(f"No box scores above {req.threshold:.2f}. Lower the score threshold in 'Advanced'.")
        return view

    def table(self, res):
        rows = []
        for i in range(min(len(res), render.MAX_SHOWN_BOXES)):
            x1, y1, x2, y2 = (round(float(v), 1) for v in res.boxes[i])
            rows.append([i + 1, res.phrases[i], round(float(res.scores[i]), 3), x1, y1, x2, y2])
        df = pd.DataFrame(rows, columns=TABLE_HEADERS)
        styles = phrase_styles(res.prompt.phrases)
        cells = [render.cell_css(styles[int(j)].color) for j in res.phrase_ids[: len(rows)]]
        return df.style.apply(lambda col: cells if col.name == "phrase" else [""] * len(col), axis=0).format(
            {"score": "{:.3f}", "x1": "{:.1f}", "y1": "{:.1f}", "x2": "{:.1f}", "y2": "{:.1f}"})

    def box_bars(self, res, i: int):
        i = int(i)
        if not 0 <= i < len(res):
            return None
        cols = render.token_colors(res.tokens, res.prompt)
        return render.token_bars(res.tokens, res.token_scores[i], cols,
                                 f"Box #{i + 1} ({res.phrases[i]}, score {res.scores[i]:.2f} = √(phrase σ × centerness)): "
                                 "σ(S_ground) per token",
                                 mark=explain.phrase_tokens(res.prompt, res.tokens, int(res.phrase_ids[i])))

    @staticmethod
    def token_choices(result) -> list[str]:
        out = [f"phrase {j + 1}: {lab}" for j, lab in enumerate(render.phrase_labels(result.prompt.phrases))]
        return out + [f"token {t.index}: {t.text}" for t in result.tokens if not t.special]

    @staticmethod
    def parse_choice(choice: str | None):
        """'phrase 2: …' → ('phrase', 1); 'token 5: …' → ('token', 5)."""
        if not choice:
            return "phrase", 0
        kind, rest = choice.split(" ", 1)
        return kind, int(rest.split(":", 1)[0]) - (1 if kind == "phrase" else 0)

    def heat_gallery(self, model, res, im, sel):
        kind, k = sel
        if kind == "phrase":
            levels, comb = model.predictor.token_heatmaps(res, phrase=k, size=im.size)
        else:
            levels, comb = model.predictor.token_heatmaps(res, token_ids=[k], size=im.size)
        # one colour scale for every tile, 0 to the highest score on any level: a level that scores nothing stays
        # dark instead of being stretched into hot spots
        scale = (0.0, max([float(comb.max())] + [float(m.max()) for m in levels]))
        out = [(render.heat_overlay(im, comb.numpy(), scale=scale),
                f"combined, max {float(comb.max()):.2f}")]  # captions overlay the tile: one short line each
        hw, strides = res.states[0].hw, model.config.anchor_strides
        for lv, m in enumerate(levels):
            up = explain.upsample(m, strides[lv], hw, im.size, mode="nearest")
            out.append((render.heat_overlay(im, up.numpy(), scale=scale),
                        f"P{lv + 3}: {m.shape[0]}×{m.shape[1]}, max {float(m.max()):.2f}"))
        return out

    def on_row_select(self, req: GroundRequest | None, evt: gr.SelectData):
        if not req:
            return GroundView()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        model, res = self.core.predict(req)
        if not 0 <= row < len(res):
            return GroundView()
        return GroundView(bars_out=self.box_bars(res, row),
                          image_out=render.annotate(res, self.core.display(req.image), highlight=row))

    def on_token_pick(self, req: GroundRequest | None, choice):
        if not req or not choice:
            return GroundView()
        model, res = self.core.predict(req)
        return GroundView(heat_out=self.heat_gallery(model, res, self.core.display(req.image), self.parse_choice(choice)))

    def on_prompt_select(self, req: GroundRequest | None, evt: gr.SelectData):
        """Click on a highlighted phrase in the prompt → its heat map."""
        if not req:
            return GroundView()
        label = evt.value[1] if isinstance(evt.value, (list, tuple)) and len(evt.value) > 1 else None
        model, res = self.core.predict(req)
        labels = render.phrase_labels(res.prompt.phrases)
        if label not in labels:
            return GroundView()
        j = labels.index(label)
        return GroundView(heat_pick=gr.Dropdown(value=self.token_choices(res)[j]),
                          heat_out=self.heat_gallery(model, res, self.core.display(req.image), ("phrase", j)))

    def on_model_pick(self, name, image):
        """A pick starts loading (a download for a release) and says what the model is."""
        mm = self.core.manager
        if name not in mm.menu:
            return GroundView()
        mm.start(name)
        lines = [f"**{name}** — {mm.menu[name].about}."]
        if mm.status(name).state != "ready":
            lines.append(mm.describe(name))
        framing = self.core.framing(name, image)
        return GroundView(note_out="\n\n".join(lines + ([framing] if framing else [])))

    def ground_json(self, image, prompt, model_name, threshold):
        """Public API: (image, prompt, model, threshold) → {"model", "image_size", "caption", "detections"}; each
        detection's `span` indexes `caption`, the prompt as the model read it."""
        req = self.core.request(image, prompt, "auto", None, model_name, 0.5 if threshold is None else threshold, None)
        model = self.core.manager.get(req.model)  # the model asked for, or a clear error (never a silent substitute)
        _, res = self.core.predict(req, model=model)
        return {"model": req.model, "image_size": [int(v) for v in res.image_size], "caption": res.prompt.caption,
                "detections": res.to_json()}

    # --- layout and wiring --------------------------------------------------------------------------------------
    def build(self, choices: list[str], default: str, low_thresholds: bool):
        c, core = self.c, self.core
        with gr.Tab("Ground", id="ground"):
            c["state"] = gr.State(None)
            with gr.Row():
                with gr.Column(scale=5):
                    c["image_in"] = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                             height=340, elem_id="image-in", image_mode=None)
                    c["prompt_in"] = gr.Textbox(
                        label=f"Prompt (at most {MAX_PHRASES} phrases, {MAX_PROMPT_CHARS:,} characters)", lines=2,
                        elem_id="prompt-in",
                        placeholder="categories: 'person . dog . frisbee'   or a caption: 'a dog catching a red frisbee'")
                    with gr.Row():
                        c["mode_in"] = gr.Radio(list(MODES), value="auto", label="Prompt type (auto-detected)")
                        c["model_in"] = gr.Dropdown(choices, value=default, label="Model", elem_id="model-in")
                    c["note_out"] = gr.Markdown(core.framing(default), elem_id="model-note",
                                                elem_classes=["glip-note"])
                    c["phrases_in"] = gr.Textbox(label="Phrases to ground (optional, ';'-separated, caption only)",
                                                 placeholder="e.g. red circle; blue star")
                    c["show_in"] = gr.Radio(list(SHOW), value="auto", label="Boxes to show",
                                            info=f"auto: the best box per phrase when more than {CROWDED} pass the threshold")
                    with gr.Accordion("Advanced", open=False):
                        c["thr_in"] = gr.Slider(0.0, 1.0, value=0.05 if low_thresholds else 0.3, step=0.01,
                                                label="Score threshold")
                        c["nms_in"] = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="NMS IoU")
                        c["max_in"] = gr.Slider(1, 300, value=10 if low_thresholds else 100, step=1, label="Max boxes")
                        c["size_in"] = gr.Slider(0, 1333, value=0, step=32,
                                                 label="Input size, shorter side (0 = model default)")
                        c["prec_in"] = gr.Radio(["fp32", "fp16", "bf16"], value="fp32", label="Precision (GPU only)",
                                                interactive=core.cuda, visible=core.cuda)
                    c["run_btn"] = gr.Button("Ground", variant="primary", elem_id="run-btn")
                    c["examples"] = example_picker(core.examples, [c["image_in"], c["prompt_in"]],
                                                   "Synthetic scenes (click one)", elem_id="ground-examples",
                                                   headers=["Image", "Prompt"], api_visibility="private",
                                                   concurrency_id="light")
                with gr.Column(scale=6):
                    gr.Markdown("**Boxes** (coloured by phrase; line style tells phrases of the same colour apart)")
                    c["image_out"] = gr.Image(show_label=False, type="pil", interactive=False, elem_id="image-out",
                                              height=560)
                    c["prompt_out"] = gr.HighlightedText(label="Prompt (click a phrase for its heat map)",
                                                         show_legend=False, show_inline_category=False,
                                                         combine_adjacent=False, elem_id="prompt-out")
                    c["legend_out"] = gr.HTML()
                    c["status_out"] = gr.Markdown(elem_id="ground-status")
                    c["table_out"] = gr.Dataframe(headers=TABLE_HEADERS, label="Detections (select a row → token scores)",
                                                  interactive=False, elem_id="det-table", max_height=300)
                    c["files_out"] = gr.File(label="Downloads: annotated PNG, COCO-style JSON", file_count="multiple",
                                             height=120)
            c["bars_out"] = gr.Plot(label="Per-token scores of the selected box", show_label=False, elem_id="token-bars")
            c["heat_pick"] = gr.Dropdown(label="Heat map for (phrase or token)", choices=[], elem_id="heat-pick")
            c["heat_out"] = gr.Gallery(label="Dense S_ground of the picked phrase or token: combined over levels, then P3..P7, "
                                             "one colour scale for every tile (0 to the highest max)", columns=6,
                                       height="auto", object_fit="contain", elem_id="heat-gallery")
        return self

    def wire(self, priv: dict):
        c = self.c
        outs = outputs(GroundView, c)
        inputs = [c[k] for k in ("image_in", "prompt_in", "mode_in", "phrases_in", "model_in", "thr_in", "nms_in",
                                 "max_in", "size_in", "prec_in", "show_in")]
        run = gpu(friendly(named(self.ground, c)))
        c["run_btn"].click(run, inputs, outs, concurrency_id="model", **priv)
        c["prompt_in"].submit(run, inputs, outs, concurrency_id="model", **priv)
        rethr = friendly(named(self.rethreshold, c))
        for sl in (c["thr_in"], c["nms_in"], c["max_in"]):
            sl.release(rethr, [c["state"], c["thr_in"], c["nms_in"], c["max_in"], c["show_in"]], outs,
                       trigger_mode="always_last", show_progress="hidden", concurrency_id="model", **priv)
        c["show_in"].input(rethr, [c["state"], c["thr_in"], c["nms_in"], c["max_in"], c["show_in"]], outs,
                           show_progress="hidden", concurrency_id="model", **priv)
        c["table_out"].select(friendly(named(self.on_row_select, c)), [c["state"]], outs, concurrency_id="model", **priv)
        c["heat_pick"].input(friendly(named(self.on_token_pick, c)), [c["state"], c["heat_pick"]], [c["heat_out"]],
                             concurrency_id="model", **priv)  # writes the maps only: never the menu it reads
        c["prompt_out"].select(friendly(named(self.on_prompt_select, c)), [c["state"]], outs, concurrency_id="model",
                               **priv)
        return c["model_in"].input(friendly(named(self.on_model_pick, c)), [c["model_in"], c["image_in"]], outs,
                                   concurrency_id="light", **priv)
