"""The whole path on this machine (`make demo`): a tiny random-weight pipeline (when MODEL is the
default and missing) -> ONNX export -> ORT CPU fp32 engines -> Triton model repository ->
tritonserver -> one image over HTTP -> out/demo.png -> server stopped. Prints each stage's time
and the served request's per-stage profile."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from toonark.scripts import _cli as cli
from toonark.serving.client import PROTOCOLS

DEFAULT_MODEL = Path("build/tiny-pipeline")


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"diffusers folder (default {DEFAULT_MODEL}, created when missing)")
    parser.add_argument("--out", type=Path, default=Path("build/tiny"), help="build folder")
    parser.add_argument("--image", type=Path, default=Path("out/demo.png"), help="image file to write")
    parser.add_argument("--prompt", default="a happy otter flying a kite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="default: the prompt policy's default preset")
    parser.add_argument("--size", type=int, help="width and height (default: the build's smallest size)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    return parser.parse_args(argv)


def _stage(label: str, started: float) -> float:
    now = time.perf_counter()
    print(f"  {label:<34}{now - started:7.1f} s", flush=True)
    return now


def run_demo(args) -> Path:
    from toonark.engines import build_engines
    from toonark.export.onnx_export import export_pipeline
    from toonark.specs import BuildInfo, ShapeLimits
    from toonark.serving.client import GenerateOptions, format_profile, generate
    from toonark.serving.repository import write_repo
    from toonark.serving.launcher import TritonServer

    t = time.perf_counter()
    print(f"toonark demo: {args.model} -> {args.out} -> {args.image}")
    if not args.model.exists():
        if args.model != DEFAULT_MODEL:
            raise FileNotFoundError(f"model folder {args.model} does not exist; pass a diffusers folder or leave "
                                    f"--model at its default to build the tiny one")
        from toonark.export.pipelines import build_pipeline
        build_pipeline(args.model, kind="tiny", seed=0)
        t = _stage(f"tiny pipeline -> {args.model}", t)
    export_pipeline(args.model, args.out, precisions=("fp32",), limits=ShapeLimits())
    t = _stage("export (ONNX fp32, parity checked)", t)
    build_engines(args.out, backend="ort-cpu", precision="fp32")
    t = _stage("engines (ort-cpu fp32)", t)
    repo = write_repo(args.out, backend="ort-cpu", precision="fp32", layout="python")
    t = _stage(f"model repository -> {repo}", t)
    size = args.size or BuildInfo.read(args.out).limits.min_image
    with TritonServer(repo, log_path=args.out / "tritonserver.log") as server:
        ready = server.wait_ready(300)
        t = _stage(f"tritonserver ready ({ready:.1f} s)", t)
        url = server.http_url if args.protocol == "http" else server.grpc_url
        result = generate(url, GenerateOptions(args.prompt, seed=args.seed, steps=args.steps, width=size,
                                               height=size), args.protocol, timings=True)
        t = _stage(f"{size}x{size}, {args.steps or 'preset'} steps over {args.protocol}", t)
    t = _stage("server stopped", t)
    args.image.parent.mkdir(parents=True, exist_ok=True)
    args.image.write_bytes(result.images[0])
    print(f"wrote {args.image} ({len(result.images[0])} bytes); served request profile:")
    print(format_profile(result))
    return args.image


def run(args: argparse.Namespace) -> None:
    run_demo(args)


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
