"""Training loop for the small GLIP (issue 3): teacher on gold data, student on gold + pseudo-labels.

All knobs live in `TrainConfig`; `CONFIGS` holds the named ones (`--config teacher|student`).

* AdamW; biases and norm weights without weight decay; the text encoder (MiniLM) frozen by default
  (`text_lr = 0`): it is pretrained on far more text than the world holds, freezing it keeps the novel
  words' embeddings where MiniLM put them (what lets the student learn them from pseudo-labels without
  drifting the known ones) and BERT needs no backward (its features are computed under no_grad).
* Loss: GLIP's (`glip_loss`) plus a token-softmax term at the positive anchors (`contrastive_weight`);
  S_ground's text projection starts whitened (`text_projection_init`). Both exist because with GLIP-T's
  objective alone the toy model never learned colour (README, "Where colour went").
* Linear warm-up, then cosine decay to `min_lr_ratio`. Progress is max(step / steps, elapsed /
  time budget): on a shared CPU the schedule still completes inside `max_minutes`.
* Gradient clipping (L2 1.0), optional EMA (the shipped weights are the EMA ones), seeded: the batch of
  step s is a pure function of (seed, s), so `--resume` continues the same data stream.
* A checkpoint (model, EMA, optimizer, step, elapsed time) every `ckpt_every` steps to `<out>/last.pt`;
  at the end `<out>/model/` in our format (text encoder excluded) and `<out>/log.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from glip.train.data import Collate, GoldDetection, GoldGrounding, PseudoGrounding
from glip.train.losses import glip_loss


@dataclass
class TrainConfig:
    name: str = "teacher"
    model: str = "toy"                      # preset name (architecture + input size)
    model_overrides: dict = field(default_factory=dict)  # GLIPConfig fields replaced on the preset (tests)
    init_from: str | None = None            # start from these weights (a folder / shipped name) instead of scratch
    steps: int = 5000
    max_minutes: float = 40.0               # time budget; the LR schedule is stretched/compressed to fit
    batch_size: int = 8
    lr: float = 1e-3
    train_dropout: bool = False             # False: drop path and every dropout off. Each scene is fresh (no
                                            # overfitting to guard against); with them on, steps are 10% slower
                                            # and the loss falls more slowly per step (measured, README)
    text_lr: float = 0.0                    # 0 = MiniLM frozen (no grads, no backward through it)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip_grad: float = 1.0
    ema: float = 0.998                      # 0 = off
    seed: int = 0
    device: str = "auto"                    # auto = CUDA when available (the data stream stays on the CPU)
    # data
    gold_seed: int = 0                      # world seed of the training scenes (evaluation uses others)
    n_gold_det: int = 50000
    n_gold_ground: int = 50000
    det_negatives: tuple[int, int] | None = (6, 16)  # absent categories per gold_det prompt (None: the world's 2..8)
    hard_negative_weight: float = 4.0       # confusable absent categories (shared colour/shape) drawn this much more
    share_attribute_words: bool = True      # a region's colour/shape/size words elsewhere in the prompt are positives
                                            # too (`glip.train.data.share_attribute_words`; False = official spans)
    text_projection_init: str = "whiten"    # "whiten": S_ground's text projection starts as the whitening of the
                                            # world's token features (`whiten_text_projection`); "default": nn.Linear's
    contrastive_weight: float = 1.0         # + weight x token-softmax loss at positive anchors (`token_softmax_loss`);
                                            # 0 = GLIP-T's objective. Without it colour never reached S_ground (README)
    attribute_prompt_prob: float = 0.3      # gold_det prompts that list only colours or only shapes (`attribute_prompt`)
    pseudo: str | None = None               # ODVG JSONL written by `python -m glip pseudo-label`
    pseudo_min_score: float = 0.0           # extra screening at load time (FURTHER_SCREEN)
    pseudo_mask_unlabelled: bool = True     # tokens of caption phrases screened out carry no loss (False = the
                                            # paper's: they are negatives everywhere; `unlabelled_phrase_spans`)
    mix: tuple[float, float, float] = (0.5, 0.5, 0.0)  # P(gold_det), P(gold_ground), P(pseudo) per item
    flip_prob: float = 0.5
    # bookkeeping
    ckpt_every: int = 200
    eval_every: int = 500                   # quick evaluation (0 = off)
    eval_n: int = 48
    num_threads: int = 2                    # 2 cores: a batch-8 step 0.74 s vs 1.28 s on one thread (median of 8)
    num_workers: int = 1                    # one prefetching worker builds the next batches
    out: str = "runs/teacher"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The student starts from the teacher (a deviation from the paper, which trains it from scratch: on 2 CPU
# cores there is no time for that) with a fresh LR cycle, and sees gold + pseudo-labelled web data.
_STUDENT = TrainConfig(name="student", init_from="runs/teacher/model", steps=2296, max_minutes=35.0, lr=5e-4,
                       warmup_steps=50, pseudo="runs/pseudo/web.jsonl", pseudo_min_score=0.5,
                       mix=(0.3, 0.3, 0.4), out="runs/student")
_STUDENT2 = dataclasses.replace(_STUDENT, name="student2", init_from="runs/student/model", steps=2087,
                                max_minutes=30.0, lr=3e-4, pseudo="runs/pseudo2/web.jsonl", out="runs/student2")

CONFIGS: dict[str, TrainConfig] = {
    # Step budgets: the steps each time budget gives on an idle 2-core CPU (58-60 steps/min for the teacher,
    # 66-70 for the students). The shipped models ran them with a looser time cap (README, "Training"), so a
    # shared machine cost them wall time, not steps; here `max_minutes` caps every run at the limit.
    "teacher": TrainConfig(steps=3460, max_minutes=60.0),
    "student": _STUDENT,
    # Self-training round 2: the round-1 student re-labels the web pairs (it now knows the novel words, so a
    # phrase is scored by all its words but the articles: `--score-words content`) and goes on training on them.
    "student2": _STUDENT2,
    # Round 3 (the shipped toy-student): the round-2 student re-labels them the same way; 25 minutes.
    "student3": dataclasses.replace(_STUDENT2, name="student3", init_from="runs/student2/model", steps=1739,
                                    max_minutes=25.0, pseudo="runs/pseudo3/web.jsonl", out="runs/student3"),
    # a few seconds: tests and smoke runs
    # (nn.Linear's projection init: whitening renders 512 scenes for their prompts, too slow for a smoke run)
    "tiny": TrainConfig(name="tiny", steps=6, batch_size=2, warmup_steps=1, max_minutes=5.0, ema=0.0,
                        n_gold_det=16, n_gold_ground=16, ckpt_every=3, eval_every=0, num_workers=0,
                        text_projection_init="default", out="runs/tiny"),
}


def get_config(name: str, **overrides) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown train config {name!r}; known: {sorted(CONFIGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(CONFIGS[name], **overrides)


# --------------------------------------------------------------------------------------------------
# data stream
# --------------------------------------------------------------------------------------------------
class StepBatches(Dataset):
    """Item s = the collated batch of step s (a pure function of (seed, s)); a DataLoader with
    batch_size=None over range(start, steps) prefetches them in a worker."""

    def __init__(self, tc: TrainConfig, model_cfg):
        self.tc = tc
        self.sources = [GoldDetection(model_cfg, tc.n_gold_det, tc.gold_seed, tc.flip_prob,
                                      negatives=tc.det_negatives and tuple(tc.det_negatives),
                                      hard_weight=tc.hard_negative_weight, share_words=tc.share_attribute_words,
                                      attribute_prob=tc.attribute_prompt_prob),
                        GoldGrounding(model_cfg, tc.n_gold_ground, tc.gold_seed, tc.flip_prob,
                                      share_words=tc.share_attribute_words)]
        mix = list(tc.mix)
        if tc.pseudo:
            self.sources.append(PseudoGrounding(model_cfg, tc.pseudo, tc.pseudo_min_score, tc.flip_prob,
                                                share_words=tc.share_attribute_words,
                                                mask_unlabelled=tc.pseudo_mask_unlabelled))
            if len(self.sources[-1]) == 0:
                raise ValueError(f"{tc.pseudo}: no pseudo-labelled region survives min_score {tc.pseudo_min_score}")
        else:
            mix[2] = 0.0
        p = np.array(mix[: len(self.sources)], dtype=np.float64)
        self.p = p / p.sum()
        self.collate = Collate(model_cfg)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.tc.seed, 4242, step])
        items = []
        for _ in range(self.tc.batch_size):
            src = self.sources[int(rng.choice(len(self.sources), p=self.p))]
            items.append(src[int(rng.integers(len(src)))])
        return self.collate(items)


def _worker_init(_):
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# model / optimiser
# --------------------------------------------------------------------------------------------------
def train_device(tc: TrainConfig) -> torch.device:
    if tc.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tc.device)


def build_model(tc: TrainConfig):
    """The model to train, on `train_device(tc)`."""
    from glip.config import get_preset
    from glip.language import load_pretrained_text_encoder
    from glip.model import GLIP

    if tc.init_from:
        model = GLIP.from_pretrained(tc.init_from, device="cpu")
    else:
        torch.manual_seed(tc.seed)
        model = GLIP(get_preset(tc.model).replace(**tc.model_overrides))
        load_pretrained_text_encoder(model.language_backbone, model.config.text_encoder)
        if tc.text_projection_init == "whiten":
            whiten_text_projection(model, training_captions(tc, model.config, 512))
        elif tc.text_projection_init != "default":
            raise ValueError(f"text_projection_init must be 'whiten' or 'default', not {tc.text_projection_init!r}")
    if not tc.train_dropout:
        disable_dropout(model)
    if tc.text_lr <= 0:
        for p in model.language_backbone.parameters():
            p.requires_grad_(False)
    return model.to(train_device(tc))


def training_captions(tc: TrainConfig, model_cfg, n: int) -> list[str]:
    """n training prompts: half gold_det category lists (built by `GoldDetection` itself), half gold_ground
    captions. The attribute-only prompts are left out: six fixed word lists, they would only reweight."""
    from glip.data import make_sample

    det = GoldDetection(model_cfg, n, tc.gold_seed, negatives=tc.det_negatives and tuple(tc.det_negatives),
                        hard_weight=tc.hard_negative_weight)
    out = []
    for i in range(n):
        s = make_sample("gold_det" if i % 2 == 0 else "gold_ground", i // 2, tc.gold_seed)
        out.append(det.category_prompt(s.objs, i // 2)[0] if i % 2 == 0 and tc.det_negatives is not None
                   else s.caption)
    return out


@torch.no_grad()
def whiten_text_projection(model, captions: list[str]) -> None:
    """Start S_ground's text projection as the (scaled) PCA whitening of the frozen text features.

    Why: MiniLM's token vectors share a large common component (colour words: cosine 0.7-0.8), and a
    randomly initialised projection keeps it (cosine 0.95 between the six colours at init, 0.99 after
    training: `glip.train.diagnose.projection_spread`). Every token then pulls the region features the
    same way; S_ground's gradient carries almost no colour and the image side drops colour (the probe).
    Whitening centres the tokens and spreads the words' differences over the C output channels from the
    first step, at the same output norm as the default initialisation, so the logits' scale is unchanged.
    """
    import torch.nn.functional as F

    from glip.prompts import tokenize

    head, cfg = model.rpn.head, model.config
    enc = tokenize(captions, max_len=cfg.max_query_len)
    was_training = model.language_backbone.training
    model.language_backbone.eval()  # the features training will score (frozen MiniLM runs in eval mode)
    text = model.encode_text(enc["input_ids"], enc["attention_mask"])
    model.language_backbone.train(was_training)
    tokens = text.hidden if cfg.fused_dot_product else text.embedded
    t = (F.normalize(tokens, p=2, dim=-1) / 2.0)[enc["attention_mask"].bool()].double()  # what `ground` projects
    lin = head.dot_product_projection_text
    default_norm = lin(t.float()).norm(dim=-1).mean()
    mu = t.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((t - mu).T))
    C = lin.out_features
    U, lam = evecs[:, -C:], evals[-C:].clamp_min(1e-8)
    W = (U / lam.sqrt()).T                                  # (C, D): unit variance per channel over the tokens
    W = W * (default_norm / (W @ (t - mu).T).norm(dim=0).mean())
    lin.weight.copy_(W.float())
    lin.bias.copy_(-(W @ mu).float())


def disable_dropout(model) -> None:
    """Drop path, X-MHA and fusion-BERT dropout off (the modules read these at every forward)."""
    from glip.backbone import DropPath
    from glip.fusion import BiMultiHeadAttention
    from glip.language import BertFusionLayer, _SelfAttention

    for m in model.modules():
        if isinstance(m, DropPath):
            m.p = 0.0
        elif isinstance(m, (BiMultiHeadAttention, _SelfAttention)):
            m.dropout = 0.0
        elif isinstance(m, BertFusionLayer):
            m.hidden_dropout = 0.0


def param_groups(model, tc: TrainConfig) -> list[dict]:
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        text = name.startswith("language_backbone.")
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "relative_position_bias_table" in name
        key = (text, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": tc.text_lr if text else tc.lr,
                           "weight_decay": 0.0 if no_wd else tc.weight_decay, "base_lr": tc.text_lr if text else tc.lr}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_factor(progress: float, step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return 0.001 + (1 - 0.001) * step / max(tc.warmup_steps, 1)
    t = min(max(progress, 0.0), 1.0)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if not k.startswith("language_backbone.")}

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                if v.is_floating_point():
                    self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.shadow[k].copy_(v)

    def copy_to(self, model):
        model.load_state_dict(self.shadow, strict=False)


def compute_loss(model, batch: dict, frozen_text: bool, contrastive_weight: float = 0.0):
    dev = next(model.parameters()).device
    ids, attention = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    feats = model.encode_image(batch["images"].to(dev, non_blocking=True))
    if frozen_text:
        model.language_backbone.eval()
        with torch.no_grad():
            text = model.encode_text(ids, attention)
    else:
        text = model.encode_text(ids, attention)
    head = model.ground(feats, text)
    return glip_loss(head.token_logits, head.bbox_reg, head.centerness, model.anchors(feats), batch["targets"],
                     batch["loss_mask"].to(dev), model.box_coder,
                     contrastive_weight=contrastive_weight)


def _trainable_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("language_backbone.")}


# --------------------------------------------------------------------------------------------------
# loop
# --------------------------------------------------------------------------------------------------
def train(tc: TrainConfig, resume: bool = False, progress_bar: bool = True, quiet: bool = False,
          stop_after: int | None = None) -> dict:
    """Run (or, with resume, continue) a training run. stop_after: leave after that many steps of this
    call, checkpoint included (an interruption, for tests)."""
    from tqdm import tqdm

    torch.set_num_threads(tc.num_threads)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(tc)
    frozen_text = tc.text_lr <= 0
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=(0.9, 0.999))
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    step, elapsed = 0, 0.0
    ckpt = out / "last.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.shadow = {k: v.to(train_device(tc)) for k, v in state["ema"].items()}
        step, elapsed = int(state["step"]), float(state["elapsed"])
        torch.set_rng_state(state["torch_rng"])
        if not quiet:
            print(f"resumed {ckpt} at step {step} ({elapsed / 60:.1f} min done)")
    else:
        torch.manual_seed(tc.seed)
    (out / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=1))

    data = StepBatches(tc, model.config)
    loader = DataLoader(data, batch_size=None, sampler=range(step, tc.steps), num_workers=tc.num_workers,
                        worker_init_fn=_worker_init if tc.num_workers else None,
                        prefetch_factor=4 if tc.num_workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(tc.seed))  # leaves the global RNG alone (exact resume)
    budget = tc.max_minutes * 60
    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=tc.steps, initial=step, disable=not progress_bar, dynamic_ncols=True, desc=tc.name)
    model.train()
    t_last = time.time()
    history = []
    start_step = step
    for batch in loader:
        progress = max(step / tc.steps, elapsed / budget)
        if progress >= 1.0 or (stop_after is not None and step - start_step >= stop_after):
            break
        f = lr_factor(progress, step, tc)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        loss = compute_loss(model, batch, frozen_text, tc.contrastive_weight)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.clip_grad)
        opt.step()
        step += 1
        if ema is not None:
            ema.update(model, step)
        now = time.time()
        elapsed += now - t_last
        t_last = now
        rec = {**loss.as_dict(), "step": step, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
               "elapsed_s": round(elapsed, 1)}
        history.append(rec)
        log.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok=f"{rec['loss_token']:.3f}", reg=f"{rec['loss_reg']:.3f}",
                        ctr=f"{rec['loss_centerness']:.3f}", lr=f"{rec['lr']:.1e}", refresh=False)
        bar.update(1)
        if step % tc.ckpt_every == 0:
            save_checkpoint(ckpt, model, opt, ema, step, elapsed)
        if tc.eval_every and step % tc.eval_every == 0:
            t0 = time.time()
            q = quick_eval(model, ema, tc)
            log.write(json.dumps({"step": step, "eval": q}) + "\n")
            bar.write(f"step {step}: {q}")
            model.train()
            t_last += time.time() - t0  # evaluation does not eat the training budget
        log.flush()
    bar.close()
    save_checkpoint(ckpt, model, opt, ema, step, elapsed)
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    model.save_pretrained(out / "model", exclude_text_encoder=frozen_text)
    summary = {"steps": step, "train_minutes": round(elapsed / 60, 2), "final_loss": history[-1] if history else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.close()
    return {"model": model, "history": history, **summary}


def save_checkpoint(path: Path, model, opt, ema, step: int, elapsed: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": _trainable_state(model), "optimizer": opt.state_dict(),
                "ema": ema.shadow if ema is not None else None, "step": step, "elapsed": elapsed,
                "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def quick_eval(model, ema, tc: TrainConfig) -> dict:
    """R@1 on a few test_ground scenes and AP50 on a few test_det scenes (EMA weights when on)."""
    from glip.evaluate import evaluate_detection, evaluate_grounding

    backup = None
    if ema is not None:
        backup = {k: v.clone() for k, v in model.state_dict().items() if k in ema.shadow}
        ema.copy_to(model)
    model.eval()
    model._predictor = None
    try:
        g = evaluate_grounding(model, "test_ground", n=tc.eval_n, seed=12345, progress=False)
        d = evaluate_detection(model, n=max(tc.eval_n // 2, 4), seed=12345, progress=False)
    finally:
        if backup is not None:
            model.load_state_dict(backup, strict=False)
        model._predictor = None
    return {"ground_R@1": round(g["R@1"], 3), "det_AP50": round(d["AP50"], 3)}
