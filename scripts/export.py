"""Export a diffusers text-to-image folder to ONNX (`make export MODEL=dir OUT=dir`):
OUT/onnx/<precision>/<submodel>/model.onnx with a parity report in OUT/onnx/<precision>/export.json,
and OUT/pipeline/ (tokenizer, scheduler, toonark.json) for the later stages."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from toonark.scripts import _cli as cli
from toonark.specs import ShapeLimits

EXPORTABLE_PRECISIONS = ("fp32", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ShapeLimits()
    parser = cli.parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="diffusers folder (safetensors weights)")
    parser.add_argument("--out", type=Path, required=True, help="build folder")
    parser.add_argument("--precision", action="append", choices=EXPORTABLE_PRECISIONS,
                        help="repeatable; default: fp32 and fp16")
    shapes = parser.add_argument_group("shape limits", "min/opt/max request sizes the engines are built for; "
                                                       "parity is measured at opt and min")
    for field in ("batch", "image"):
        for level in ("min", "opt", "max"):
            name = f"{level}_{field}"
            shapes.add_argument(f"--{level}-{field}", dest=name, type=int, default=getattr(defaults, name),
                                help=f"default {getattr(defaults, name)}")
    shapes.add_argument("--image-step", type=int, default=defaults.image_step,
                        help=f"image sizes are multiples of this (default {defaults.image_step})")
    for level in ("min", "opt", "max"):   # families with a text-length axis (Qwen-Image); CLIP's is fixed
        shapes.add_argument(f"--{level}-text", dest=f"{level}_text", type=int, default=0,
                            help="text tokens after the template (Qwen-Image; default from the family: 1/64/512)")
    parser.add_argument("--force", action="store_true", help="re-export even when export.json says up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every cleanup pass")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # The export's status lines (up to date / parity table / wrote) always show; cleanup passes with -v.
    logging.getLogger("toonark.export.onnx_export").setLevel(logging.INFO)
    from toonark.export.onnx_export import export_pipeline
    limits = ShapeLimits(**{f"{level}_{field}": getattr(args, f"{level}_{field}")
                            for field in ("batch", "image") for level in ("min", "opt", "max")},
                         image_step=args.image_step,
                         **({f"{level}_text": getattr(args, f"{level}_text") for level in ("min", "opt", "max")}
                            if args.max_text else {}))
    export_pipeline(args.model, args.out, precisions=tuple(args.precision or EXPORTABLE_PRECISIONS),
                    limits=limits, force=args.force)


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
