"""Write a random-weight diffusers text-to-image folder (`make tiny MODEL=dir`): the input of every
test and the demo, since no real weights can be downloaded here."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    from toonark.export.pipelines import pipeline_kinds
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--kind", choices=sorted(pipeline_kinds()), default="tiny",
                        help="tiny: seconds on CPU, for tests; sd15: SD-1.5 shapes (UNet 860 M), for benchmarks; "
                             "qwen-image: tiny Qwen-Image (MMDiT, flow matching); qwen-image-shaped: real widths, "
                             "2 blocks, for GPU timing")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    parser.add_argument("--loras", type=Path, help="also write random LoRA files for it here (storybook: diffusers/"
                        "PEFT, crayon: kohya, clay: PEFT with alpha metadata; export/loras.py)")
    parser.add_argument("--lora-rank", type=int, default=4, help="rank of the random LoRAs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from toonark.export.pipelines import pipeline_kinds
    folder = pipeline_kinds()[args.kind](args.out, kind=args.kind, seed=args.seed)
    print(f"wrote {args.kind} pipeline (seed {args.seed}) to {folder}")
    if args.loras is not None:
        from toonark.export.loras import write_random_loras
        written = write_random_loras(folder, args.loras, rank=args.lora_rank, seed=args.seed)
        print(f"wrote LoRAs {', '.join(written)} to {args.loras}")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
