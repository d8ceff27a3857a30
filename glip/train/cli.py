"""`python -m glip train` (docs/training.md); labelling and evaluation are `python -m glip label` /
`python -m glip eval` (glip/cli_data.py).

    python -m glip train --config teacher                 # gold data only  → runs/teacher/model
    python -m glip label --model runs/teacher/model --data world:web:0:3000 --out runs/pseudo \
        --score-words known_words.txt --max-per-phrase 1
    python -m glip train --config student                 # gold + pseudo   → runs/student/model
    python -m glip train --config finetune --init-from glip_tiny_model_o365_goldg.pth --data coco:ann.json:images/
    python -m glip eval --model runs/student/model --split all --seed 1 --n 200 --json
"""
from __future__ import annotations

import json


def train_config_from_args(a):
    """The run's TrainConfig: the named config or file, then the flags, then every --set (each checked)."""
    from .config import get_config, parse_assignments

    flags = {"steps": a.steps, "out": a.out, "max_minutes": a.max_minutes, "init_from": a.init_from, "mode": a.mode,
             "data": tuple(a.data) if a.data else None, "seed": a.seed, "num_threads": a.threads, "device": a.device,
             "num_workers": a.workers, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
             "precision": a.precision}
    flags = {k: v for k, v in flags.items() if v is not None}
    return get_config(a.config, **{**flags, **parse_assignments(a.set or [])})


def cmd_train(a) -> int:
    import os

    from .trainer import train

    tc = train_config_from_args(a)
    if a.print_config:
        print(json.dumps(tc.to_dict(), indent=1))
        return 0
    r = train(tc, resume=a.resume, progress_bar=not a.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": r["steps"], "train_minutes": r["train_minutes"], "saved": r.get("saved")}))
    return 0


def add_commands(sub) -> None:
    from .config import CONFIGS

    s = sub.add_parser("train", help="train / fine-tune / prompt-tune a GLIP on any mixture of datasets (torchrun: DDP)",
                       description="Every TrainConfig field can be set with --set KEY=VALUE (docs/training.md).")
    s.add_argument("--config", default="teacher",
                   help=f"named config ({', '.join(sorted(CONFIGS))}) or a .json/.yaml file of fields")
    s.add_argument("--data", nargs="+", default=None, metavar="SPEC[:WEIGHT]",
                   help="training sources with sampling weights, e.g. world:gold_det:0:50000:0.5 odvg:f.jsonl:img/:0.5")
    s.add_argument("--init-from", default=None, help="start from these weights (anything from_pretrained reads)")
    s.add_argument("--mode", default=None, help="full | prompt (the paper's prompt tuning) | linear (linear probe)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field (repeatable)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None, help="global batch (split over ranks and --grad-accum)")
    s.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step")
    s.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (autocast, CUDA)")
    s.add_argument("--max-minutes", type=float, default=None, help="time budget (the LR schedule fits into it)")
    s.add_argument("--out", default=None, help="run directory (checkpoints, log, final model/)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=int, default=None, help="torch threads per process")
    s.add_argument("--device", default=None, help="auto (CUDA when available, the default), cpu or cuda")
    s.add_argument("--workers", type=int, default=None, help="data-loader processes per rank")
    s.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_train)
