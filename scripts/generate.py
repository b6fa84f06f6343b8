"""Ask a running toonark server for an image over HTTP or gRPC:

    python scripts/generate.py --url 127.0.0.1:8000 --prompt "a happy robot" --out robot.png --timings

Options not given are not sent, so the server's defaults apply (see `make repo`). A transient failure
(UNAVAILABLE, a connection error, a model process that died and is being reloaded) is retried with
back-off, bounded (serving/client.py RetryPolicy); --url may be repeated to fail over to another server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark import api
from toonark.scripts import _cli as cli
from toonark.serving.client import PROTOCOLS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    parser.add_argument("--url", action="append", help=f"HOST:PORT of the HTTP or gRPC endpoint (default "
                        f"{api.DEFAULT_HTTP_URL}); repeat it to fail over to other servers")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", help="negative prompt (default: the server's kid-safe one)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int, help="default: the preset's")
    parser.add_argument("--preset", help="fast, standard or hq (default: the server's default preset)")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--format", choices=api.IMAGE_FORMATS, help=f"default: {api.DEFAULT_FORMAT}, or the --out suffix (.webp, .npy = raw); raw writes the uint8 (H, W, 3) "
                        f"pixels of each image as a .npy file")
    parser.add_argument("--num-images", type=int, help="1..4 images of the prompt (seeds SEED, SEED+1, ...); "
                        "written as OUT, then OUT's name with -2, -3, ...")
    parser.add_argument("--quality", type=int, help=f"WebP quality {api.QUALITY_RANGE[0]}..{api.QUALITY_RANGE[1]} (server default "
                        f"{api.DEFAULT_QUALITY}); PNG ignores it")
    parser.add_argument("--lora", help="a LoRA style the server registered (`make repo LORAS=dir`); default: none")
    parser.add_argument("--lora-scale", type=float, help=f"LoRA strength 0..2 (default {api.DEFAULT_LORA_SCALE})")
    parser.add_argument("--image-in", type=Path, help="a PNG / WebP / JPEG picture to edit (image-to-image); without "
                        "--width/--height the result has its size (sizes above the profile are made in tiles)")
    parser.add_argument("--strength", type=float, help=f"0 < S <= 1, how much of --image-in is redrawn (server default "
                        f"{api.DEFAULT_STRENGTH}, with --mask-in {api.DEFAULT_INPAINT_STRENGTH})")
    parser.add_argument("--mask-in", type=Path, help="with --image-in: a mask of the picture's size, white = repaint, "
                        "black = keep (inpainting)")
    parser.add_argument("--out", type=Path, default=Path("out/image.png"), help="image file to write")
    parser.add_argument("--timings", action="store_true", help="print a per-stage profile (Triton statistics)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the image")
    parser.add_argument("--no-retry", action="store_true", help="fail at the first error (no client retry)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toonark.serving.client import DEFAULT_RETRY, GenerateOptions, format_profile, generate
    suffix_format = {".webp": "webp", ".npy": api.RAW_FORMAT}.get(args.out.suffix.lower())
    fmt = args.format or suffix_format
    if args.mask_in is not None and args.image_in is None:
        raise ValueError("--mask-in needs --image-in (the picture the mask belongs to)")
    pictures = {name: path.read_bytes() for name, path in (("image_in", args.image_in), ("mask_in", args.mask_in))
                if path is not None}
    options = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                              preset=args.preset,
                              guidance=args.guidance, width=args.width, height=args.height, format=fmt,
                              num_images=args.num_images, quality=args.quality, lora=args.lora,
                              lora_scale=args.lora_scale, strength=args.strength, **pictures)
    result = generate(args.url or [api.DEFAULT_HTTP_URL], options, args.protocol, timings=args.timings,
                      timeout_s=args.timeout, retry=None if args.no_retry else DEFAULT_RETRY)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = result.pixels is not None
    out = args.out.with_suffix(".npy") if raw else args.out
    for i, image in enumerate(result.images):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        if raw:   # FORMAT=raw: one image's uint8 (H, W, 3) pixels, written whole or not at all
            import numpy as np
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, result.pixels[i])
            tmp.replace(path)
            image = result.pixels[i].tobytes()
        else:
            path.write_bytes(image)
        flagged = " (flagged by the safety checker: blank)" if result.nsfw and result.nsfw[i] else ""
        print(f"wrote {path} ({len(image)} bytes){flagged}")
    print(f"{len(result.images)} image(s) in {result.seconds:.2f} s over {args.protocol}"
          + (f" (after {result.attempts} tries, from {result.url})" if result.attempts > 1 else ""))
    if args.timings:
        print(format_profile(result))
    return 0


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
