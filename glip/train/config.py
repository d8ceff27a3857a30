"""`TrainConfig`: every knob of a training run, the named configs, and how a user sets them.

    python -m glip train --config teacher --set lr=5e-4 --set det_negatives=[4,12]
    python -m glip train --config my_run.json          # a file: any subset of the fields (JSON or YAML)

A file may name a preset to start from (`"base": "finetune"`); every other key must be a field of
`TrainConfig`. Values given with `--set` are parsed as JSON when they parse (numbers, lists, null,
true/false, objects), else taken as strings; each is checked against its field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from glip.errors import ConfigError

MODES = ("full", "prompt", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    name: str = "teacher"
    model: str = "toy"                      # preset for training from scratch (architecture + input size)
    model_overrides: dict = field(default_factory=dict)  # GLIPConfig fields replaced on the preset
    init_from: str | None = None            # start from these weights: anything `GLIP.from_pretrained` reads
    init_config: str | None = None          # its `config=` (preset, our JSON, official yaml/keys JSON): what an
                                            # official .pth's tensors cannot tell (input size, BERT heads)
    mode: str = "full"                      # full | prompt (only a prompt embedding) | linear (the official probe)
    # Training sources: dataset specs with an optional sampling weight, "SPEC[:weight]" (glip.train.data)
    data: tuple[str, ...] = ("world:gold_det:0:50000:0.5", "world:gold_ground:0:50000:0.5")
    steps: int = 3460
    max_minutes: float = 60.0               # time budget; the LR schedule is stretched/compressed to fit
    batch_size: int = 8                     # the global batch: split over ranks and accumulation steps
    grad_accum: int = 1                     # micro-batches per optimiser step (per rank)
    lr: float = 1e-3
    text_lr: float = 0.0                    # language backbone LR in `full` mode; 0 = frozen (no backward)
    bias_lr_factor: float = 1.0             # biases train at lr x this (official fine-tuning: 2)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip_grad: float = 1.0                  # L2 norm over all trained parameters; 0 = off
    ema: float = 0.998                      # 0 = off
    seed: int = 0
    device: str = "auto"                    # auto = CUDA when available (the data stream stays on the CPU)
    precision: str = "fp32"                 # fp32 | bf16 | fp16 (autocast, CUDA only; fp16 with loss scaling)
    train_dropout: bool = False             # False: drop path and every dropout off. Each toy scene is fresh (no
                                            # overfitting to guard against); with them on, toy steps are slower
    # detection records as grounding prompts
    det_negatives: tuple[int, int] | None = None  # absent categories per prompt, uniform in [a, b]; None = the
                                                  # official rule (85 sampled; half the time all, else 1..85)
    hard_negative_weight: float = 1.0       # absent categories sharing a word with a present one drawn this much more
    attribute_prompt_prob: float = 0.0      # detection prompts listing one attribute vocabulary of the source
    share_attribute_words: bool = False     # a region's own attribute words elsewhere in the prompt are positives
                                            # too (`glip.train.data.share_attribute_words`; False = official spans)
    # pseudo-labels (regions with a score)
    min_score: float = 0.0                  # regions scoring below this are dropped (FURTHER_SCREEN)
    mask_unlabelled: bool = True            # tokens of caption phrases that kept no region carry no loss
    # objective / initialisation
    text_projection_init: str = "whiten"    # from scratch: "whiten" S_ground's text projection on the training
                                            # prompts (`whiten_text_projection`), or "default" (nn.Linear's)
    contrastive_weight: float = 1.0         # + weight x token-softmax loss at positive anchors; 0 = GLIP-T's objective
    flip_prob: float = 0.5
    # bookkeeping
    ckpt_every: int = 200
    eval_every: int = 0                     # evaluate `eval_data` every this many steps (0 = off)
    eval_data: tuple[str, ...] = ()         # dataset specs (`python -m glip eval --data`): COCO AP / Recall@1 in the log
    num_threads: int = 2                    # torch threads per process
    num_workers: int = 1                    # prefetching data-loader processes per rank
    out: str = "runs/teacher"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# named configs
# --------------------------------------------------------------------------------------------------
# The toy recipe: the synthetic world's gold scenes, its prompt augmentations, whitened projection.
_TOY = dict(det_negatives=(6, 16), hard_negative_weight=4.0, attribute_prompt_prob=0.3, share_attribute_words=True,
            eval_every=500, eval_data=("world:test_ground:12345:48", "world:test_det:12345:24"))
_TEACHER = TrainConfig(**_TOY)
# The student starts from the teacher (a deviation from the paper, which trains it from scratch: on 2 CPU
# cores there is no time for that) with a fresh LR cycle, and sees gold + pseudo-labelled web data: the
# output folder of `python -m glip label`, its images in data/web (`python -m glip.data export web --format folder`).
_GOLD_STUDENT = ("world:gold_det:0:50000:0.3", "world:gold_ground:0:50000:0.3")
_STUDENT = dataclasses.replace(
    _TEACHER, name="student", init_from="runs/teacher/model", steps=2296, max_minutes=35.0, lr=5e-4,
    warmup_steps=50, data=_GOLD_STUDENT + ("odvg:runs/pseudo:data/web:0.4",),
    min_score=0.5, out="runs/student")
_STUDENT2 = dataclasses.replace(
    _STUDENT, name="student2", init_from="runs/student/model", steps=2087, max_minutes=30.0, lr=3e-4,
    data=_GOLD_STUDENT + ("odvg:runs/pseudo2:data/web:0.4",), out="runs/student2")

# Fine-tuning a released GLIP-T on one's own data (the paper's recipe: AdamW 1e-4, BERT 1e-5, WD 1e-4,
# biases at 2x LR without decay, EMA 0.999, clipping 1.0). `data` and `init_from` come from the user.
_FINETUNE = TrainConfig(
    name="finetune", init_from=None, data=(), steps=2000, max_minutes=1e9, batch_size=4, lr=1e-4,
    text_lr=1e-5, bias_lr_factor=2.0, weight_decay=1e-4, warmup_steps=200, min_lr_ratio=0.0, ema=0.999,
    contrastive_weight=0.0, text_projection_init="default", eval_every=0, eval_data=(), num_workers=2,
    out="runs/finetune")

CONFIGS: dict[str, TrainConfig] = {
    # Step budgets: the steps each time budget gives on an idle 2-core CPU (58-60 steps/min for the teacher,
    # 66-70 for the students); `max_minutes` caps every run.
    "teacher": _TEACHER,
    "student": _STUDENT,
    # Self-training round 2: the round-1 student re-labels the web pairs and goes on training on them.
    "student2": _STUDENT2,
    # Round 3 (the shipped toy-student): the round-2 student re-labels them the same way; 25 minutes.
    "student3": dataclasses.replace(
        _STUDENT2, name="student3", init_from="runs/student2/model", steps=1739, max_minutes=25.0,
        data=_GOLD_STUDENT + ("odvg:runs/pseudo3:data/web:0.4",), out="runs/student3"),
    "finetune": _FINETUNE,
    # The paper's prompt tuning (official `language_prompt_v2`: LR 0.05, WD 0.25), everything else frozen.
    "prompt": dataclasses.replace(_FINETUNE, name="prompt", mode="prompt", lr=0.05, text_lr=0.0, weight_decay=0.25,
                                  bias_lr_factor=1.0, ema=0.0, out="runs/prompt"),
    # The official linear probe: box / centerness / S_ground projection, log_scale and the bias terms.
    "linear": dataclasses.replace(_FINETUNE, name="linear", mode="linear", text_lr=0.0, out="runs/linear"),
    # a few seconds: tests and smoke runs (nn.Linear's projection init: whitening reads 512 prompts)
    "tiny": dataclasses.replace(
        _TEACHER, name="tiny", data=("world:gold_det:0:16:0.5", "world:gold_ground:0:16:0.5"), steps=6,
        batch_size=2, warmup_steps=1, max_minutes=5.0, ema=0.0, ckpt_every=3, eval_every=0, num_workers=0,
        text_projection_init="default", out="runs/tiny"),
}


# --------------------------------------------------------------------------------------------------
# setting fields
# --------------------------------------------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def get_config(config: str, /, **overrides) -> TrainConfig:
    """A named config (or a JSON/YAML file) with `overrides` (None values ignored) applied and checked."""
    base = _named_or_file(config)
    return apply_overrides(base, {k: v for k, v in overrides.items() if v is not None})


def _named_or_file(name: str) -> TrainConfig:
    if name in CONFIGS:
        return CONFIGS[name]
    path = Path(name)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return load_config_file(path)
    raise ConfigError(f"unknown train config {name!r}: not one of {sorted(CONFIGS)} nor a .json/.yaml file")


def load_config_file(path: str | Path) -> TrainConfig:
    """A JSON or YAML mapping of TrainConfig fields; `base` names the preset it starts from (default teacher)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({str(e).splitlines()[0]})") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", "teacher")
    if base not in CONFIGS:
        raise ConfigError(f"{path}: base {base!r} is not a named config ({sorted(CONFIGS)})")
    return apply_overrides(CONFIGS[base], d, where=str(path))


