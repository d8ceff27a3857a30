"""`python -m glip train`: the toy self-training pipeline's training step (labelling and evaluation are
`python -m glip label` / `python -m glip eval`, glip/cli_data.py).

    python -m glip train --config teacher                 # gold data only  → runs/teacher/model
    python -m glip label --model runs/teacher/model --data world:web:0:3000 --out runs/pseudo \
        --score-words known_words.txt --max-per-phrase 1
    python -m glip train --config student                 # gold + pseudo   → runs/student/model
    python -m glip eval --model runs/student/model --split all --seed 1 --n 200 --json
"""
from __future__ import annotations

import json


def cmd_train(a) -> int:
    from .trainer import get_config, train

    tc = get_config(a.config, steps=a.steps, out=a.out, max_minutes=a.max_minutes, init_from=a.init_from,
                    pseudo=a.pseudo, pseudo_min_score=a.pseudo_min_score, seed=a.seed, num_threads=a.threads,
                    device=a.device, num_workers=a.workers)
    r = train(tc, resume=a.resume, progress_bar=not a.no_progress)
    print(json.dumps({"steps": r["steps"], "train_minutes": r["train_minutes"], "model": f"{tc.out}/model"}))
    return 0


def add_commands(sub) -> None:
    from .trainer import CONFIGS

    s = sub.add_parser("train", help="train the small GLIP on the synthetic world (teacher / student)")
    s.add_argument("--config", default="teacher", choices=sorted(CONFIGS))
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--max-minutes", type=float, default=None, help="time budget (the LR schedule fits into it)")
    s.add_argument("--out", default=None, help="run directory (checkpoints, log, final model/)")
    s.add_argument("--init-from", default=None, help="start from these weights")
    s.add_argument("--pseudo", default=None, help="pseudo-label ODVG file (student)")
    s.add_argument("--pseudo-min-score", type=float, default=None, help="keep pseudo regions scoring at least this")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default=None, help="auto (CUDA when available, the default), cpu or cuda")
    s.add_argument("--workers", type=int, default=None, help="data-loader processes rendering the scenes")
    s.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_train)
