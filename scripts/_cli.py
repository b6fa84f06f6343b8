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
