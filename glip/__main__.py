"""Command line: `python -m glip {predict,convert,parity,bench,label,eval,train} --help`.

Bad arguments and inputs end with one line on stderr and exit code 2 (see `glip.cli_args`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_args import (
    Parser,
    device,
    existing_dir,
    float_range,
    image_output,
    int_range,
    iou,
    nonnegative_float,
    nonnegative_int,
    probability,
    run_command,
    threads,
)
from .config import PRESETS
from .errors import ConfigError


def cmd_predict(a) -> int:
    from .image import probe_size
    from .model import GLIP

    probe_size(a.image)  # a missing or unreadable image fails before the model is loaded
    if a.out:  # and so does an --out folder that cannot be written
        from .datasets.writers import check_writable

        check_writable(Path(a.out).parent)
    model = GLIP.from_pretrained(a.model, config=a.config, device=a.device)
    bar = None

    def progress(done: int, total: int) -> None:  # a bar only for a prompt long enough to run in chunks
        nonlocal bar
        if total > 1:
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, desc="prompt chunks", unit="chunk", file=sys.stderr)
            bar.update(1)

    try:
        res = model.predict(a.image, a.prompt, threshold=a.threshold, nms_iou=a.nms_iou, max_dets=a.max_dets,
                            min_size=a.min_size, max_size=a.max_size, mode=a.mode, phrases=a.phrase or None,
                            candidate_threshold=a.candidate_threshold, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if a.json:
        print(json.dumps({"caption": res.prompt.caption, "phrases": res.prompt.phrases,
                          "image_size": list(res.image_size), "detections": res.to_json()}, indent=1))
    else:
        print(f"caption: {res.prompt.caption!r}")
        print(f"phrases: {res.prompt.phrases}")
        for d in res.to_json():
            print(f"  {d['score']:.3f}  {d['phrase']:30s} {d['box']}")
        if not len(res):
            print(f"  no box above threshold {a.threshold}")
    if a.out:
        from .draw import draw_result

        try:
            draw_result(res, a.image).save(a.out)
        except OSError as e:
            raise ConfigError(f"--out {a.out}: cannot write the image ({e.strerror or e})") from None
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from .model import GLIP

    model = GLIP.from_pretrained(a.src, config=a.config, device=None)
    try:
        model.save_pretrained(a.out_dir, fp16=a.fp16)
    except OSError as e:
        raise ConfigError(f"{a.out_dir}: cannot write the converted model ({e.strerror or e})") from None
    print(f"wrote {a.out_dir}/model.safetensors and {a.out_dir}/config.json")
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

    from .bench import format_compare, format_result, fresh_peak_rss_mb, load_result, run_bench

    if a.threads:
        torch.set_num_threads(a.threads)
    ref = load_result(a.compare) if a.compare else None
    sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip()) if a.sizes else ()
    devices = [a.device] if a.device and a.device != "auto" else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if a.precision == "fp16" and any(not d.startswith("cuda") for d in devices):
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU (or --device cuda)")
    results = []
    for dev in devices:
        res = run_bench(a.preset, a.height, a.width, a.runs, dev, a.precision, sizes=sizes)
        if a.rss and dev == "cpu":
            peak = fresh_peak_rss_mb(a.preset, a.height, a.width, a.precision)
            res.meta["load_peak_rss_mb"], res.meta["peak_rss_mb"] = peak["load"], peak["predict"]
        results.append(res)
        if not a.json:
            print(format_result(res))
            if ref is not None:
                print(format_compare(res, ref))
    if a.json:
        out = [r.to_json() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
    return 0


def build_parser() -> Parser:
    p = Parser(prog="python -m glip", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("predict", help="ground a prompt in an image")
    s.add_argument("--model", default="toy-student", help="official .pth, our folder, preset or shipped name")
    s.add_argument("--config", default=None, help="preset / our JSON / official yaml (what tensors cannot tell)")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", required=True, help='caption or category list ("person . dog")')
    s.add_argument("--phrase", action="append", help="explicit phrase of the caption to ground (repeatable)")
    s.add_argument("--mode", default="auto", choices=["auto", "categories", "caption"])
    s.add_argument("--threshold", type=probability, default=0.5, help="keep boxes scoring above this (0..1)")
    s.add_argument("--nms-iou", type=iou, default=None, help="per-phrase NMS IoU (0..1], default from the config")
    s.add_argument("--candidate-threshold", type=float_range(0.0, 1.0, high_open=True), default=None,
                   help="ATSS candidate score before NMS (default from the config, officially 0.05)")
    s.add_argument("--max-dets", type=int_range(1, 1000), default=100)
    s.add_argument("--min-size", type=int_range(32, 4096), default=None, help="test-time shorter side (pixels)")
    s.add_argument("--max-size", type=int_range(32, 8192), default=None, help="test-time longer side cap (pixels)")
    s.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", type=image_output, default=None, help="write the annotated image here (.png, .jpg)")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("convert", help="official .pth → safetensors + config.json")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--fp16", action="store_true")
    s.add_argument("--config", default=None)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("parity", help="compare with an official reference fixture, stage by stage")
    s.add_argument("fixture", type=existing_dir, help="folder with model.pth, config.json, io.pt and image*.png")
    s.add_argument("--atol", type=nonnegative_float, default=1e-4)
    s.add_argument("--rtol", type=nonnegative_float, default=1e-3)
    s.add_argument("--threads", type=threads, default=None, help="CPU threads (default: torch's choice)")
    s.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--tf32", action="store_true", help="leave TF32 on (CUDA; expect mismatches at 1e-4)")
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("bench", help="time, FLOPs and compute floor of every stage and of the cached paths")
    s.add_argument("--preset", default="glip-t", choices=sorted(PRESETS))
    s.add_argument("--height", type=int_range(32, 8192), default=800)
    s.add_argument("--width", type=int_range(32, 8192), default=1333)
    s.add_argument("--runs", type=int_range(1, 1000), default=3)
    s.add_argument("--device", type=device, default=None, help="cpu or cuda[:N] (default: every device present)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's choice)")
    s.add_argument("--sizes", default="", help="also predict at these shorter sides, e.g. 480,640,800")
    s.add_argument("--rss", action="store_true", help="also measure the peak RSS of a fresh process that loads the model from a .pth and predicts")
    s.add_argument("--json", action="store_true", help="print the result as JSON (for --compare later)")
    s.add_argument("--compare", default=None, metavar="REF.json", help="print speed-ups against an earlier --json run")
    s.set_defaults(fn=cmd_bench)

    from .cli_data import add_commands as add_data_commands  # label, eval

    add_data_commands(sub)
    try:
        from .train.cli import add_commands  # train
        add_commands(sub)
    except ImportError:
        pass
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return run_command(a.fn, a)


if __name__ == "__main__":
    sys.exit(main())
