"""Ask a running toonark server for an image over HTTP or gRPC:

    python scripts/generate.py --url 127.0.0.1:8000 --prompt "a happy robot" --out robot.png --timings

Options not given are not sent, so the server's defaults apply (see `make repo`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark.triton_model_repo.client import PROTOCOLS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT of the HTTP or gRPC endpoint")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", help="negative prompt (default: the server's kid-safe one)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int, help="default: the preset's")
    parser.add_argument("--preset", help="fast, standard or hq (default: the server's default preset)")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--format", choices=("png", "webp"), help="default: png, or the --out suffix")
    parser.add_argument("--out", type=Path, default=Path("out/image.png"), help="image file to write")
    parser.add_argument("--timings", action="store_true", help="print a per-stage profile (Triton statistics)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the image")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from toonark.triton_model_repo.client import GenerateOptions, ServerError, format_profile, generate
    fmt = args.format or ("webp" if args.out.suffix.lower() == ".webp" else None)
    options = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                              preset=args.preset,
                              guidance=args.guidance, width=args.width, height=args.height, format=fmt)
    try:
        result = generate(args.url, options, args.protocol, timings=args.timings, timeout_s=args.timeout)
    except (ServerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.images[0])
    print(f"wrote {args.out} ({len(result.images[0])} bytes) in {result.seconds:.2f} s over {args.protocol}")
    if args.timings:
        print(format_profile(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
