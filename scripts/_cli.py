"""The one CLI pattern of scripts/: a typed argparse parser, a `run(args)` that does the work through the
library, and one error path.

    def parse_args(argv=None) -> argparse.Namespace:
        parser = cli.parser(__doc__)
        parser.add_argument("--out", type=Path, required=True)
        return parser.parse_args(argv)

    def run(args) -> int | None:        # None: success (exit 0)
        ...

    def main(argv=None) -> int:
        return cli.main(run, parse_args(argv))

The project's errors all say what is wrong and how to fix it (ValueError for bad input, FileNotFoundError for a
missing stage output, RuntimeError subclasses such as EngineError, GateFailed, ServerError; TimeoutError from the
server launcher), so a script prints `error: <message>` on stderr and exits 1, without a traceback. Anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

# What `main` turns into `error: ...` + exit 1 (subclasses included: PromptRefused, EngineError, GateFailed,
# ServerError, RequestError).
KNOWN_ERRORS = (ValueError, RuntimeError, FileNotFoundError, TimeoutError)


def parser(doc: str | None, *, raw: bool = False) -> argparse.ArgumentParser:
    """An argparse parser whose description is the script's docstring (raw: keep its line breaks, for usage
    examples)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)


def main(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Exit status of run(args): its int, 0 for None, 1 (after `error: <message>` on stderr) for a known error."""
    try:
        code = run(args)
    except KNOWN_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)


def add_trt_options(parser: argparse.ArgumentParser) -> None:
    """The TensorRT build options of `make engine` (scripts/build_engine.py) and `make trtexec` (scripts/trtexec.py):
    one set, so the printed trtexec / polygraphy lines describe the plan `make engine` builds with the same flags."""
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--workspace-mib", type=int, default=None, help="builder workspace cap (default 8192)")
    trt.add_argument("--optimization-level", type=int, default=None, help="builder optimization level 0-5")
    trt.add_argument("--refit", action="store_true", help="build refittable plans")
    trt.add_argument("--strongly-typed", action="store_true",
                     help="take layer precisions from the ONNX types (no FP16/INT8 flags)")


def trt_options(args: argparse.Namespace) -> dict:
    """add_trt_options' arguments as engines.tensorrt.trt_build_plan options (only those given)."""
    options: dict = {}
    if args.workspace_mib is not None:
        options["workspace_bytes"] = args.workspace_mib << 20
    if args.optimization_level is not None:
        options["optimization_level"] = args.optimization_level
    if args.refit:
        options["refit"] = True
    if args.strongly_typed:
        options["strongly_typed"] = True
    return options
