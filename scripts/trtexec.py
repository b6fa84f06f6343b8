"""Print the trtexec / polygraphy command lines for a build folder (`make trtexec OUT=dir`): per
submodel and precision, a trtexec build with the engine profile, a trtexec benchmark of that plan
at the opt shapes, and a polygraphy TensorRT-vs-ONNX Runtime comparison. Nothing is run."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from toonark.scripts import _cli as cli
from toonark.specs import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="build folder (made by `make export`)")
    parser.add_argument("--precision", action="append", choices=PRECISIONS, help="repeatable; default: all")
    parser.add_argument("--submodel", action="append", help="repeatable; default: every exported submodel")
    parser.add_argument("--refit", action="store_true", help="refittable plans (LoRA styles swap weights into them)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from toonark.engines.commands import build_dir_commands
    commands = build_dir_commands(args.out, precisions=tuple(args.precision or PRECISIONS), submodels=args.submodel,
                                  refit=args.refit)
    if not commands:
        raise FileNotFoundError(f"no ONNX to build in {args.out} for those precisions/submodels; run "
                                f"`make export OUT={args.out}` (and `make calibrate` for int8)")
    folders = sorted({str(Path(c.build[2].split("=", 1)[1]).parent) for c in commands})
    print(shlex.join(["mkdir", "-p", *folders]))
    for c in commands:
        print(f"\n# {c.submodel} {c.precision}: build, benchmark at opt, compare with ONNX Runtime")
        for argv_ in (c.build, c.benchmark, c.compare):
            print(shlex.join(argv_))


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
