"""`python -m glip {train,pseudo-label,eval}`: training (docs/training.md) and the toy self-training pipeline.

    python -m glip train --config teacher                 # gold data only  → runs/teacher/model
    python -m glip pseudo-label --model runs/teacher/model --out runs/pseudo/web.jsonl --n 3000
    python -m glip train --config student                 # gold + pseudo   → runs/student/model
    python -m glip train --config finetune --init-from glip_tiny_model_o365_goldg.pth --data coco:ann.json:images/
    python -m glip eval --model runs/student/model --split all --seed 1 --n 200 --json
"""
from __future__ import annotations

import json
import sys


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


def cmd_pseudo(a) -> int:
    import torch

    from glip.model import GLIP
    from glip.pseudo import pseudo_label, pseudo_label_precision
    from glip.train.data import ATTRIBUTE_WORDS

    torch.set_num_threads(a.threads)
    model = GLIP.from_pretrained(a.model)
    records, stats = pseudo_label(model, n=a.n, seed=a.seed, threshold=a.threshold, batch_size=a.batch_size,
                                  max_per_phrase=a.max_per_phrase or None, out=a.out, start=a.start,
                                  score_words=ATTRIBUTE_WORDS if a.score_words == "known" else a.score_words)
    if a.precision:  # reporting only: reads the web split's hidden boxes
        stats["precision"] = pseudo_label_precision(records)
    print(json.dumps(stats, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    import torch

    from glip.evaluate import evaluate, format_table
    from glip.model import GLIP

    torch.set_num_threads(a.threads)
    model = GLIP.from_pretrained(a.model)
    metrics = evaluate(model, a.split, n=a.n, seed=a.seed, batch_size=a.batch_size, progress=not a.json)
    if a.json:
        print(json.dumps({"model": a.model, "seed": a.seed, "n": a.n, "metrics": metrics}, indent=1))
    else:
        print(format_table(metrics))
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

    s = sub.add_parser("pseudo-label", help="teacher grounds the noun phrases of web captions → ODVG")
    s.add_argument("--model", default="toy-teacher")
    s.add_argument("--out", required=True, help="ODVG JSONL to write")
    s.add_argument("--n", type=int, default=3000, help="web pairs to label")
    s.add_argument("--seed", type=int, default=0, help="world seed of the web split")
    s.add_argument("--start", type=int, default=0, help="first web index to label")
    s.add_argument("--threshold", type=float, default=0.5, help="keep boxes scoring above this (paper: 0.5)")
    s.add_argument("--max-per-phrase", type=int, default=1, help="boxes kept per phrase (0 = all)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--score-words", choices=["known", "content", "all"], default="known",
                   help="score a phrase by its gold-vocabulary words (known: a gold-trained teacher), all its words "
                        "but articles (content: a student that learned the web words) or all its tokens (all, the paper)")
    s.add_argument("--precision", action="store_true", help="also report precision against the hidden boxes")
    s.set_defaults(fn=cmd_pseudo)

    s = sub.add_parser("eval", help="COCO AP on test_det, Recall@k on test_ground / test_novel")
    s.add_argument("--model", default="toy-student")
    s.add_argument("--split", default="all", choices=["test_det", "test_ground", "test_novel", "all"])
    s.add_argument("--seed", type=int, default=1, help="world seed of the test scenes (training uses 0)")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)
