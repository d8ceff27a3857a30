"""Prompt lab: one image, two prompts (a bare class name vs a descriptive prompt), the boxes of each and the
per-phrase best scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from glip import explain
from glip.draw import phrase_styles

from .. import render
from ..core import Core, friendly, gpu, named, outputs, warn
from ..examples import example_picker


@dataclass
class LabView:
    lab_a: Any = None
    lab_ta: Any = None
    lab_b: Any = None
    lab_tb: Any = None
    lab_df: Any = None
    lab_plot: Any = None
    lab_note: Any = None


class PromptLabTab:
    def __init__(self, core: Core):
        self.core = core
        self.c: dict[str, Any] = {}

    def compare(self, image, prompt_a, prompt_b, model_name, thr):
        r = self.core.resolve(model_name)
        if r.note:
            warn(r.note)
        res = []
        for pr in (prompt_a, prompt_b):
            req = self.core.request(image, pr, model=r.name, threshold=thr, nms_iou=None, max_dets=100)
            res.append((self.core.predict(req)[1], self.core.predict(req, threshold=0.0, max_dets=1000)[1]))
        im = self.core.display(str(image))
        (ra, ra0), (rb, rb0) = res
        a, b = explain.best_phrase_scores(ra0), explain.best_phrase_scores(rb0)
        na, nb = render.phrase_labels(ra.prompt.phrases), render.phrase_labels(rb.prompt.phrases)
        rows = []
        for j in range(max(len(na), len(nb))):
            sa = float(a[j]) if j < len(a) else float("nan")
            sb = float(b[j]) if j < len(b) else float("nan")
            rows.append({"#": j + 1, "phrase A": na[j] if j < len(na) else "", "best A": round(sa, 3),
                         "phrase B": nb[j] if j < len(nb) else "", "best B": round(sb, 3), "Δ (B − A)": round(sb - sa, 3)})
        m = min(len(na), len(nb))
        fig = render.phrase_compare_plot([f"{x} | {y}" for x, y in zip(na[:m], nb[:m])], a[:m].tolist(), b[:m].tolist(),
                                         "prompt A", "prompt B", "Best score per phrase: A vs B (paired by position)",
                                         colors=[st.color for st in phrase_styles(ra.prompt.phrases)][:m],
                                         colors_b=[st.color for st in phrase_styles(rb.prompt.phrases)][:m])
        sa_segs, sa_map = render.highlighted_prompt(ra.prompt)
        sb_segs, sb_map = render.highlighted_prompt(rb.prompt)
        note = "\n\n".join(x for x in (f"`{r.name}` ran.", r.note, self.core.framing(r.name, str(image))) if x)
        return LabView(lab_a=render.annotate(ra, im), lab_ta=gr.HighlightedText(value=sa_segs, color_map=sa_map),
                       lab_b=render.annotate(rb, im), lab_tb=gr.HighlightedText(value=sb_segs, color_map=sb_map),
                       lab_df=pd.DataFrame(rows), lab_plot=fig, lab_note=note)

    def on_model_pick(self, name, image):
        mm = self.core.manager
        if name not in mm.menu:
            return LabView()
        mm.start(name)
        lines = [f"**{name}** — {mm.menu[name].about}."]
        if mm.status(name).state != "ready":
            lines.append(mm.describe(name))
        framing = self.core.framing(name, image)
        return LabView(lab_note="\n\n".join(lines + ([framing] if framing else [])))

    def build(self, choices: list[str], default: str, low_thresholds: bool):
        c = self.c
        with gr.Tab("Prompt lab", id="lab"):
            gr.Markdown("Same image, two prompts: a bare class name vs a descriptive prompt. GLIP's scores depend on "
                        "the words — and on the *other* words in the prompt (fusion mixes them).")
            with gr.Row():
                c["lab_image"] = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300,
                                          elem_id="lab-image", image_mode=None)
                with gr.Column():
                    c["pa"] = gr.Textbox(label="Prompt A", value="circle . star . square . heart")
                    c["pb"] = gr.Textbox(label="Prompt B", value="round circle . five-pointed star . square box . heart shape")
                    with gr.Row():
                        c["lab_model"] = gr.Dropdown(choices, value=default, label="Model")
                        c["lab_thr"] = gr.Slider(0.0, 1.0, value=0.05 if low_thresholds else 0.3, step=0.01,
                                                 label="Score threshold")
                    c["lab_btn"] = gr.Button("Compare prompts", variant="primary")
                    c["lab_note"] = gr.Markdown(elem_classes=["glip-note"])
            c["examples"] = example_picker([[e[0]] for e in self.core.examples[:4]], [c["lab_image"]],
                                           "Synthetic scenes (click one)", elem_id="lab-examples",
                                           api_visibility="private",
                                           concurrency_id="light")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**Prompt A**")
                    c["lab_a"] = gr.Image(show_label=False, interactive=False, elem_id="lab-a")
                    c["lab_ta"] = gr.HighlightedText(show_legend=False, show_inline_category=False, label="A")
                with gr.Column():
                    gr.Markdown("**Prompt B**")
                    c["lab_b"] = gr.Image(show_label=False, interactive=False)
                    c["lab_tb"] = gr.HighlightedText(show_legend=False, show_inline_category=False, label="B")
            with gr.Row():
                c["lab_df"] = gr.Dataframe(headers=["#", "phrase A", "best A", "phrase B", "best B", "Δ (B − A)"],
                                           interactive=False, label="Per-phrase best scores")
                c["lab_plot"] = gr.Plot(show_label=False)
        return self

    def wire(self, priv: dict):
        c = self.c
        outs = outputs(LabView, c)
        c["lab_btn"].click(gpu(friendly(named(self.compare, c))),
                           [c["lab_image"], c["pa"], c["pb"], c["lab_model"], c["lab_thr"]], outs,
                           concurrency_id="model", **priv)
        return c["lab_model"].input(friendly(named(self.on_model_pick, c)), [c["lab_model"], c["lab_image"]], outs,
                                    concurrency_id="light", **priv)
