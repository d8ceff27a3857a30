"""The training loop: any GLIP (from scratch, a released checkpoint, our folders) on any mixture of sources.

All knobs live in `TrainConfig` (glip.train.config). Three modes:

* ``full``: every weight trains (AdamW), the language backbone at its own LR (`text_lr`; the paper: 1e-5 vs
  1e-4; 0 freezes it and skips its backward).
* ``prompt``: the paper's prompt tuning (official `language_prompt_v2`): the whole model frozen, only a
  zero-initialised per-position prompt embedding trained (`glip.prompt_tuning`); saved as a small folder that
  loads on top of its base model.
* ``linear``: the official linear probe: only `bbox_pred`, `centerness`, `dot_product_projection_text`,
  `log_scale`, `bias_lang`, `bias0` train.

Frozen weights never enter the optimiser or the EMA, so they stay bit-identical.

* Loss: GLIP's (`glip_loss`), plus an optional token-softmax term (`contrastive_weight`); S_ground's text
  projection starts whitened when training from scratch (`text_projection_init`). Both exist because with
  GLIP-T's objective alone the toy model never learned colour (README, "Where colour went").
* Linear warm-up, then cosine decay to `min_lr_ratio`. Progress is max(step / steps, elapsed / time budget).
* Gradient clipping, optional EMA, AMP (bf16/fp16 on CUDA), gradient accumulation, data-parallel over
  torchrun ranks (glip.train.distributed). Every random draw of step s is seeded from (seed, s), so `--resume`
  continues exactly the run that was interrupted.
* Rank 0 writes `<out>/last.pt` every `ckpt_every` steps (glip.train.resume), `<out>/log.jsonl`, and at the end
  `<out>/model/` (our format; config.json carries the training card) or `<out>/prompt/` (prompt mode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from glip.datasets.writers import output_folder
from glip.errors import CheckpointError, ConfigError
from glip.runtime import autocast, peak_rss_mb
from glip.train import distributed as D
from glip.train.config import CONFIGS, TrainConfig, get_config, validate
from glip.train.data import Collate, InputSpec, ItemOptions, StepBatches, open_sources, training_prompts
from glip.train.losses import glip_loss
from glip.train.resume import check_same_run, load_state, save_state

# The official linear probe's trainable parameters (`tools/finetune.py`, linear_prob); `cls_logits`, also on the
# official list, is not used by GLIP's forward pass and gets no gradient.
LINEAR_PROBE = ("rpn.head.bbox_pred.", "rpn.head.centerness.", "rpn.head.dot_product_projection_text.",
                "rpn.head.log_scale", "rpn.head.bias_lang", "rpn.head.bias0")
PROMPT_PARAMS = ("tunable_linear.",)


# --------------------------------------------------------------------------------------------------
# model / optimiser
# --------------------------------------------------------------------------------------------------
def build_model(tc: TrainConfig, prompts=None):
    """The model to train, on the CPU (the caller moves it), with `apply_mode` applied. `prompts(cfg)`: the
    training prompts for a model config, read to whiten S_ground's text projection when training from scratch
    (None: left as initialised, e.g. when a resume state replaces it anyway)."""
    from glip.config import PRESETS, get_preset
    from glip.language import load_pretrained_text_encoder
    from glip.model import GLIP
    from glip.prompt_tuning import is_prompt_folder

    if tc.init_from:
        if tc.init_from.lower() in PRESETS and not Path(tc.init_from).exists():
            raise ConfigError(f"init_from {tc.init_from!r} is a preset (random weights): to train from scratch "
                              f"leave init_from unset and set model={tc.init_from}")
        if is_prompt_folder(tc.init_from) and tc.mode != "prompt":
            raise ConfigError(f"{tc.init_from} is a tuned prompt: mode {tc.mode} trains its base model "
                              "(init_from the base model instead)")
        model = GLIP.from_pretrained(tc.init_from, config=tc.init_config, device="cpu")
    else:
        torch.manual_seed(tc.seed)
        try:
            cfg = get_preset(tc.model).replace(**tc.model_overrides)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"model {tc.model!r} with model_overrides {tc.model_overrides}: {e}") from None
        model = GLIP(cfg)
        load_pretrained_text_encoder(model.language_backbone, model.config.text_encoder)
        if tc.text_projection_init == "whiten" and prompts is not None:
            whiten_text_projection(model, prompts(model.config))
    if not tc.train_dropout:
        disable_dropout(model)
    apply_mode(model, tc)
    return model


def apply_mode(model, tc: TrainConfig) -> list[str]:
    """Set requires_grad for `tc.mode`; returns the names of the parameters that train."""
    if tc.mode == "prompt":
        from glip.prompt_tuning import attach_prompt

        if model.tunable_linear is None:
            attach_prompt(model)
        trainable = PROMPT_PARAMS
    elif tc.mode == "linear":
        trainable = LINEAR_PROBE
    else:
        trainable = None
    names = []
    for name, p in model.named_parameters():
        if trainable is not None:
            on = name.startswith(trainable)
        else:
            on = not name.startswith("rpn.head.cls_logits.") and (
                tc.text_lr > 0 or not name.startswith("language_backbone."))
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names


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

    if not captions:
        raise ConfigError("text_projection_init 'whiten' needs training prompts")
    head, cfg = model.rpn.head, model.config
    with torch.no_grad():
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
    """AdamW groups over the trainable parameters: language backbone at `text_lr`, biases at lr x
    `bias_lr_factor`, no weight decay on biases, norms and Swin's relative position tables."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        text = name.startswith("language_backbone.")
        bias = name.endswith(".bias")
        no_wd = p.ndim <= 1 or bias or "relative_position_bias_table" in name
        lr = (tc.text_lr if text else tc.lr) * (tc.bias_lr_factor if bias else 1.0)
        key = (text, no_wd, bias)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr, "weight_decay": 0.0 if no_wd else tc.weight_decay, "base_lr": lr}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_factor(progress: float, step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return 0.001 + (1 - 0.001) * step / max(tc.warmup_steps, 1)
    t = min(max(progress, 0.0), 1.0)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of the trained parameters (frozen ones are left alone: averaging a
    constant is not bit-exact in floating point)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    def copy_to(self, model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in self.shadow.items():
                params[k].copy_(v)


def compute_loss(model, batch: dict, frozen_text: bool, contrastive_weight: float = 0.0, normalizer=None,
                 precision: str = "fp32"):
    dev = next(model.parameters()).device
    ids, attention = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    with autocast(dev, precision):
        feats = model.encode_image(batch["images"].to(dev, non_blocking=True))
        if frozen_text:
            model.language_backbone.eval()
            with torch.no_grad():
                text = model.language_backbone(ids, attention)
        else:
            text = model.language_backbone(ids, attention)
        head = model.ground(feats, model.add_prompt(text))
    f32 = (lambda xs: [x.float() for x in xs]) if precision != "fp32" else (lambda xs: xs)
    return glip_loss(f32(head.token_logits), f32(head.bbox_reg), f32(head.centerness), model.anchors(feats),
                     batch["targets"], batch["loss_mask"].to(dev), model.box_coder,
                     contrastive_weight=contrastive_weight, normalizer=normalizer)


class _LossModule(torch.nn.Module):
    """What DistributedDataParallel wraps: forward = the loss of a batch (the hooks then average gradients)."""

    def __init__(self, model, frozen_text: bool, contrastive_weight: float, precision: str, normalizer):
        super().__init__()
        self.model = model
        self.args = (frozen_text, contrastive_weight, normalizer, precision)

    def forward(self, batch):
        frozen, cw, norm, precision = self.args
        return compute_loss(self.model, batch, frozen, cw, norm, precision)


def _trainable_state(model) -> dict:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 99991, step, rank]).generate_state(1)[0])


