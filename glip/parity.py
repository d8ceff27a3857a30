"""Stage-by-stage numerical parity against reference outputs of the official implementation
(a fixture folder: model.pth, config.json, image*.png, io.pt, as in tests/fixtures/glip-official-tiny).

`python -m glip parity FIXTURE_DIR` prints one row per compared entry (max abs / max rel error)
and exits non-zero on any mismatch beyond tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .boxes import scale_boxes
from .config import GLIPConfig
from .errors import DataError
from .image import load_image
from .model import GLIP
from .postprocess import atss_postprocess
from .preprocess import Preprocessor
from .prompts import Prompt
from .runtime import resolve_device

FIXTURE_FILES = ("io.pt", "model.pth", "config.json")

LEVELS = ("p3", "p4", "p5", "p6", "p7")


@dataclass
class Row:
    name: str
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    note: str = ""


@dataclass
class ParityReport:
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and bool(self.rows)

    def table(self) -> str:
        lines = [f"{'entry':32s} {'max abs':>10s} {'max rel':>10s}  result"]
        for r in self.rows:
            lines.append(f"{r.name:32s} {r.max_abs:10.2e} {r.max_rel:10.2e}  {'ok' if r.ok else 'MISMATCH'} {r.note}")
        if self.skipped:
            lines.append("skipped (absent from io.pt): " + ", ".join(self.skipped))
        if self.not_compared:
            lines.append("in io.pt but not compared (inputs / metadata / unrecognised): " + ", ".join(self.not_compared))
        lines.append("PARITY OK" if self.ok else "PARITY FAILED")
        return "\n".join(lines)


def compare(name: str, ours, ref, atol: float, rtol: float) -> Row:
    if not isinstance(ref, torch.Tensor):
        ok = ours == ref
        return Row(name, ok, note="" if ok else f"ours={ours!r} ref={ref!r}")
    ours = torch.as_tensor(ours).detach().cpu()
    if ours.shape != ref.shape:
        return Row(name, False, note=f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
    if not ref.is_floating_point():
        ok = torch.equal(ours.to(ref.dtype), ref)
        return Row(name, ok, note="" if ok else f"{int((ours.to(ref.dtype) != ref).sum())} values differ")
    o, r = ours.double(), ref.double()
    diff = (o - r).abs()
    ok = bool((diff <= atol + rtol * r.abs()).all())
    return Row(name, ok, float(diff.max()) if diff.numel() else 0.0, float((diff / (r.abs() + 1e-3)).max()) if diff.numel() else 0.0)


def compare_detections(name: str, boxes, scores, labels, ref: dict, box_tol=1e-2, score_tol=1e-4) -> Row:
    """Order-free: pair each reference box with an unused box of the same label (closest first)."""
    rb, rs, rl = ref["boxes"], ref["scores"], ref["labels"]
    if len(boxes) != len(rb):
        return Row(name, False, note=f"{len(boxes)} boxes vs {len(rb)}")
    used = torch.zeros(len(boxes), dtype=torch.bool)
    worst_box = worst_score = 0.0
    for i in range(len(rb)):
        cand = ((labels == rl[i]) & ~used).nonzero().flatten()
        if len(cand) == 0:
            return Row(name, False, note=f"no box with label {int(rl[i])} left for reference box {i}")
        d = (boxes[cand] - rb[i]).abs().max(dim=1).values + (scores[cand] - rs[i]).abs()
        j = cand[d.argmin()]
        used[j] = True
        worst_box = max(worst_box, float((boxes[j] - rb[i]).abs().max()))
        worst_score = max(worst_score, float((scores[j] - rs[i]).abs()))
    ok = worst_box <= box_tol and worst_score <= score_tol
    return Row(name, ok, max(worst_box, worst_score), note=f"{len(rb)} boxes; box err {worst_box:.1e} px, score err {worst_score:.1e}")


def run_parity(fixture: str | Path, atol: float = 1e-4, rtol: float = 1e-3, device: str = "cpu",
               tf32: bool = False) -> ParityReport:
    """Every stage of `fixture` recomputed on `device`. On CUDA, TF32 matmuls/convolutions (PyTorch's
    default for cuDNN convolutions) round inputs to 10 mantissa bits, far beyond the fixtures' 1e-4
    tolerance, so they are switched off for the run unless `tf32` (then expect mismatches)."""
    fixture = Path(fixture)
    missing = [f for f in FIXTURE_FILES if not (fixture / f).is_file()]
    if not fixture.is_dir() or missing:
        what = "is not a folder" if not fixture.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(f"{fixture} {what}: a parity fixture is a folder with {', '.join(FIXTURE_FILES)} and image*.png")
    dev = resolve_device(device)
    try:
        io = torch.load(fixture / "io.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"{fixture / 'io.pt'}: not a readable reference file ({e.__class__.__name__})") from None
    cfg = GLIPConfig.load(fixture / "config.json")
    model = GLIP.from_pretrained(fixture / "model.pth", config=cfg, device=dev)
    if dev.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            return _run(fixture, io, cfg, model, dev, atol, rtol)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return _run(fixture, io, cfg, model, dev, atol, rtol)


def _run(fixture: Path, io: dict, cfg: GLIPConfig, model, dev: torch.device, atol: float, rtol: float) -> ParityReport:
    rep = ParityReport()
    seen: set[str] = set()

    def check(key: str, ours, name: str | None = None):
        if key not in io:
            rep.skipped.append(key)
            return
        seen.add(key)
        rep.rows.append(compare(name or key, ours, io[key], atol, rtol))

    # inputs -------------------------------------------------------------------------------------
    paths = [fixture / "image.png"] if (fixture / "image.png").exists() else sorted(fixture.glob("image[0-9]*.png"), key=lambda p: int(p.stem[5:]))
    if not paths:
        raise DataError(f"{fixture}: no image.png or image0.png … in the fixture")
    pre = Preprocessor(cfg)
    images = [load_image(p) for p in paths]
    batch, sizes = pre.images(images)
    check("images", batch)
    check("image_sizes", torch.tensor(sizes))
    check("image_orig_hw", torch.tensor([[im.height, im.width] for im in images]))
    captions = io.get("captions") or [io["caption"]]
    prompts = [Prompt(c, list(names), spans) for c, names, spans in zip(captions, io["entity_names"], io["tokens_positive"])]
    enc = pre.tokenize([p.caption for p in prompts])
    check("input_ids", enc["input_ids"])
    check("attention_mask", enc["attention_mask"])
    pmaps = [pre.positive_map(p) for p in prompts]
    if "positive_map" in io:
        seen.add("positive_map")
        for i, (pm, ref) in enumerate(zip(pmaps, io["positive_map"])):
            rep.rows.append(compare(f"positive_map[{i}]", pm, ref, atol, rtol))
    if "labels" in io:
        seen.add("labels")
        ours_l, ref_l = [list(range(1, len(p) + 1)) for p in prompts], [[int(x) for x in r] for r in io["labels"]]
        rep.rows.append(Row("labels", ours_l == ref_l, note="" if ours_l == ref_l else f"{ours_l} vs {ref_l}"))
    if "positive_map_label_to_token" in io:
        seen.add("positive_map_label_to_token")
        for i, (pm, ref) in enumerate(zip(pmaps, io["positive_map_label_to_token"])):
            ours = [(pm[j] > 0).nonzero().flatten().tolist() for j in range(len(pm))]
            ref = [list(map(int, r)) for r in (ref.values() if isinstance(ref, dict) else ref)]
            rep.rows.append(Row(f"label_to_token[{i}]", ours == ref, note="" if ours == ref else f"{ours} vs {ref}"))

    # network, stage by stage ------------------------------------------------------------------
    captured: dict[int, object] = {}
    hooks = [model.rpn.head.dyhead_tower[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i in range(min(3, len(model.rpn.head.dyhead_tower)))]
    with torch.no_grad():
        stages = model.backbone.body(batch.to(dev))
        fpn = model.backbone.fpn(stages[1:])
        text = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        head = model.ground(fpn, text, output_attentions=True)
        anchors = model.anchors(fpn)
    for h in hooks:
        h.remove()
    for i, name in enumerate(("c3", "c4", "c5")):
        check(f"backbone.{name}", stages[i + 1])
    for l, name in enumerate(LEVELS):
        check(f"fpn.{name}", fpn[l])
    check("bert.hidden", text.hidden)
    check("bert.embedded", text.embedded)
    if model.has_fusion:
        att = head.attentions[0]
        t_keep = int(io.get("fuse0.t_keep", att.image_to_text.shape[-1]))
        seen.add("fuse0.t_keep")
        B, H = att.image_to_text.shape[:2]
        check("fuse0.attn_v", att.image_to_text.reshape(B * H, -1, att.image_to_text.shape[-1])[:, :, :t_keep])
        check("fuse0.attn_l", att.text_to_image.reshape(B * H, att.text_to_image.shape[2], -1)[:, :t_keep])
        fused_v, fused_l, _ = captured[0]
        for l, name in enumerate(LEVELS):
            check(f"fuse0.visual.{name}", fused_v[l])
        check("fuse0.lang_hidden", fused_l)
        check("bertlayer0.lang_hidden", captured[1])
        dyconv0 = captured[2]
    else:
        dyconv0 = captured[0]
    for l, name in enumerate(LEVELS):
        check(f"dyconv0.{name}", dyconv0[l])
        check(f"tower.{name}", head.visual[l])
        check(f"head.logits.{name}", head.token_logits[l])
        check(f"head.bbox_reg.{name}", head.bbox_reg[l])
        check(f"head.centerness.{name}", head.centerness[l])
        check(f"anchors.{name}", anchors[l])
    check("tower.lang_hidden", head.text)

    # detections, per image ------------------------------------------------------------------------
    for b, (im, (h, w), pm) in enumerate(zip(images, sizes, pmaps)):
        prefix = "det" if "det.boxes" in io else f"det{b}"
        if f"{prefix}.boxes" not in io:
            rep.skipped.append(f"{prefix}.*")
            continue
        det = atss_postprocess([t[b] for t in head.token_logits], [t[b] for t in head.bbox_reg],
                               [t[b] for t in head.centerness], anchors, pm, (h, w), model.box_coder,
                               float(io.get("post.inference_th", cfg.inference_th)),
                               int(io.get("post.pre_nms_top_n", cfg.pre_nms_top_n)),
                               float(io.get("post.nms_th", cfg.nms_th)),
                               int(io.get("post.detections_per_img", cfg.detections_per_img)))
        ref = {k: io[f"{prefix}.{k}"] for k in ("boxes", "scores", "labels")}
        boxes, scores, labels = det.boxes.cpu(), det.scores.cpu(), det.labels.cpu()
        rep.rows.append(compare_detections(f"{prefix} (original px)", scale_boxes(boxes, (w, h), im.size), scores,
                                           labels + 1, ref))
        if f"{prefix}.boxes_resized" in io:
            ref_r = dict(ref, boxes=io[f"{prefix}.boxes_resized"])
            rep.rows.append(compare_detections(f"{prefix}.boxes_resized", boxes, scores, labels + 1, ref_r))
        seen.update(f"{prefix}.{k}" for k in ("boxes", "scores", "labels", "boxes_resized"))
        for key, val in (("n_pre_nms", det.n_pre_nms), ("n_after_nms", det.n_after_nms)):
            if f"{prefix}.{key}" in io:
                seen.add(f"{prefix}.{key}")
                rep.rows.append(compare(f"{prefix}.{key}", val, io[f"{prefix}.{key}"], 0, 0))
        if f"{prefix}.candidates_per_level" in io:
            seen.add(f"{prefix}.candidates_per_level")
            ours, ref_c = list(det.candidates_per_level), [int(x) for x in io[f"{prefix}.candidates_per_level"]]
            rep.rows.append(Row(f"{prefix}.candidates_per_level", ours == ref_c, note="" if ours == ref_c else f"{ours} vs {ref_c}"))
    used_as_input = {"caption", "captions", "entity_names", "tokens_positive", "min_size_test", "max_size_test"}
    used_as_input |= {k for k in io if k.startswith("post.")}
    seen |= used_as_input
    rep.not_compared = sorted(k for k in io if k not in seen)
    return rep
