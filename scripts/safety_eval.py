"""Evaluate the layered kid-safety filter on the labelled prompt set: per-category recall and
precision, harmless look-alikes refused (markdown table; --details lists every miss).
The targets (recall >= 99 %, <= 1 % harmless refused) are judged on the test part."""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=("dev", "test", "all"), default="test")
    parser.add_argument("--details", action="store_true", help="list missed unsafe and refused harmless prompts")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from toonark.prompt_safety import evalset, evaluate
    from toonark.prompt_safety.layered import filter_for
    from toonark.prompts import PromptPolicy
    report = evaluate.evaluate(filter_for(PromptPolicy.load()._rules), evalset.load(), args.split)
    if args.json:
        print(json.dumps({"split": args.split, "unsafe": report.unsafe, "recall": round(report.recall, 4),
                          "harmless": report.harmless, "harmless_refused": round(report.false_refusal_rate, 4),
                          "by_layer": evaluate.by_layer(report), "meets_targets": report.meets_targets}))
    else:
        print(evaluate.table(report))
        if args.details:
            print(evaluate.details(report))
    return 0 if report.meets_targets or args.split != "test" else 2


if __name__ == "__main__":
    sys.exit(main())
