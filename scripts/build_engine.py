"""Build engines from the exported ONNX (`make engine OUT=dir BACKEND=... PRECISION=...`):
OUT/engines/<backend>-<precision>/<submodel>/ with the engine file and engine.json. Engines whose
engine.json still matches their source ONNX and settings are kept unless --force."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from toonark.layout import BACKENDS
from toonark.scripts import _cli as cli
from toonark.specs import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="build folder (made by `make export`)")
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--precision", choices=PRECISIONS, required=True,
                        help="int8 needs a passing `make calibrate` first")
    parser.add_argument("--submodel", action="append",
                        help="repeatable; default: the served submodels, plus vae_encoder when exported")
    parser.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads recorded as the load default (default 0: ORT's choice)")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device (ort-cuda, tensorrt)")
    cli.add_trt_options(parser)
    return parser.parse_args(argv)


def format_table(results: dict, engine_root: Path) -> str:
    rows = [("submodel", "file", "MiB", "build s", "status")]
    for name, metadata in results.items():
        rows.append((name, str(engine_root / name / metadata["engine_file"]),
                     f"{metadata['engine_bytes'] / 2**20:.1f}", f"{metadata['build_seconds']:.1f}",
                     metadata.get("status", "built")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> None:
    from toonark.engines.build import build_engines
    from toonark.layout import BuildLayout
    # The library logs progress ("unet: up to date ..."); a CLI shows it.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trt_options = cli.trt_options(args)
    results = build_engines(args.out, args.backend, args.precision, submodels=args.submodel, force=args.force,
                            threads=args.threads, device_id=args.device_id, trt_options=trt_options or None)
    print(format_table(results, BuildLayout(args.out).engine_dir(args.backend, args.precision)))


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
