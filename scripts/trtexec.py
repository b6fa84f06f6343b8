"""Print the trtexec / polygraphy command lines for a build folder (`make trtexec OUT=dir`): per
submodel and precision, a trtexec build with the engine profile, a trtexec benchmark of that plan
at the opt shapes, and a polygraphy TensorRT-vs-ONNX Runtime comparison. Nothing is run."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from toonark.specs import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="build folder (made by `make export`)")
    parser.add_argument("--precision", action="append", choices=PRECISIONS, help="repeatable; default: all")
    parser.add_argument("--submodel", action="append", help="repeatable; default: every exported submodel")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from toonark.engines.commands import build_dir_commands
    try:
        commands = build_dir_commands(args.out, precisions=tuple(args.precision or PRECISIONS),
                                      submodels=args.submodel)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not commands:
        print(f"error: no ONNX to build in {args.out} for those precisions/submodels; run `make export OUT={args.out}` "
              f"(and `make calibrate` for int8)", file=sys.stderr)
        return 1
    folders = sorted({str(Path(c.build[2].split("=", 1)[1]).parent) for c in commands})
    print(shlex.join(["mkdir", "-p", *folders]))
    for c in commands:
        print(f"\n# {c.submodel} {c.precision}: build, benchmark at opt, compare with ONNX Runtime")
        for argv_ in (c.build, c.benchmark, c.compare):
            print(shlex.join(argv_))
    return 0


if __name__ == "__main__":
    sys.exit(main())