def _is_stock_text_encoder(model) -> bool:
    """True when the language backbone holds exactly the pip-packaged weights (it may then be left out)."""
    from glip.checkpoint import TEXT_ENCODERS

    if model.config.text_encoder not in TEXT_ENCODERS:
        return False
    stock = TEXT_ENCODERS[model.config.text_encoder][0]()  # (weights, shapes) readers
    own = model.language_backbone.body.model.state_dict()
    return all(k in own and torch.equal(own[k].cpu(), v) for k, v in stock.items())


# --------------------------------------------------------------------------------------------------
# loop
# --------------------------------------------------------------------------------------------------
def train(tc: TrainConfig, resume: bool = False, progress_bar: bool = True, quiet: bool = False,
          stop_after: int | None = None) -> dict:
    """Run (or, with resume, continue) a training run; under torchrun, this process's rank of it.
    stop_after: leave after that many steps of this call, checkpoint included (an interruption, for tests)."""
    tc = validate(tc)
    dist_info, dev = D.setup(tc.device)
    ok = False
    # rank 0 proves --out writable before the model is built, and removes it again if the run stops first
    folder = output_folder(tc.out) if dist_info.is_main else contextlib.nullcontext()
    try:
        with folder:
            out = _train(tc, dist_info, dev, resume, progress_bar, quiet, stop_after)
        ok = True
        return out
    finally:
        if ok:
            D.teardown(dist_info)
        elif dist_info.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(tc: TrainConfig, di: D.Dist, dev: torch.device, resume: bool, progress_bar: bool, quiet: bool,
           stop_after: int | None) -> dict:
    from tqdm import tqdm

    if tc.precision == "fp16" and dev.type != "cuda":  # bf16 autocast also runs on CPUs
        raise ConfigError(f"precision fp16 (autocast with loss scaling) needs a CUDA device; this run is on {dev}: "
                          "use bf16 or fp32")
    if tc.batch_size % (di.world * tc.grad_accum):
        raise ConfigError(f"batch_size {tc.batch_size} does not split into {di.world} ranks x {tc.grad_accum} "
                          "accumulation steps")
    torch.set_num_threads(tc.num_threads)
    out = Path(tc.out)
    ckpt = out / "last.pt"
    state = None
    if resume and ckpt.is_file():
        state = load_state(ckpt)
        check_same_run(state, tc.to_dict(), ckpt)
    elif di.is_main:
        done = [n for n in ("last.pt", "log.jsonl", "model/model.safetensors") if (out / n).is_file()]
        if done and not resume:  # another run's weights and log: never overwritten without being asked
            raise ConfigError(f"{out} already holds a training run ({', '.join(done)}); pass --resume to continue "
                              "it, or give another --out")
        if resume and not quiet:
            print(f"no resume state ({ckpt} does not exist): starting a new run")
    sources, weights = open_sources(tc.data)
    opts = ItemOptions.from_config(tc)
    prompts = (lambda cfg: training_prompts(sources, weights, 512, cfg.max_query_len, tc.seed, opts))
    model = build_model(tc, prompts=prompts if state is None else None).to(dev)
    frozen_text = not any(p.requires_grad for p in model.language_backbone.parameters())
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=(0.9, 0.999))
    if not opt.param_groups:
        raise ConfigError(f"mode {tc.mode}: no parameter to train")
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    ema = EMA(model, tc.ema) if tc.ema > 0 and di.is_main else None
    step, elapsed = 0, 0.0
    if state is not None:
        missing = [k for k in _trainable_state(model) if k not in state["model"]]
        if missing:
            raise CheckpointError(f"{ckpt}: resume state lacks {len(missing)} trained tensors ({missing[0]}, ...)")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state["model"].items():
                if k not in params:
                    raise CheckpointError(f"{ckpt}: resume state has {k!r}, which this model does not")
                params[k].copy_(v)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt}: optimiser state does not match this run ({e})") from None
        if ema is not None and state.get("ema") is not None:
            ema.shadow = {k: v.to(dev) for k, v in state["ema"].items()}
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, elapsed = state["step"], state["elapsed"]
        if not quiet and di.is_main:
            print(f"resumed {ckpt} at step {step} ({elapsed / 60:.1f} min done)")
    if di.is_main:
        (out / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=1))
        _truncate_log(out / "log.jsonl", step)

    normalizer = D.mean_over_ranks if di.enabled else None
    step_fn = _LossModule(model, frozen_text, tc.contrastive_weight, tc.precision, normalizer)
    if di.enabled:
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # the buffers are constants (index tables): synced once at construction, never per forward
        quiet_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                         else {"broadcast_buffers": False})
        # find_unused_parameters: which parameters a forward uses depends on the architecture (a toy model's last
        # fusion-BERT layer feeds nothing when S_ground reads the unfused text)
        step_fn = DDP(step_fn, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True,
                      **quiet_buffers)

    data = make_stream(tc, model.config, di.rank, di.world, (sources, weights))
    loader = DataLoader(data, batch_size=None, sampler=range(step, tc.steps), num_workers=tc.num_workers,
                        worker_init_fn=_worker_init if tc.num_workers else None,
                        prefetch_factor=4 if tc.num_workers else None, persistent_workers=False,
                        pin_memory=dev.type == "cuda")
    budget = tc.max_minutes * 60
    log = (out / "log.jsonl").open("a") if di.is_main else None
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress_bar and di.is_main), dynamic_ncols=True,
               desc=tc.name)
    model.train()
    trained = [p for g in opt.param_groups for p in g["params"]]
    t_last = time.time()
    history = []
    start_step = step
    for micro_batches in loader:
        progress = max(step / tc.steps, elapsed / budget)
        if progress >= 1.0 or (stop_after is not None and step - start_step >= stop_after):
            break
        torch.manual_seed(_step_seed(tc.seed, step, di.rank))  # dropout etc.: a function of the step, not of history
        f = lr_factor(progress, step, tc)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        opt.zero_grad(set_to_none=True)
        parts = []
        for a, batch in enumerate(micro_batches):
            sync = a == len(micro_batches) - 1
            with step_fn.no_sync() if di.enabled and not sync else contextlib.nullcontext():
                loss = step_fn(batch)
                total = loss.total / len(micro_batches)
                (scaler.scale(total) if scaler is not None else total).backward()
            parts.append(loss)
        if scaler is not None:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(trained, tc.clip_grad if tc.clip_grad > 0 else float("inf"))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        step += 1
        if ema is not None:
            ema.update(model, step)
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if di.enabled:
            elapsed = D.max_over_ranks(elapsed, dev)  # every rank stops at the same step
        rec = _log_record(parts, di)
        rec.update(step=step, lr=opt.param_groups[0]["lr"], grad_norm=float(gnorm), elapsed_s=round(elapsed, 2))
        history.append(rec)
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok=f"{rec['loss_token']:.3f}", reg=f"{rec['loss_reg']:.3f}",
                        lr=f"{rec['lr']:.1e}", refresh=False)
        bar.update(1)
        if step % tc.ckpt_every == 0 and di.is_main:
            _checkpoint(ckpt, model, opt, ema, scaler, step, elapsed, tc)
        if tc.eval_every and step % tc.eval_every == 0 and di.is_main:
            t0 = time.time()
            q = quick_eval(model, ema, tc)
            log.write(json.dumps({"step": step, "eval": q}) + "\n")
            bar.write(f"step {step}: {q}")
            model.train()
            t_last += time.time() - t0  # evaluation does not eat the training budget
    bar.close()
    summary = {"steps": step, "train_minutes": round(elapsed / 60, 2), "final_loss": history[-1] if history else None,
               "world_size": di.world, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if dev.type == "cuda":
        summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1)
    if di.is_main:
        _checkpoint(ckpt, model, opt, ema, scaler, step, elapsed, tc)
        if ema is not None:
            ema.copy_to(model)
        model.eval()
        summary["saved"] = str(save_result(model, tc, step, di.world))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.close()
    return {"model": model, "history": history, **summary}


