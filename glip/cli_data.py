"""`python -m glip label` and `python -m glip eval`: real data in, labels and metrics out.

    python -m glip label --model glip_tiny_model_o365_goldg.pth --data "webdataset:cc3m/{00000..00331}.tar" --out labels/
    python -m glip eval --model glip_tiny_model_o365_goldg.pth --data coco:instances_val2017.json:val2017/

Every dataset argument is a spec (`glip.datasets.spec`, docs/real-data.md). User errors print one line.
"""
from __future__ import annotations

import json

from .cli_args import device, nonnegative_int, positive_int, probability, threads


def _threads(n) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_label(a) -> int:
    from glip.datasets import open_dataset
    from glip.datasets.writers import output_folder
    from glip.label import (
        LabelSettings,
        check_labelable,
        format_summary,
        label,
        parse_shard,
        resolve_score_words,
    )

    settings = LabelSettings(threshold=a.threshold, batch_size=a.batch_size,
                             max_per_phrase=a.max_per_phrase or None,
                             score_words=resolve_score_words(a.score_words, a.model), precision=a.precision).validate()
    shard = parse_shard(a.shard)
    with output_folder(a.out):        # an unwritable --out fails before the model is loaded
        ds = check_labelable(open_dataset(a.data))  # so do a bad spec, a missing file and data without captions
        if a.engine == "ray":               # the same labelling on a Ray cluster
            from glip.label_ray import label_from_args

            summary = label_from_args(a, ds, settings, shard)
            print(json.dumps(summary, indent=1) if a.json else format_summary(summary))
            return 0
        if a.address or a.actors is not None or a.gpus_per_actor or a.threads_per_actor is not None:
            from glip.errors import ConfigError

            raise ConfigError("--address, --actors, --gpus-per-actor and --threads-per-actor need --engine ray")
        _threads(a.threads)
        from glip.model import GLIP

        model = GLIP.from_pretrained(a.model, config=a.config, device=a.device)
        summary = label(model, ds, a.out, settings, shard=shard, resume=a.resume, records_per_shard=a.records_per_shard,
                        model_name=a.model, progress=not a.no_progress)
        print(json.dumps(summary, indent=1) if a.json else format_summary(summary))
        return 0


def cmd_eval(a) -> int:
    from glip.datasets import open_dataset
    from glip.evaluate import evaluate_dataset, format_table

    specs = a.data or [f"world:{s}:{a.seed}:{a.n}" for s in
                       (("test_det", "test_ground", "test_novel") if a.split == "all" else (a.split,))]
    datasets = [open_dataset(s) for s in specs]  # bad specs fail before the model is loaded
    _threads(a.threads)
    from glip.model import GLIP

    model = GLIP.from_pretrained(a.model, config=a.config, device=a.device)
    metrics = {}
    for ds in datasets:
        name = ds.spec.split(":")[1] if not a.data else ds.spec  # world shorthand: the split name
        metrics[name] = evaluate_dataset(model, ds, a.task, batch_size=a.batch_size, progress=not a.json,
                                         chunk_size=a.chunk_size, protocol=a.protocol, precision=a.precision)
    if a.json:
        print(json.dumps({"model": a.model, "metrics": metrics}, indent=1))
    else:
        print(format_table(metrics))
        for name, m in metrics.items():
            if m.get("per_category") and a.per_category:
                for cat, ap in m["per_category"].items():
                    print(f"  {name}  {cat:30s} {'-' if ap is None else f'{ap:.3f}'}")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("label", help="pseudo-label an image–caption corpus (ODVG shards + manifest, resumable)")
    s.add_argument("--model", required=True, help="official .pth, our folder, preset or shipped name")
    s.add_argument("--config", default=None, help="preset / our JSON / official yaml (what tensors cannot tell)")
    s.add_argument("--data", required=True, help="dataset spec, e.g. 'webdataset:shards/{00000..00127}.tar'")
    s.add_argument("--out", required=True, help="output folder (shards/, manifest.json, rejects.jsonl)")
    s.add_argument("--threshold", type=probability, default=0.5, help="keep boxes scoring above this (paper: 0.5)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="pairs per padded batch")
    s.add_argument("--max-per-phrase", type=nonnegative_int, default=0, help="boxes kept per phrase, best first (0 = all)")
    s.add_argument("--score-words", default="all",
                   help="which words of a phrase its score averages: all (the paper), content (all but articles), "
                        "known (the model's vocabulary.txt) or a vocabulary file (one word per line)")
    s.add_argument("--shard", default="0/1", help="I/N: label the input shards whose index is I mod N")
    s.add_argument("--resume", action="store_true", help="skip the shards the manifest lists as complete")
    s.add_argument("--records-per-shard", type=positive_int, default=1000,
                   help="shard size for inputs without shards of their own (a tar is one shard)")
    s.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu or cuda")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--threads", type=threads, default=None, help="CPU threads for torch")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--engine", default="local", choices=["local", "ray"], help="label here, or on a Ray cluster "
                   "(docs/scale-out.md)")
    s.add_argument("--address", default=None, help="ray: the cluster to join (auto, ray://head:10001, host:port); "
                   "default: $RAY_ADDRESS, else a new local Ray")
    s.add_argument("--actors", type=int, default=None, help="ray: labelling workers (default: as many as fit)")
    s.add_argument("--gpus-per-actor", type=float, default=0.0, help="ray: GPUs per worker (0.5: two share a GPU)")
    s.add_argument("--threads-per-actor", type=int, default=None,
                   help="ray: torch threads = CPUs reserved per worker (default: --threads, else see the docs)")
    s.set_defaults(fn=cmd_label)

    s = sub.add_parser("eval", help="COCO AP on detection data, Recall@k on grounding data")
    s.add_argument("--model", default="toy-student")
    s.add_argument("--config", default=None)
    s.add_argument("--data", action="append", default=None,
                   help="dataset spec (repeatable), e.g. coco:ann.json:images/ or mdetr:flickr_val.json:flickr/")
    s.add_argument("--task", default="auto", choices=["auto", "detection", "grounding"])
    s.add_argument("--chunk-size", type=positive_int, default=None,
                   help="categories per prompt (official LVIS: 40); default: as many as fit the query")
    s.add_argument("--protocol", default="any-box", choices=["any-box", "merged"],
                   help="grounding: a hit overlaps any ground-truth box of the phrase (GLIP, MDETR) or their union")
    s.add_argument("--split", default="all", choices=["test_det", "test_ground", "test_novel", "all"],
                   help="without --data: the synthetic world's test split(s)")
    s.add_argument("--seed", type=int, default=1, help="without --data: world seed of the test scenes")
    s.add_argument("--n", type=positive_int, default=200, help="without --data: scenes per split")
    s.add_argument("--batch-size", type=positive_int, default=8)
    s.add_argument("--device", type=device, default="auto")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--threads", type=threads, default=None)
    s.add_argument("--per-category", action="store_true", help="also print each category's AP")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)


__all__ = ["add_commands"]
