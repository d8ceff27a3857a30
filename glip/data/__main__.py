"""python -m glip.data export SPLIT --seed S --n N --format FMT --out DIR

Writes a split of the synthetic world as real files through the generic writers (`glip.datasets`):
WebDataset shards, an image folder, a JSONL/CSV/TSV/Parquet manifest, COCO, ODVG, MDETR or YOLO, plus
`known_words.txt` / `novel_words.txt` (the world's vocabulary: what a gold-trained model knows, what
only web captions say). Prints the spec that reads the export back.

    python -m glip.data export web --seed 0 --n 8000 --format webdataset --out data/web --shard-size 1000
    python -m glip.data export test_det --seed 1 --n 200 --format coco --out data/test_det

    python -m glip.data judge runs/pseudo     # precision of web pseudo-labels against the hidden truth

Legacy form: python -m glip.data SPLIT N OUT_DIR [--seed S] writes the world's truth export (PNG + COCO
with attributes + ODVG, web's hidden boxes included) as before.
"""
import argparse
import json
import sys
from pathlib import Path

from .schema import KNOWN_WORDS, NOVEL_WORDS, SPLITS


def write_vocabulary(out_dir: Path) -> None:
    from glip.datasets.writers import atomic_write_text

    for name, words in (("known_words.txt", KNOWN_WORDS), ("novel_words.txt", NOVEL_WORDS)):
        atomic_write_text(out_dir / name, "".join(w + "\n" for w in sorted(words)))


def export(argv) -> int:
    from glip.datasets import FORMATS, write_dataset
    from glip.errors import GLIPError

    ap = argparse.ArgumentParser(prog="python -m glip.data export", description="export a split of the synthetic world")
    ap.add_argument("split", choices=SPLITS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    a = ap.parse_args(argv)
    try:
        res = write_dataset(f"world:{a.split}:{a.seed}:{a.n}", a.format, a.out, a.shard_size)
        write_vocabulary(Path(a.out))
    except GLIPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def judge(argv) -> int:
    from .formats import from_odvg
    from .judge import sweep

    ap = argparse.ArgumentParser(prog="python -m glip.data judge",
                                 description="precision of pseudo-labels of the web split against its hidden boxes")
    ap.add_argument("labels", help="an ODVG file or a `glip label` output folder")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    a = ap.parse_args(argv)
    print(json.dumps(sweep(from_odvg(a.labels), tuple(a.thresholds)), indent=1))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return export(argv[1:])
    if argv and argv[0] == "judge":
        return judge(argv[1:])
    from .formats import export_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", choices=SPLITS)
    ap.add_argument("n", type=int)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(export_split(a.split, a.n, a.seed, a.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
