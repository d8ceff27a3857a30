"""Measure the shipped models and write `assets/metrics.json` (what the model card and the app show).

    python -m glip.train.report --teacher toy-teacher --student toy-student --seed 1 --n 200 --out assets/metrics.json

Measures: test_det AP/AP50, test_ground and test_novel R@1/R@5 for both models (and the earlier
self-training rounds, `--rounds`, those that are there) on fresh-seed scenes;
pseudo-label count and precision of every round's labels (`--pseudo`) (against the web split's hidden truth, reporting only) with a threshold
sweep; the prompt-engineering table (novel word bare / with a description / replaced by a description);
CPU predict latency on one scene (median of repeated runs, caches cleared); training time and loss curves.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from glip.boxes import box_iou
from glip.data import NOVEL_WORDS, make_sample
from glip.prompts import Prompt

# "X, which is <description>" (GLIP §7.2's "stingray, which is flat and round") and a known-words paraphrase
DESCRIPTIONS = {
    "crescent": "a curved moon shape", "cross": "a plus sign shape", "diamond": "a square standing on its corner",
    "turquoise": "a blue green colour", "pink": "a light red colour",
}
PARAPHRASES = {"crescent": "curved moon", "cross": "plus sign", "diamond": "tilted square",
               "turquoise": "blue green", "pink": "light red"}


def _novel_target(s):
    p = next(p for p in s.phrases if p.box_ids)
    word = next(w for w in p.text.split() if w in NOVEL_WORDS)
    return p, word


def prompt_variants(s) -> dict[str, Prompt]:
    p, word = _novel_target(s)
    whole = lambda text: Prompt(text, [text], [[(0, len(text))]])  # noqa: E731
    described = f"{p.text}, which is {DESCRIPTIONS[word]}"
    return {
        "caption (as in test_novel)": Prompt(s.caption, [p.text], [[tuple(p.span)]]),
        "bare phrase": whole(p.text),
        "phrase + description": Prompt(described, [p.text], [[(0, len(p.text))]]),
        "description only (word replaced)": whole(p.text.replace(word, PARAPHRASES[word])),
    }


@torch.no_grad()
def target_hits(model, samples, variant: str, batch_size: int = 8) -> list[bool]:
    """Per test_novel sample: is the top box for the target (prompted with `variant`) a hit (IoU >= 0.5)?"""
    from glip.evaluate import EVAL_INFERENCE_TH

    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        res = model.predict([s.image for s in chunk], [prompt_variants(s)[variant] for s in chunk], threshold=0.0,
                            candidate_threshold=EVAL_INFERENCE_TH)
        for s, r in zip(chunk, res):
            p, _ = _novel_target(s)
            if len(r) == 0:
                out.append(False)
                continue
            gt = torch.tensor([s.objs[b].box for b in p.box_ids], dtype=torch.float32)
            top = torch.as_tensor(r.boxes[:1], dtype=torch.float32)
            out.append(bool((box_iou(top, gt) >= 0.5).any()))
    model.predictor.clear_cache()
    return out


def prompt_engineering(model, samples, batch_size: int = 8) -> dict[str, float]:
    """R@1 on the test_novel target for each prompt variant."""
    names = list(prompt_variants(samples[0]))
    return {n: sum(target_hits(model, samples, n, batch_size)) / len(samples) for n in names}


def novel_by_word(model, samples, batch_size: int = 8) -> dict[str, dict]:
    """test_novel R@1 of the target (caption prompt) split by its novel word: colours and shapes are
    learned by different parts of the network, so they can move differently."""
    hits = target_hits(model, samples, "caption (as in test_novel)", batch_size)
    out: dict[str, dict] = {}
    for s, h in zip(samples, hits):
        _, word = _novel_target(s)
        e = out.setdefault(word, {"n": 0, "hits": 0})
        e["n"] += 1
        e["hits"] += int(h)
    for e in out.values():
        e["R@1"] = round(e["hits"] / e["n"], 3)
    return dict(sorted(out.items()))


def latency(model, runs: int = 10, threads: int = 2) -> dict:
    """Median wall time of model.predict on one 320 px test scene, caches cleared before every run."""
    torch.set_num_threads(threads)
    s = make_sample("test_det", 0, 4242)
    g = make_sample("test_ground", 0, 4242)
    out = {"threads": threads, "runs": runs}
    for name, (img, prompt) in {"detection prompt (36 categories)": (s.image, s.caption),
                                "grounding caption": (g.image, g.caption)}.items():
        model.predict(img, prompt)  # warm-up
        times = []
        for _ in range(runs):
            model.predictor.clear_cache()
            t0 = time.perf_counter()
            model.predict(img, prompt, threshold=0.5)
            times.append(time.perf_counter() - t0)
        out[name] = {"median_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1)}
    model.predictor.clear_cache()
    return out


def curve(run_dir: Path, every: int = 10) -> list[list[float]]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]
    out, acc = [], []
    for r in rows:
        acc.append(r["loss"])
        if r["step"] % every == 0:
            out.append([r["step"], round(float(np.mean(acc)), 4)])
            acc = []
    return out


def quick_evals(run_dir: Path) -> list[dict]:
    """The periodic quick evaluations logged during training (24 test_ground / 12 test_det scenes, seed 12345)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [{"step": r["step"], **r["eval"]} for r in rows if "eval" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="toy-teacher")
    ap.add_argument("--student", default="toy-student")
    ap.add_argument("--pseudo", nargs="*", default=["runs/pseudo/web.jsonl", "runs/pseudo2/web.jsonl", "runs/pseudo3/web.jsonl"],
                    help="pseudo-labels of round 1, 2, … (by the teacher, then each round's student; absent ones skipped)")
    ap.add_argument("--rounds", nargs="*", default=["runs/student/model", "runs/student2/model"],
                    help="the students of rounds 1, 2, … before the shipped one, measured as student_round<k> "
                         "(absent ones skipped)")
    ap.add_argument("--teacher-run", default="runs/teacher", help="run folder with the teacher's log and summary")
    ap.add_argument("--student-run", default="runs/student3", help="run folder with the shipped student's log")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-prompt", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="assets/metrics.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["eval", "prompt", "latency", "pseudo"])
    ap.add_argument("--roles", nargs="*", default=["teacher", "student"], choices=["teacher", "student"],
                    help="models to (re)measure; the other entries of an existing --out are kept")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from glip.data import from_odvg
    from glip.data.judge import sweep
    from glip.evaluate import evaluate, format_table
    from glip.model import GLIP

    out_path = Path(a.out)
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    report["eval"] = {"seed": a.seed, "n": a.n, "iou": 0.5, "note": "fresh-seed scenes (training uses world seed 0)"}
    srcs = {"teacher": a.teacher, "student": a.student}
    runs = {"teacher": Path(a.teacher_run), "student": Path(a.student_run)}
    for k, path in enumerate(a.rounds, 1):
        if "student" in a.roles and Path(path).is_dir():
            srcs[f"student_round{k}"], runs[f"student_round{k}"] = path, Path(path).parent
    roles = list(a.roles) + [r for r in srcs if r.startswith("student_round")]
    models = {role: GLIP.from_pretrained(srcs[role]) for role in roles}
    for role, src in ((r, srcs[r]) for r in roles):
        entry = report.setdefault(role, {})
        entry["model"] = str(src)
        run = runs[role]
        if (run / "summary.json").is_file():
            summ = json.loads((run / "summary.json").read_text())
            entry["train_minutes"], entry["steps"] = summ["train_minutes"], summ["steps"]
            entry["loss_curve"] = curve(run)
            entry["quick_eval"] = quick_evals(run)
        if "eval" not in a.skip:
            entry["metrics"] = evaluate(models[role], "all", n=a.n, seed=a.seed, progress=True)
            print(role, "\n" + format_table(entry["metrics"]), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
    for k, path in enumerate(a.pseudo, 1):
        key = "pseudo_labels" if k == 1 else f"pseudo_labels_round{k}"
        if "pseudo" in a.skip or not Path(path).is_file():
            continue
        recs = from_odvg(path)
        n_boxes = sum(len(r["grounding"]["regions"]) for r in recs)
        rows, words = sweep(recs, (0.3, 0.4, 0.45, 0.48, 0.5, 0.52, 0.55), word_screen=0.5)
        report[key] = {"file": path, "n_images": len(recs), "n_boxes": n_boxes, "sweep": rows,
                       "by_novel_word_at_0.5": words}
        print(key, json.dumps(report[key]["sweep"]), flush=True)
        out_path.write_text(json.dumps(report, indent=1))
    if "prompt" not in a.skip and models:  # the measured roles' columns; other roles' entries are kept
        samples = [make_sample("test_novel", i, a.seed) for i in range(a.n_prompt)]
        table = {role: prompt_engineering(m, samples) for role, m in models.items()}
        kept = {r["prompt"]: r for r in report.get("prompt_engineering", {}).get("rows", [])}
        report["prompt_engineering"] = {"split": "test_novel", "n": a.n_prompt, "metric": "R@1",
                                        "descriptions": DESCRIPTIONS, "paraphrases": PARAPHRASES,
                                        "rows": [{**kept.get(k, {}), "prompt": k,
                                                  **{role: round(t[k], 3) for role, t in table.items()}}
                                                 for k in next(iter(table.values()))]}
        print("prompt", json.dumps(report["prompt_engineering"]["rows"]), flush=True)
        out_path.write_text(json.dumps(report, indent=1))
        samples = [make_sample("test_novel", i, a.seed) for i in range(a.n)]
        report["novel_by_word"] = {**report.get("novel_by_word", {}), "split": "test_novel", "n": a.n,
                                   "metric": "R@1 of the target, caption prompt",
                                   **{role: novel_by_word(m, samples) for role, m in models.items()}}
        print("novel_by_word", json.dumps(report["novel_by_word"]), flush=True)
        out_path.write_text(json.dumps(report, indent=1))
    if "latency" not in a.skip and "student" in models:
        report["latency"] = {"device": "cpu", "model": a.student, **latency(models["student"], threads=a.threads)}
        print("latency", json.dumps(report["latency"]), flush=True)
    out_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