def make_stream(tc: TrainConfig, model_cfg, rank: int = 0, world: int = 1, opened=None) -> StepBatches:
    """The run's data stream: item s = this rank's collated micro-batches of step s."""
    sources, weights = opened or open_sources(tc.data)
    return StepBatches(sources, weights, InputSpec(model_cfg), ItemOptions.from_config(tc), tc.batch_size, tc.seed,
                       rank, world, tc.grad_accum, Collate(model_cfg))


def _worker_init(_):
    torch.set_num_threads(1)


def _log_record(parts: list, di: D.Dist) -> dict:
    """The step's loss terms, averaged over micro-batches and ranks (= the whole batch's loss)."""
    recs = [p.as_dict() for p in parts]
    keys = [k for k in recs[0] if k != "num_pos"]
    vals = torch.tensor([[r[k] for k in keys] + [r["num_pos"]] for r in recs], dtype=torch.float64).mean(0)
    if di.enabled:
        vals = vals.to(_comm_device()) if torch.distributed.get_backend() == "nccl" else vals
        vals = D.mean_over_ranks(vals).cpu()
    rec = {k: float(v) for k, v in zip(keys, vals[:-1])}
    rec["num_pos"] = float(vals[-1]) * di.world * len(parts)
    return rec


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device())


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's records up to `step` (a killed run may have logged steps past its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def _checkpoint(path: Path, model, opt, ema, scaler, step: int, elapsed: float, tc: TrainConfig) -> None:
    save_state(path, model_state=_trainable_state(model), optimizer=opt.state_dict(),
               ema=ema.shadow if ema is not None else None, step=step, elapsed=elapsed, config=tc.to_dict(),
               scaler=scaler.state_dict() if scaler is not None else None)


