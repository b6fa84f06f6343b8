"""Merge files of new labelled base prompts into toonark/data/safety_prompts.json, each as a new writing
batch of toonark/data/safety_batches.json (prompts already in the set, case-insensitively, are skipped).
File schema: {"author": "...", "unsafe": {category: [prompt, ...]}, "harmless": {group: [prompt, ...]}}.
Run `make safety-model` afterwards: the classifier trains on the new dev half."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="JSON files of new base prompts")
    parser.add_argument("--written", default="committed before the filter ran on them",
                        help="how the batch was written (recorded in safety_batches.json); {style} stands for "
                             "each file's style, so one call merges many blind batches (in the order given)")
    parser.add_argument("--number", type=int, default=None,
                        help="the first file's batch number (the number it was written under; the next file takes "
                             "the next), when later batches are kept out to stay blind; default: after the highest")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from toonark.prompt_safety import evalset, evaluate
    numbers = [None] * len(args.files) if args.number is None else [args.number + i for i in range(len(args.files))]
    taken = sorted(set(numbers) & {b["batch"] for b in evaluate.batches()})
    if taken:    # checked for every file first: no file merged when a later one would be refused
        raise ValueError(f"batch {taken[0]} is in the set already; give --number a first number from which "
                         f"{len(numbers)} numbers are free")
    for path, number in zip(args.files, numbers):
        result = evalset.add_batch(evalset.read_batch(path), args.written, number=number)
        print(f"{path}: batch {result['batch']}, {result['added']} base prompts added, "
              f"{result['duplicates']} already in the set")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
