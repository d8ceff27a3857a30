"""The Gradio app: one gr.Blocks with a model panel (what each model is, downloads in progress) and four tabs
(Ground, Deep fusion, Teacher vs student, Prompt lab), each built and wired by its module in `app/tabs/`.

Only `/ground_json` is an API endpoint; every other event is private and, like it, runs through the queue
(direct REST calls are off, see `app.limits.RequestGuard`).
"""
from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from glip import hub

from .core import Core, friendly, gpu
from .limits import MAX_UPLOAD_BYTES, RequestGuard, guard_image, guard_value
from .models import ModelManager
from .tabs.fusion import FusionTab
from .tabs.ground import GroundTab
from .tabs.prompt_lab import PromptLabTab
from .tabs.teacher_student import TeacherStudentTab

CSS = """
.glip-legend {display:flex; flex-wrap:wrap; gap:6px; margin:4px 0}
.glip-chip {border-radius:12px; padding:1px 8px; font-size:0.9em}
.glip-chip i {display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px}
.glip-banner {border-left:5px solid #f58231; padding-left:10px; background:rgba(245,130,49,0.08)}
.glip-note {font-size:0.92em}
.glip-note:not(:empty) {border-left:4px solid #4363d8; padding-left:8px}
#model-status:not(:empty) {border-left:5px solid #f58231; padding-left:10px}  /* downloads and failures: attention, not "ok" */
/* gallery captions wrap instead of being cut off */
.gallery-item .caption-label, .thumbnail-item .caption-label, figcaption {white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; max-width: none !important}
"""
INTRO = """# GLIP Explorer
GLIP turns **object detection into phrase grounding**: the image (Swin + FPN) and the prompt (BERT) are fused by
bi-directional cross-attention (**X-MHA**) in every head layer, and each box is scored against each *token*
(S_ground = box features · token features). Type categories (`person . dog`) or a caption, and follow each phrase's
colour from the prompt to its boxes, its token scores and its heat map."""
PRIVATE = {"api_visibility": "private"}
LIGHT_CONCURRENCY = 8      # cheap events (model picks, gallery, status): their own group, not the model's


def models_table(manager: ModelManager) -> str:
    rows = ["| model | trained on / what it is | state |", "|---|---|---|"]
    for name, c in manager.menu.items():
        st = manager.status(name)
        if st.state == "ready":
            state = "loaded"
        elif st.busy:
            state = str(st.progress) if st.progress else st.state
        elif st.state == "failed":
            state = "failed (see above)"
        elif c.kind == "release":
            state = "on disk" if manager.on_disk(name) else (
                "preloaded" if hub.preloaded(c.release) else f"download {hub.human_bytes(c.release.size)}")
        else:
            state = "on disk"
        rows.append(f"| {name} | {c.about} | {state} |")
    return "\n".join(rows)


def build_demo(manager: ModelManager | None = None) -> gr.Blocks:
    core = Core(manager or ModelManager())
    mm = core.manager
    choices, default = mm.choices(), mm.default()
    low = bool(mm.missing_shipped())  # fallback random weights score ~0.01-0.1: low default thresholds
    ground, fusion, ts, lab = GroundTab(core), FusionTab(core), TeacherStudentTab(core), PromptLabTab(core)

    with gr.Blocks(title="GLIP Explorer", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        banner = mm.banner()
        gr.Markdown(banner, visible=bool(banner), elem_classes=["glip-banner"], elem_id="fallback-banner")
        status = gr.Markdown(mm.notes(), elem_id="model-status")
        with gr.Accordion("Models: what each one is trained on", open=False):
            table = gr.Markdown(models_table(mm), elem_id="models-table")
            gr.Markdown("The toy models know only the synthetic world of coloured shapes. The released GLIP "
                        "checkpoints (repo `GLIPModel/GLIP` on the Hugging Face Hub) are downloaded on first pick, "
                        "converted once and cached; a model you have as a file: `python app.py --model PATH`.")
        timer = gr.Timer(1.0, active=any(mm.status(n).busy for n in mm.menu))
        with gr.Tabs():
            ground.build(choices, default, low)
            fusion.build()
            ts.build(choices, low)
            lab.build(choices, default, low)
        # the public JSON API (hidden components)
        api_json = gr.JSON(visible=False)
        api_btn = gr.Button(visible=False)

        for comp in (ground.c["image_in"], ts.c["ts_image"], lab.c["lab_image"]):
            guard_image(comp, lambda: core.scratch.new_dir())
            # checked as it arrives: a corrupt or oversized file is refused at upload, not at the next run
            comp.upload(lambda _: None, comp, None, show_progress="hidden", concurrency_id="light", **PRIVATE)
        g, t, lb = ground.c, ts.c, lab.c
        for comp, what in ((g["thr_in"], "Score threshold must be in [0, 1]"), (g["nms_in"], "NMS IoU must be in [0.05, 1]"),
                           (g["max_in"], "Max boxes must be in 1..300"), (g["size_in"], "Input size must be in 0..1333"),
                           (t["t_thr"], "Threshold must be in [0, 1]"), (t["s_thr"], "Threshold must be in [0, 1]"),
                           (t["m_iou"], "Match IoU must be in [0.1, 0.95]"), (lb["lab_thr"], "Threshold must be in [0, 1]")):
            guard_value(comp, what)
        picks = [ground.wire(PRIVATE), lab.wire(PRIVATE)] + ts.wire(PRIVATE, demo)
        fusion.wire(ground.c["state"], PRIVATE)
        api_btn.click(gpu(friendly(ground.ground_json)), [ground.c["image_in"], ground.c["prompt_in"],
                                                          ground.c["model_in"], ground.c["thr_in"]],
                      api_json, api_name="ground_json", concurrency_id="model")

        def tick(teacher, student):
            busy = any(mm.status(n).busy for n in mm.menu)
            return mm.notes(), models_table(mm), ts.pair_note(teacher, student), gr.Timer(active=busy)

        timer.tick(tick, [t["teacher_in"], t["student_in"]], [status, table, t["preset_note"], timer],
                   show_progress="hidden", concurrency_id="light", **PRIVATE)
        for ev in picks:
            ev.then(lambda: gr.Timer(active=True), None, [timer], show_progress="hidden", concurrency_id="light",
                    **PRIVATE)
        for ev in demo.fns.values():  # the cheap events share their own concurrency group
            if ev.concurrency_id == "light":
                ev.concurrency_limit = LIGHT_CONCURRENCY
    demo.core = core
    demo.tabs = {"ground": ground, "fusion": fusion, "teacher": ts, "lab": lab}
    return demo


def queue(demo: gr.Blocks, concurrency: int = 2, max_size: int = 32) -> gr.Blocks:
    """Every event through the queue (`api_open=False` closes the REST routes that skip it)."""
    return demo.queue(max_size=max_size, default_concurrency_limit=concurrency, api_open=False)


def launch_kwargs() -> dict:
    return {"css": CSS, "theme": gr.themes.Soft(), "show_error": True, "max_file_size": MAX_UPLOAD_BYTES,
            "allowed_paths": [], "app_kwargs": {"middleware": [Middleware(RequestGuard)]}}


__all__ = ["build_demo", "queue", "launch_kwargs", "CSS"]
