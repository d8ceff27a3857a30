"""Command line: `python -m glip {predict,convert,parity,bench,...} --help`."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_predict(a) -> int:
    from .model import GLIP

    model = GLIP.from_pretrained(a.model, config=a.config, device=a.device)
    res = model.predict(a.image, a.prompt, threshold=a.threshold, nms_iou=a.nms_iou, max_dets=a.max_dets,
                        min_size=a.min_size, max_size=a.max_size, mode=a.mode,
                        phrases=a.phrase or None)
    if a.json:
        print(json.dumps({"caption": res.prompt.caption, "phrases": res.prompt.phrases, "detections": res.to_json()}, indent=1))
    else:
        print(f"caption: {res.prompt.caption!r}")
        print(f"phrases: {res.prompt.phrases}")
        for d in res.to_json():
            print(f"  {d['score']:.3f}  {d['phrase']:30s} {d['box']}")
        if not len(res):
            print(f"  no box above threshold {a.threshold}")
    if a.out:
        from .draw import draw_result

        draw_result(res, a.image).save(a.out)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from .checkpoint import convert

    out = convert(a.src, a.out_dir, fp16=a.fp16, config=a.config)
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    return 0


def cmd_parity(a) -> int:
    import torch

    from .parity import run_parity

    if a.threads:
        torch.set_num_threads(a.threads)
    rep = run_parity(a.fixture, atol=a.atol, rtol=a.rtol, device=a.device, tf32=a.tf32)
    print(f"parity on {a.device}" + (" (TF32 on)" if a.tf32 else ""))
    print(rep.table())
    return 0 if rep.ok else 1


def cmd_bench(a) -> int:
    import torch

    from .bench import format_compare, format_result, load_result, peak_rss_mb, run_bench

    if a.threads:
        torch.set_num_threads(a.threads)
    ref = load_result(a.compare) if a.compare else None
    sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip()) if a.sizes else ()
    devices = [a.device] if a.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for dev in devices:
        res = run_bench(a.preset, a.height, a.width, a.runs, dev, a.precision, sizes=sizes)
        if a.rss and dev == "cpu":
            res.meta["peak_rss_mb"] = peak_rss_mb(a.preset, a.height, a.width, a.precision)
        results.append(res)
        if not a.json:
            print(format_result(res))
            if ref is not None:
                print(format_compare(res, ref))
    if a.json:
        out = [r.to_json() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glip", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("predict", help="ground a prompt in an image")
    s.add_argument("--model", default="toy-student", help="official .pth, our folder, preset or shipped name")
    s.add_argument("--config", default=None, help="preset / our JSON / official yaml (what tensors cannot tell)")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", required=True, help='caption or category list ("person . dog")')
    s.add_argument("--phrase", action="append", help="explicit phrase of the caption to ground (repeatable)")
    s.add_argument("--mode", default="auto", choices=["auto", "categories", "caption"])
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--nms-iou", type=float, default=None)
    s.add_argument("--max-dets", type=int, default=100)
    s.add_argument("--min-size", type=int, default=None)
    s.add_argument("--max-size", type=int, default=None)
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", default=None, help="write the annotated image here")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("convert", help="official .pth → safetensors + config.json")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--fp16", action="store_true")
    s.add_argument("--config", default=None)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("parity", help="compare with an official reference fixture, stage by stage")
    s.add_argument("fixture")
    s.add_argument("--atol", type=float, default=1e-4)
    s.add_argument("--rtol", type=float, default=1e-3)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--tf32", action="store_true", help="leave TF32 on (CUDA; expect mismatches at 1e-4)")
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("bench", help="time, FLOPs and compute floor of every stage and of the cached paths")
    s.add_argument("--preset", default="glip-t")
    s.add_argument("--height", type=int, default=800)
    s.add_argument("--width", type=int, default=1333)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--device", default=None)
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    s.add_argument("--sizes", default="", help="also predict at these shorter sides, e.g. 480,640,800")
    s.add_argument("--rss", action="store_true", help="also measure the peak RSS of a fresh process")
    s.add_argument("--json", action="store_true", help="print the result as JSON (for --compare later)")
    s.add_argument("--compare", default=None, metavar="REF.json", help="print speed-ups against an earlier --json run")
    s.set_defaults(fn=cmd_bench)

    try:
        from .train.cli import add_commands  # training, pseudo-labelling, evaluation (issue 3)
        add_commands(sub)
    except ImportError:
        pass

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
