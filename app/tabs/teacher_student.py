"""Teacher vs student: any two models on one image + caption. The teacher's pseudo-labels (made as the labelling
command makes them) beside the student's predictions, their agreement per phrase, and the phrases where they
differ most. Presets: the toy pair on the synthetic world (its hidden truth shown) and the paper's released pair."""
from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from glip import explain
from glip.draw import phrase_styles
from glip.label import LabelSettings, label_pair
from glip.prompts import from_caption

from .. import render
from ..core import Core, components, friendly, gpu, named, user_error, warn
from ..models import STUDENT, TEACHER
from ..state import WebSample

ROOT = Path(__file__).resolve().parents[2]
METRICS = ROOT / "assets" / "metrics.json"
PRESETS = {
    "toy-teacher → toy-student (synthetic world, ground truth shown)": (TEACHER, STUDENT),
    "GLIP-T (C) → GLIP-T (the paper's released pair)": ("GLIP-T (C)", "GLIP-T"),
}


LABEL_DEFAULTS = LabelSettings()  # the labelling command's threshold and per-phrase rule are the tab's defaults


def teacher_settings(vocab: frozenset[str] | None, threshold: float, best_only: bool) -> LabelSettings:
    """The labelling command's settings for this teacher: its phrases scored by the words it knows (`--score-words
    known`) when it has a vocabulary, by all their tokens otherwise (a released GLIP)."""
    return dataclasses.replace(LABEL_DEFAULTS, threshold=threshold, max_per_phrase=1 if best_only else None,
                               score_words=vocab if vocab else "all")


def student_predictions(student, image, prompt, threshold: float, best_only: bool):
    res = student.predict(image, prompt, threshold=threshold)
    return res.best_per_phrase(1) if best_only else res


@dataclass
class CompareView:
    teacher_in: Any = None
    student_in: Any = None
    preset_note: Any = None
    index_in: Any = None
    ts_image: Any = None
    ts_caption: Any = None
    sample: Any = None
    gallery: Any = None
    ts_text: Any = None
    gt_out: Any = None
    teacher_out: Any = None
    student_out: Any = None
    ts_summary: Any = None
    ts_df: Any = None
    diff_df: Any = None
    diff_plot: Any = None
    metrics_note: Any = None
    metrics_plot: Any = None


# what a comparison writes: the result panels only, never the inputs it reads
COMPARE_OUT = ("ts_text", "gt_out", "teacher_out", "student_out", "ts_summary", "ts_df", "diff_df", "diff_plot")


