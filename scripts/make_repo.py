"""Generate the Triton model repository for a build (`make repo OUT=dir BACKEND= PRECISION= [UNET_LOOP= INSTANCES=]`):
OUT/triton_model_repo with the `toonark` ensemble (preprocess [prompt cache; text_encoder by BLS on a miss] ->
denoise [the UNet in process, or unet by BLS] -> vae_decoder -> postprocess), every config.pbtxt written from the export specs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark.layout import BACKENDS
from toonark.scripts import _cli as cli
from toonark.serving.repository import LAYOUTS, UNET_LOOPS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="build folder (engines built by `make engine`)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    parser.add_argument("--precision", default="fp32", help="engine precision: fp32, fp16 or int8")
    parser.add_argument("--layout", choices=LAYOUTS, default="python",
                        help="python: ONNX Runtime inside the Python backend (the pip server); onnxruntime_onnx / "
                             "tensorrt_plan: native backends of NGC tritonserver images")
    parser.add_argument("--repo", type=Path, help="where to write it (default OUT/triton_model_repo)")
    parser.add_argument("--loras", type=Path, help="folder of LoRA .safetensors styles to serve (LORA input)")
    parser.add_argument("--lora-cache-size", type=int, default=4, help="LoRA weight sets each engine keeps (LRU)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per engine (0: auto)")
    parser.add_argument("--unet-loop", choices=UNET_LOOPS, help="how denoise runs the UNet (default: in_process for "
                        "the python layout, bls_device for the native layouts on a GPU, bls for the native layouts on "
                        "the CPU, LoRAs on a GPU and Qwen-Image)")
    parser.add_argument("--denoise-instances", type=int, default=1, help="denoise instances (each its own UNet "
                        "session and CUDA graphs when in_process)")
    parser.add_argument("--instances", type=int, default=1,
                        help="instances (processes) of each Python model that runs one (python layout: engines too); "
                             "more than one makes a killed process cheaper where memory allows")
    parser.add_argument("--prompt-cache-mb", type=float, default=64.0,
                        help="prompt-embedding cache of each text_encoder instance (preprocess in the native "
                        "layouts), in MiB (0: off)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from toonark.serving.repository import write_repo
    repo = write_repo(args.out, backend=args.backend, precision=args.precision, layout=args.layout,
                      out=args.repo, intra_op_threads=args.threads, loras=args.loras,
                      lora_cache_size=args.lora_cache_size, unet_loop=args.unet_loop,
                      denoise_instances=args.denoise_instances,
                      prompt_cache_bytes=int(args.prompt_cache_mb * (1 << 20)), instances=args.instances)
    print(f"wrote {repo} ({args.layout} layout, {args.backend} {args.precision}); serve it with "
          f"`make serve OUT={args.out}`")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
