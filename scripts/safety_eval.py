"""Evaluate the layered kid-safety filter on the labelled prompt set: per-category recall and
precision, harmless look-alikes refused (markdown table; --details lists every miss).
The targets (recall >= 99 %, <= 1 % harmless refused) are judged on the test part, and so are the floors
(evaluate.FLOORS: what the shipped filter measured on the test halves of fixed writing batches when it was
committed). Exit status: 0 targets met; 1 a floor fell (the filter got worse); 2 floors held, targets not met."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--split", choices=("dev", "test", "all"), default="test")
    parser.add_argument("--details", action="store_true", help="list missed unsafe and refused harmless prompts")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")
    parser.add_argument("--by-batch", action="store_true",
                        help="also print recall / harmless refused per writing batch (toonark/data/safety_batches.json)")
    parser.add_argument("--batch-file", type=Path, metavar="FILE",
                        help="a writing batch not merged yet (scripts/safety_add_batch.py's schema): its first, blind "
                             "run, both halves with perturbations; --split is ignored")
    parser.add_argument("--timing", action="store_true",
                        help="also time every prompt of the set: whole filter and classifier alone (ms)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toonark.prompt_safety import evalset, evaluate
    if args.batch_file:
        examples, split = evalset.batch_examples(evalset.read_batch(args.batch_file)), "all"
    else:
        examples, split = evalset.load(), args.split
    report = evaluate.evaluate_shipped(examples, split)      # two processes: ~2x on the 2-core machine
    if args.json:
        print(json.dumps(evaluate.totals(report)))
    else:
        print(evaluate.table(report))
        if args.details:
            print(evaluate.details(report))
    if args.by_batch:     # the merged set's batches: with --batch-file that is another read
        print(evaluate.batch_table(report if not args.batch_file else evaluate.evaluate_shipped(evalset.load(),
                                                                                                args.split)))
    if args.timing:
        print(timing(evalset.load()))
    if split != "test":
        return 0
    fell = []
    for floor in evaluate.FLOORS:     # from the readings above: no prompt read again
        part = floor.of(report)
        print(floor.line(part))
        if (shortfall := floor.shortfall(part)) is not None:
            fell.append(shortfall)
    if fell:      # cli.main prints it and exits 1
        raise evaluate.FloorFell(f"the filter reads worse than it did when committed, on {'; '.join(fell)}; "
                                 "--details lists what it misses and refuses")
    return 0 if report.meets_targets else 2


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


def timing(examples) -> str:
    """Per-prompt latency in this process (first call, which loads the rules and the ONNX session, apart)."""
    import statistics
    import time
    from toonark.prompt_safety.layered import filter_for
    from toonark.prompts import PromptPolicy, normalize
    start = time.perf_counter()
    flt = filter_for(PromptPolicy.load()._rules)
    flt.verdict("a happy otter")
    first = time.perf_counter() - start
    whole, alone = [], []
    for e in examples:
        start = time.perf_counter()
        flt.verdict(e.text)
        whole.append(time.perf_counter() - start)
        text = normalize(e.text)
        start = time.perf_counter()
        flt.classifier.scores([text])     # not score(): that one now remembers the text
        alone.append(time.perf_counter() - start)

    def row(name, xs):
        xs = sorted(xs)
        return (f"| {name} | {1000 * statistics.median(xs):.3f} | {1000 * xs[int(0.99 * (len(xs) - 1))]:.3f} | "
                f"{1000 * xs[-1]:.3f} |")
    return "\n".join([f"{len(examples)} prompts; first check (loads rules, word list, ONNX session): "
                      f"{1000 * first:.0f} ms", "", "| ms per prompt | median | p99 | max |", "|---|---|---|---|",
                      row("whole filter", whole), row("classifier alone", alone)])


if __name__ == "__main__":
    sys.exit(main())