class TeacherStudentTab:
    def __init__(self, core: Core):
        self.core = core
        self.c: dict[str, Any] = {}

    # --- samples ---------------------------------------------------------------------------------------------------
    def web_gallery(self, seed, n: int = 8):
        from glip.data import make_sample

        return CompareView(gallery=[(make_sample("web", i, int(seed)).image, f"#{i}") for i in range(n)])

    def pick_sample(self, seed, index) -> CompareView:
        from glip.data import make_sample

        s = make_sample("web", int(index), int(seed))
        path = self.core.scratch.new_dir() / s.file_name
        s.image.save(path)
        digest = self.core.remember_sample(str(path))
        return CompareView(index_in=int(index), ts_image=str(path), ts_caption=s.caption,
                           sample=WebSample("web", int(index), int(seed), s.caption, digest))

    def load_sample(self, seed, index) -> CompareView:
        """The sample at the typed index (the index box is read, not rewritten)."""
        return dataclasses.replace(self.pick_sample(seed, index), index_in=None)

    def on_gallery_pick(self, seed, evt: gr.SelectData):
        return self.pick_sample(seed, int(evt.index))

    def new_sample(self, seed):
        return self.pick_sample(seed, random.randrange(0, 10_000))

    def pair_note(self, teacher, student) -> str:
        """What the note under the pickers says (`ModelManager.notes` of the two picked models)."""
        return self.core.manager.notes((teacher, student))

    def on_preset(self, preset):
        teacher, student = PRESETS[preset]
        for name in (teacher, student):
            self.core.manager.start(name)
        return CompareView(teacher_in=teacher, student_in=student, preset_note=self.pair_note(teacher, student))

    def on_pick(self, teacher, student):
        for name in (teacher, student):
            if name in self.core.manager.menu:
                self.core.manager.start(name)
        return CompareView(preset_note=self.pair_note(teacher, student))

    # --- the comparison --------------------------------------------------------------------------------------------
    def compare(self, image, caption, sample: WebSample | None, teacher_name, student_name, t_thr, s_thr, iou,
                best_only: bool = True):
        if image is None:
            raise user_error("Pick a web sample or add an image.")
        if not caption or not caption.strip():
            raise user_error("The caption is empty.")
        teacher_name, student_name = teacher_name or TEACHER, student_name or STUDENT
        prompt = from_caption(caption)
        tr_ = self.core.resolve(teacher_name, fallback=TEACHER)
        sr_ = self.core.resolve(student_name, fallback=STUDENT)
        for r in (tr_, sr_):
            if r.note:
                warn(r.note)
        tv, sv = self.core.vocabulary(tr_.name), self.core.vocabulary(sr_.name)
        novel = sorted(sv - tv) if tv is not None and sv is not None else []
        im = self.core.display(str(image))
        w, h = self.core.image_size(str(image))
        with self.core.budget.hold(w * h):
            tr = label_pair(tr_.model, str(image), caption, teacher_settings(tv, float(t_thr), best_only))
            sr = student_predictions(sr_.model, str(image), prompt, float(s_thr), best_only)
            t0 = label_pair(tr_.model, str(image), caption, teacher_settings(tv, 0.0, True))  # each phrase's best
            s0 = student_predictions(sr_.model, str(image), prompt, 0.0, True)
        names = render.phrase_labels(prompt.phrases)
        styles = phrase_styles(prompt.phrases)
        segs, cmap = render.highlighted_prompt(prompt, novel)
        gt_img, gt = None, None
        if sample is not None and sample.caption == caption and sample.digest == self.core.digest(str(image)):
            from glip.data import make_sample

            gt = self._gt_boxes(make_sample(sample.split, sample.index, sample.seed), prompt)
            gt_img = render.plain_boxes(im, gt[0], [names[j] for j in gt[1]], [styles[j] for j in gt[1]],
                                        source_size=(w, h))
        agree = explain.agreement(names, (tr.boxes, tr.phrase_ids), (sr.boxes, sr.phrase_ids), float(iou))
        gt_t = explain.agreement(names, gt, (tr.boxes, tr.phrase_ids), float(iou)) if gt else None
        gt_s = explain.agreement(names, gt, (sr.boxes, sr.phrase_ids), float(iou)) if gt else None
        rows = []
        for j, r in enumerate(agree):
            row = {"phrase": r["phrase"], "teacher": r["n_a"], "student": r["n_b"], "matched": r["matched"],
                   "teacher only": r["only_a"], "student only": r["only_b"]}
            if novel:
                row["new word"] = ", ".join(w for w in novel if w in r["phrase"].lower().split())
            if gt:
                row.update({"truth": gt_t[j]["n_a"], "teacher found": gt_t[j]["matched"],
                            "student found": gt_s[j]["matched"]})
            rows.append(row)
        a, b = explain.best_phrase_scores(t0), explain.best_phrase_scores(s0)
        order = np.argsort(-np.abs(b - a), kind="stable")[:8]
        diff = pd.DataFrame({"phrase": [names[j] for j in order], "teacher best": [round(float(a[j]), 3) for j in order],
                             "student best": [round(float(b[j]), 3) for j in order],
                             "Δ (S − T)": [round(float(b[j] - a[j]), 3) for j in order]})
        fig = render.phrase_compare_plot(names, a.tolist(), b.tolist(), f"teacher ({tr_.name})", f"student ({sr_.name})",
                                         "Best score per phrase: teacher vs student", colors=[s.color for s in styles])
        tot = sum(r["matched"] for r in agree)
        rule = "best box per phrase" if best_only else "every box"
        summary = (f"Teacher **{tr_.name}**: {len(tr)} pseudo-labels (> {float(t_thr):.2f}, {rule}) · student "
                   f"**{sr_.name}**: {len(sr)} boxes (> {float(s_thr):.2f}) · {tot} matched at IoU ≥ {float(iou):.2f}.")
        if gt:
            summary += (f" Hidden truth: {len(gt[0])} boxes; teacher found {sum(r['matched'] for r in gt_t)}, "
                        f"student found {sum(r['matched'] for r in gt_s)}.")
        else:
            summary += " No ground truth for this image: the teacher's pseudo-labels are the reference."
        fb = [n for n in (tr_.name, sr_.name) if self.core.manager.is_fallback(n)]
        if fb:
            summary += f" *({', '.join(fb)}: fallback random weights.)*"
        notes = [r.note for r in (tr_, sr_) if r.note]
        framing = [self.core.framing(n, str(image)) for n in dict.fromkeys((tr_.name, sr_.name))]
        return CompareView(ts_text=gr.HighlightedText(value=segs, color_map=cmap), gt_out=gt_img,
                           teacher_out=render.annotate(tr, im), student_out=render.annotate(sr, im),
                           ts_summary="\n\n".join([summary] + notes + [f for f in framing if f][:1]),
                           ts_df=pd.DataFrame(rows), diff_df=diff, diff_plot=fig)

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
        return CompareView(metrics_plot=gr.Plot(value=fig, visible=fig is not None), metrics_note=note)

    # --- layout and wiring --------------------------------------------------------------------------------------
    def build(self, choices: list[str], low_thresholds: bool):
        c = self.c
        with gr.Tab("Teacher vs student", id="teacher"):
            c["sample"] = gr.State(None)
            gr.Markdown("Self-training (paper §7.1): a **teacher** trained on human-annotated data pseudo-labels web "
                        "image–caption pairs (the caption's noun phrases, boxes above the labelling threshold); a "
                        "**student** learns from them. The released GLIP-T is the student of GLIP-T (C): its gain is on "
                        "rare concepts (LVIS MiniVal APr 14.3 → 17.6), not on COCO (46.7 vs 46.6). On a photo there is "
                        "no hidden truth: the teacher's pseudo-labels are shown beside the student's predictions.")
            with gr.Row():
                c["preset_in"] = gr.Radio(list(PRESETS), value=next(iter(PRESETS)), label="Preset", elem_id="ts-preset")
            with gr.Row():
                c["teacher_in"] = gr.Dropdown(choices, value=TEACHER, label="Teacher", elem_id="teacher-in")
                c["student_in"] = gr.Dropdown(choices, value=STUDENT, label="Student", elem_id="student-in")
            c["preset_note"] = gr.Markdown(elem_classes=["glip-note"])
            with gr.Row():
                with gr.Column(scale=2):
                    c["seed_in"] = gr.Number(value=0, precision=0, label="Seed")
                    c["index_in"] = gr.Number(value=0, precision=0, label="Web sample index")
                    with gr.Row():
                        c["new_btn"] = gr.Button("New sample")
                        c["load_btn"] = gr.Button("Load index")
                    c["gallery"] = gr.Gallery(value=self.web_gallery(0).gallery, label="Synthetic web samples (click one)",
                                              columns=4, height=240, allow_preview=False)
                with gr.Column(scale=3):
                    c["ts_image"] = gr.Image(type="filepath", label="Image (or bring your own)", height=300,
                                             sources=["upload", "clipboard"], elem_id="ts-image", image_mode=None)
                    c["ts_caption"] = gr.Textbox(label="Caption", lines=2, elem_id="ts-caption")
                    with gr.Row():
                        c["t_thr"] = gr.Slider(0.0, 1.0, value=0.05 if low_thresholds else LABEL_DEFAULTS.threshold, step=0.01,
                                               label="Teacher threshold (labelling)")
                        c["s_thr"] = gr.Slider(0.0, 1.0, value=0.05 if low_thresholds else 0.3, step=0.01,
                                               label="Student threshold")
                        c["m_iou"] = gr.Slider(0.1, 0.95, value=0.5, step=0.05, label="Match IoU")
                    c["best_in"] = gr.Checkbox(value=LABEL_DEFAULTS.max_per_phrase == 1, label="Best box per phrase only (unchecked: "
                                               "every box above the threshold)")
                    c["cmp_btn"] = gr.Button("Compare", variant="primary", elem_id="cmp-btn")
            c["ts_text"] = gr.HighlightedText(label="Caption: phrases (and words only the student learned)",
                                              show_legend=True)
            with gr.Row():  # headings above, not badges over the images (they would hide box labels)
                with gr.Column():
                    gr.Markdown("**Ground truth** (synthetic web samples only)")
                    c["gt_out"] = gr.Image(show_label=False, interactive=False)
                with gr.Column():
                    gr.Markdown("**Teacher pseudo-labels**")
                    c["teacher_out"] = gr.Image(show_label=False, interactive=False, elem_id="teacher-out")
                with gr.Column():
                    gr.Markdown("**Student predictions**")
                    c["student_out"] = gr.Image(show_label=False, interactive=False)
            c["ts_summary"] = gr.Markdown(elem_id="ts-summary")
            c["ts_df"] = gr.Dataframe(interactive=False, label="Agreement per phrase", elem_id="ts-table")
            with gr.Row():
                c["diff_df"] = gr.Dataframe(interactive=False, label="Where they differ most (best score per phrase)",
                                            elem_id="ts-diff")
                c["diff_plot"] = gr.Plot(show_label=False)
            with gr.Accordion("Measured metrics of the toy pair (known vs novel words)", open=False):
                c["metrics_note"] = gr.Markdown()
                c["metrics_plot"] = gr.Plot(show_label=False)
        return self

    def wire(self, priv: dict, demo: gr.Blocks):
        c = self.c

        outs = functools.partial(components, c)  # each event writes only what it sets: never an input it reads
        sample_out = outs("index_in", "ts_image", "ts_caption", "sample")
        sample_in = [c["seed_in"]]
        c["gallery"].select(friendly(named(self.on_gallery_pick, c)), sample_in, sample_out, concurrency_id="light",
                            **priv)
        c["new_btn"].click(friendly(named(self.new_sample, c)), sample_in, sample_out + outs("gallery"),
                           concurrency_id="light", **priv)
        typed_out = outs("ts_image", "ts_caption", "sample")
        c["load_btn"].click(friendly(named(self.load_sample, c)), [c["seed_in"], c["index_in"]], typed_out,
                            concurrency_id="light", **priv)
        c["seed_in"].submit(friendly(named(self.web_gallery, c)), sample_in, outs("gallery"), concurrency_id="light",
                            **priv)
        c["cmp_btn"].click(gpu(friendly(named(self.compare, c))),
                           [c[k] for k in ("ts_image", "ts_caption", "sample", "teacher_in", "student_in", "t_thr",
                                           "s_thr", "m_iou", "best_in")], outs(*COMPARE_OUT), concurrency_id="model",
                           **priv)
        demo.load(friendly(named(self.metrics, c)), None, outs("metrics_plot", "metrics_note"), concurrency_id="light",
                  **priv)
        demo.load(friendly(named(self.load_sample, c)), [c["seed_in"], c["index_in"]], typed_out,
                  concurrency_id="light", **priv)
        picked = [c["preset_in"].input(friendly(named(self.on_preset, c)), [c["preset_in"]],
                                       outs("teacher_in", "student_in", "preset_note"), concurrency_id="light", **priv)]
        for k in ("teacher_in", "student_in"):
            picked.append(c[k].input(friendly(named(self.on_pick, c)), [c["teacher_in"], c["student_in"]],
                                     outs("preset_note"), concurrency_id="light", **priv))
        return picked
