"""INT8 UNet calibration + quality gate: `make calibrate OUT=dir`.

Captures the UNet inputs of the real sampler on kids-animal calibration prompts, quantizes the
fp32 UNet ONNX to explicit QDQ INT8 (TensorRT placement), and scores it against the float UNet on
held-out evaluation prompts. Writes OUT/calibration/{int8/unet/model.onnx, report.json,
reference.png, compare.png}; exits 1 when the gate fails (the report is still written).
"""
from __future__ import annotations

import argparse
import logging
import sys

from toonark.calibration.capture import SERVED_GUIDANCE, SERVED_STEPS, CaptureConfig
from toonark.calibration.gate import DEFAULT_THRESHOLDS, GateConfig
from toonark.calibration.quantize import DEFAULT_KEEP_FLOAT, DEFAULT_OP_TYPES, KEEP_FLOAT_GROUPS, METHODS, QuantConfig
from toonark.scripts import _cli as cli


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__, raw=True)
    parser.prog = "calibrate.py"
    parser.add_argument("--out", required=True, help="build folder (OUT of make export)")
    sampling = parser.add_argument_group("sampling (capture and gate)")
    sampling.add_argument("--calib-prompts", type=int, default=CaptureConfig.prompts,
                          help="calibration prompts to capture (default %(default)s; 32-64 for real models)")
    sampling.add_argument("--eval-prompts", type=int, default=GateConfig.prompts,
                          help="evaluation prompts the gate scores (default %(default)s)")
    sampling.add_argument("--size", type=int,
                          help="image size in px (default: the build's smallest profile size, the cheapest it serves)")
    sampling.add_argument("--steps", type=int, default=SERVED_STEPS, help="sampler steps (default %(default)s, as served)")
    sampling.add_argument("--guidance", type=float, default=SERVED_GUIDANCE, help="CFG scale (default %(default)s)")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--method", choices=METHODS, default=QuantConfig.method, help="calibration (default %(default)s)")
    quant.add_argument("--percentile", type=float, default=QuantConfig.percentile,
                       help="percentile for --method percentile (default %(default)s)")
    quant.add_argument("--op-types", type=_csv, default=DEFAULT_OP_TYPES,
                       help=f"op types to quantize (default {','.join(DEFAULT_OP_TYPES)})")
    quant.add_argument("--keep-float", type=_csv, default=DEFAULT_KEEP_FLOAT,
                       help=f"layer groups kept in float, from {','.join(KEEP_FLOAT_GROUPS)} "
                            f"(default {','.join(DEFAULT_KEEP_FLOAT)}; '' keeps none)")
    quant.add_argument("--exclude-pattern", action="append", default=[], metavar="REGEX",
                       help="also keep nodes whose name matches REGEX in float (repeatable)")
    quant.add_argument("--output-quantization", action="store_true",
                       help="ORT's default placement (Q/DQ after ops too); not what TensorRT wants")
    quant.add_argument("--smooth-quant", action="store_true", help="SmoothQuant first (needs neural-compressor)")
    quant.add_argument("--smooth-quant-alpha", type=float, default=QuantConfig.smooth_quant_alpha)
    quant.add_argument("--preprocess", action="store_true", help="run onnxruntime quant_pre_process first")
    quant.add_argument("--chunk", type=int, default=QuantConfig.chunk,
                       help="shards per calibration pass: bounds memory (default %(default)s)")
    gate = parser.add_argument_group("quality gate")
    gate.add_argument("--reference", choices=("auto", "fp16", "fp32"), default=GateConfig.reference,
                      help="reference UNet (auto: fp16 when ORT CPU runs it, else fp32)")
    gate.add_argument("--min-psnr", type=float, default=DEFAULT_THRESHOLDS["psnr_db"],
                      help="lowest final-image PSNR in dB over the evaluation prompts (default %(default)s)")
    gate.add_argument("--min-latent-cosine", type=float, default=DEFAULT_THRESHOLDS["latent_cosine"],
                      help="lowest per-step latent cosine (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="recapture and requantize even when up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> None:
    """A failing gate raises GateFailed (a RuntimeError): `error: INT8 UNet failed the quality gate: ...`, exit 1."""
    from toonark.calibration.run import calibrate
    from toonark.engines.pipeline import load_pipeline
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # the stage's progress lines
    if args.size is None:
        from toonark.specs import BuildInfo
        args.size = BuildInfo.read(args.out).limits.min_image
    capture_config = CaptureConfig(prompts=args.calib_prompts, size=args.size, steps=args.steps,
                                   guidance=args.guidance)
    quant_config = QuantConfig(method=args.method, percentile=args.percentile, op_types=args.op_types,
                               keep_float=args.keep_float, exclude_patterns=tuple(args.exclude_pattern),
                               output_quantization=args.output_quantization, smooth_quant=args.smooth_quant,
                               smooth_quant_alpha=args.smooth_quant_alpha, preprocess=args.preprocess,
                               chunk=args.chunk)
    gate_config = GateConfig(prompts=args.eval_prompts, size=args.size, steps=args.steps,
                             guidance=args.guidance, reference=args.reference)
    report = calibrate(args.out, capture_config, quant_config, gate_config,
                       {"psnr_db": args.min_psnr, "latent_cosine": args.min_latent_cosine},
                       force=args.force, progress=not args.quiet, load_pipeline=load_pipeline)
    print(f"INT8 UNet passed the quality gate: {report['int8_onnx']}")


def main(argv=None) -> int:
    return cli.main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
