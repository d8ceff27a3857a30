"""python -m glip.data SPLIT N OUT_DIR [--seed S]: write a split as PNG + COCO + ODVG."""
import argparse
import json

from .formats import export_split
from .schema import SPLITS


def main(argv=None):
    ap = argparse.ArgumentParser(description="export a split of the synthetic grounding world")
    ap.add_argument("split", choices=SPLITS)
    ap.add_argument("n", type=int)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(export_split(a.split, a.n, a.seed, a.out_dir)))


if __name__ == "__main__":
    main()