def parse_assignments(pairs: list[str]) -> dict:
    """["lr=1e-4", "data=[\"coco:a.json:img/\"]"] → {"lr": 1e-4, "data": [...]}: JSON when it parses, else a string."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def apply_overrides(tc: TrainConfig, values: dict, where: str = "--set") -> TrainConfig:
    """tc with `values` replaced, each coerced to its field's type; unknown keys and bad values are ConfigErrors."""
    kw = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown training setting {key!r}{hint}")
        kw[key] = _coerce(key, value, _HINTS[key], where)
    return validate(dataclasses.replace(tc, **kw))


def _coerce(key: str, value, hint, where: str):
    bad = ConfigError(f"{where}: {key}={value!r} is not a valid {_type_name(hint)}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            f = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(f) or (hint is int and f != int(f)):
            raise bad
        return int(f) if hint is int else f
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0], where) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(key, v, a, where) for v, a in zip(value, args))
    raise bad  # pragma: no cover - every field's type is handled above


def _type_name(hint) -> str:
    if hint in (int, float, str, bool, dict):
        return hint.__name__
    s = str(hint).replace("typing.", "")
    return s


def validate(tc: TrainConfig) -> TrainConfig:
    """Refuse settings that would run but make no sense (a run of -1 steps, a zero batch...)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(tc.steps >= 1, f"steps must be at least 1, not {tc.steps}")
    need(tc.batch_size >= 1, f"batch_size must be at least 1, not {tc.batch_size}")
    need(tc.grad_accum >= 1, f"grad_accum must be at least 1, not {tc.grad_accum}")
    need(tc.batch_size % tc.grad_accum == 0,
         f"batch_size {tc.batch_size} is not a multiple of grad_accum {tc.grad_accum}")
    need(tc.max_minutes > 0, f"max_minutes must be positive, not {tc.max_minutes}")
    need(tc.lr > 0, f"lr must be positive, not {tc.lr}")
    need(tc.text_lr >= 0, f"text_lr must be >= 0 (0 freezes the language backbone), not {tc.text_lr}")
    need(tc.bias_lr_factor > 0, f"bias_lr_factor must be positive, not {tc.bias_lr_factor}")
    need(tc.weight_decay >= 0, f"weight_decay must be >= 0, not {tc.weight_decay}")
    need(tc.warmup_steps >= 0, f"warmup_steps must be >= 0, not {tc.warmup_steps}")
    need(0 <= tc.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], not {tc.min_lr_ratio}")
    need(tc.clip_grad >= 0, f"clip_grad must be >= 0 (0 = off), not {tc.clip_grad}")
    need(0 <= tc.ema < 1, f"ema must be in [0, 1) (0 = off), not {tc.ema}")
    need(tc.mode in MODES, f"mode must be one of {list(MODES)}, not {tc.mode!r}")
    need(tc.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, not {tc.precision!r}")
    need(tc.device == "auto" or tc.device == "cpu" or tc.device.startswith("cuda"),
         f"device must be auto, cpu or cuda[:N], not {tc.device!r}")
    need(tc.det_negatives is None or 0 <= tc.det_negatives[0] <= tc.det_negatives[1],
         f"det_negatives must be [min, max] with 0 <= min <= max, not {tc.det_negatives}")
    need(tc.hard_negative_weight > 0, f"hard_negative_weight must be positive, not {tc.hard_negative_weight}")
    need(0 <= tc.attribute_prompt_prob <= 1, f"attribute_prompt_prob must be in [0, 1], not {tc.attribute_prompt_prob}")
    need(0 <= tc.flip_prob <= 1, f"flip_prob must be in [0, 1], not {tc.flip_prob}")
    need(0 <= tc.min_score <= 1, f"min_score must be in [0, 1], not {tc.min_score}")
    need(tc.text_projection_init in ("whiten", "default"),
         f"text_projection_init must be 'whiten' or 'default', not {tc.text_projection_init!r}")
    need(tc.contrastive_weight >= 0, f"contrastive_weight must be >= 0, not {tc.contrastive_weight}")
    need(tc.ckpt_every >= 1, f"ckpt_every must be at least 1, not {tc.ckpt_every}")
    need(tc.eval_every >= 0, f"eval_every must be >= 0 (0 = off), not {tc.eval_every}")
    need(not tc.eval_every or bool(tc.eval_data), "eval_every is set but eval_data names no dataset to evaluate")
    need(tc.num_threads >= 1, f"num_threads must be at least 1, not {tc.num_threads}")
    need(tc.num_workers >= 0, f"num_workers must be >= 0, not {tc.num_workers}")
    need(bool(tc.out), "out (the run folder) must be set")
    need(tc.mode != "prompt" or tc.init_from, "mode prompt tunes a prompt for a trained model: set init_from")
    need(tc.mode != "linear" or tc.init_from, "mode linear probes a trained model: set init_from")
    return tc


__all__ = ["TrainConfig", "CONFIGS", "MODES", "PRECISIONS", "get_config", "load_config_file", "parse_assignments",
           "apply_overrides", "validate"]