def training_card(tc: TrainConfig, steps: int, world: int) -> dict:
    """What config.json's `training` records about how the weights were made."""
    return {"base_model": tc.init_from or f"scratch ({tc.model})", "mode": tc.mode, "data": list(tc.data),
            "steps": steps, "batch_size": tc.batch_size, "lr": tc.lr, "text_lr": tc.text_lr,
            "weight_decay": tc.weight_decay, "seed": tc.seed, "world_size": world, "precision": tc.precision,
            "config": tc.name}


def save_result(model, tc: TrainConfig, steps: int, world: int = 1) -> Path:
    """`<out>/prompt/` (prompt mode: the prompt alone, on top of its base) or `<out>/model/` (our format; the
    text encoder is left out when it is the stock pip-packaged one)."""
    card = training_card(tc, steps, world)
    out = Path(tc.out)
    if tc.mode == "prompt":
        from glip.prompt_tuning import is_prompt_folder, read_prompt, save_prompt

        base = read_prompt(tc.init_from)[1]["base_model"] if is_prompt_folder(tc.init_from) else tc.init_from
        return save_prompt(model, out / "prompt", base=base, card=card)
    model.config = dataclasses.replace(model.config, training=card)
    model.save_pretrained(out / "model", exclude_text_encoder=_is_stock_text_encoder(model))
    return out / "model"


@torch.no_grad()
def quick_eval(model, ema, tc: TrainConfig) -> dict:
    """COCO AP / Recall@1 on each of `tc.eval_data` (EMA weights when on), for the log."""
    from glip.evaluate import evaluate_dataset

    backup = None
    if ema is not None:
        backup = {k: v.clone() for k, v in model.named_parameters() if k in ema.shadow}
        ema.copy_to(model)
    model.eval()
    model._predictor = None
    out = {}
    try:
        for spec in tc.eval_data:
            m = evaluate_dataset(model, spec, progress=False)
            out[spec] = {k: round(float(m[k]), 3) for k in ("AP", "AP50", "R@1") if k in m}
    finally:
        if backup is not None:
            params = dict(model.named_parameters())
            for k, v in backup.items():
                params[k].copy_(v)
        model._predictor = None
    return out


__all__ = ["TrainConfig", "CONFIGS", "get_config", "build_model", "apply_mode", "param_groups", "lr_factor", "EMA",
           "compute_loss", "train", "make_stream", "save_result", "training_card", "whiten_text_projection", "disable_dropout",
           "quick_eval", "LINEAR_PROBE"]
