"""Train the kid-safety prompt classifier from toonark/data/safety_prompts.json (dev part) and write
toonark/data/safety_classifier.onnx + its sidecar JSON (`make safety-model`). Needs the build-time
extra: pip install -e '.[safety-model]'."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from toonark.scripts import _cli as cli

DATA = Path(__file__).resolve().parents[1] / "toonark" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, default=DATA, help="folder for the .onnx and .json (default: toonark/data)")
    parser.add_argument("--data", type=Path, default=None, help="labelled prompts (default: the packaged file)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from toonark.prompt_safety.train import build
    except ModuleNotFoundError as err:
        raise RuntimeError(f"{err.name} is missing; install the build-time extra: pip install -e '.[safety-model]'") \
            from None
    sidecar = build(args.out, args.data)
    m = sidecar["metrics"]
    print(f"threshold {sidecar['threshold']:.2f}; dev (out of fold) {m['dev_out_of_fold_classifier_alone']}; "
          f"test {m['test_classifier_alone']}; onnx vs sklearn {m['onnx_vs_sklearn_max_abs_diff']}")
    print(f"sha256 {sidecar['onnx_sha256']}")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
