"""Tiled vs untiled inference on a GPU (issue 15): peak device memory and time of one UNet step (CFG, batch 1)
and one VAE decode, untiled and in Hann-blended tiles (toonark/tiling.py), at 1024^2 and 2048^2 with SD-1.5
shapes; the tiled-vs-untiled difference and the seam score at every size.

    # GPU (H200): engines from `python benchmarks/gpu_product.py build OUT` (SD-1.5 shapes, ort-cuda fp16)
    python benchmarks/gpu_tiles.py --build OUT --out $OUT/tiles
    # CPU check of the same code path (< 60 s): a tiny build (tests' limits: profile 64..256)
    python benchmarks/gpu_tiles.py --tiny --build build/tiny --out /tmp/tiles

Each (submodel, size, mode) runs in its own process, so ONNX Runtime's arena (it never shrinks) and cuDNN's
workspaces of one case do not count for the next: peak memory is the device-wide used memory (cudaMemGetInfo,
polled every 2 ms by a thread) minus the same before the engine was loaded. Untiled runs bypass the engine's
profile check (ONNX Runtime itself has no profile; TensorRT would need one built that large). cuDNN's
algorithm search is HEURISTIC here (the engines' EXHAUSTIVE search at 2048^2 untiled would take most of the
3-minute budget); the same setting for both modes. Writes tiles.json (and a table) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

LATENT_SEED, TEXT_SEED = 0, 1


class PeakMemory:
    """Device-wide used memory, polled; peak minus the value at start (MiB). CPU: RSS high-water mark."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0, False
        self.base = self._used()
        if cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _used(self) -> int:
        if self.cuda:
            import torch
            free, total = torch.cuda.mem_get_info()
            return total - free
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._used())
            time.sleep(0.002)

    def stop(self) -> float:
        self._stop = True
        if self.cuda:
            self._thread.join()
        self.peak = max(self.peak, self._used())
        return round((self.peak - self.base) / 2 ** 20, 1)


def smooth_latents(shape, seed: int) -> np.ndarray:
    """Low-frequency random latents (a 1/8-resolution field upsampled): decoded pictures have structure, so
    the seam score sees edges, not pixel noise."""
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    small = rng.standard_normal((b, c, max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
    ys = np.linspace(0, small.shape[2] - 1, h)
    xs = np.linspace(0, small.shape[3] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, small.shape[2] - 1), np.minimum(x0 + 1, small.shape[3] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = small[:, :, y0][:, :, :, x0] * (1 - fx) + small[:, :, y0][:, :, :, x1] * fx
    b_ = small[:, :, y1][:, :, :, x0] * (1 - fx) + small[:, :, y1][:, :, :, x1] * fx
    return (a * (1 - fy) + b_ * fy).astype(np.float32)


def worker(case: dict) -> dict:
    """One case in this process: load the engine, run warmup + reps, report time and peak memory."""
    from toonark import tiling
    from toonark.engines.backends import backend_for
    from toonark.engines.metadata import read_metadata
    from toonark.layout import BuildLayout
    from toonark.specs import SD, BuildInfo
    build, name, size, mode = Path(case["build"]), case["submodel"], case["size"], case["mode"]
    cuda = case["backend"] == "ort-cuda"
    if cuda:
        import torch
        torch.cuda.init()
    info = BuildInfo.read(build)
    metadata = read_metadata(build, case["backend"], case["precision"], name)
    if cuda and case.get("conv_search"):
        metadata["settings"]["providers"][0][1]["cudnn_conv_algo_search"] = case["conv_search"]
    metadata["profile"] = {}   # untiled sizes above the profile (ONNX Runtime itself has none)
    backend = backend_for(case["backend"])
    path = BuildLayout(build).engine_dir(case["backend"], case["precision"]) / name / backend.engine_file
    memory = PeakMemory(cuda)
    engine = backend.load(path, info.specs[name], metadata, threads=case.get("threads") or None)
    dims, limits = info.dims, info.limits
    lat = size // dims.vae_scale
    latents = smooth_latents((1, dims.latent_channels, lat, lat), LATENT_SEED)
    tile, overlap = case.get("tile"), case.get("overlap")
    plan = (tiling.TilePlan.cover(dims, size, size, *tiling.tile_parameters(limits, dims, tile, overlap))
            if mode == "tiled" else None)
    if name == "unet":
        text = np.random.default_rng(TEXT_SEED).standard_normal((2, dims.text_length, dims.text_hidden)).astype(np.float32)
        feeds = {SD.sample: np.concatenate([latents, latents]), SD.timestep: np.full((1,), 500, np.float32),
                 SD.encoder_hidden_states: text}
        call = lambda f: engine.run(f)[SD.noise_pred]   # noqa: E731
        run = tiling.TiledUnet(call, plan, 2 * limits.max_batch) if plan else call
        go = lambda: run(feeds)   # noqa: E731
    else:
        vae = (tiling.TiledVae(engine.run, "vae_decoder", limits, dims, tile, overlap, always=True) if plan
               else engine)
        go = lambda: vae.run({SD.latent_sample: latents / np.float32(dims.vae_scaling_factor)})[SD.image]  # noqa: E731
    result: dict = {"case": case}
    try:
        t0 = time.perf_counter()
        out = np.asarray(go())
        result["first_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        samples = []
        for _ in range(case["reps"]):
            t0 = time.perf_counter()
            out = np.asarray(go())
            samples.append((time.perf_counter() - t0) * 1e3)
        result.update(median_ms=round(statistics.median(samples), 2), samples_ms=[round(s, 2) for s in samples],
                      peak_mib=memory.stop(), grid=list(plan.grid) if plan else [1, 1],
                      tiles=plan.describe(dims.vae_scale) if plan else "untiled")
        if plan is not None and name == "unet":
            result["unet_calls"] = run.calls
        np.save(case["output"], out.astype(np.float32))
    except Exception as err:   # noqa: BLE001 - an out-of-memory untiled case is a result, not a crash
        result.update(error=f"{type(err).__name__}: {str(err)[:300]}", peak_mib=memory.stop())
    return result


def compare(untiled: Path, tiled: Path, case: dict) -> dict:
    from toonark import tiling
    from toonark.specs import BuildInfo
    a, b = np.load(untiled), np.load(tiled)
    diff = np.abs(a - b)
    out = {"max_abs_diff": float(f"{diff.max():.4g}"), "mean_abs_diff": float(f"{diff.mean():.4g}"),
           "ref_abs_mean": float(f"{np.abs(a).mean():.4g}")}
    if case["submodel"] == "vae_decoder":
        info = BuildInfo.read(case["build"])
        plan = tiling.TilePlan.cover(info.dims, case["size"], case["size"],
                                     *tiling.tile_parameters(info.limits, info.dims, case.get("tile"), case.get("overlap")))
        out["seam_ratio"] = round(tiling.seam_score(b, plan, info.dims.vae_scale)
                                  / tiling.seam_score(a, plan, info.dims.vae_scale), 4)
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'submodel':<12}{'size':>6} {'mode':<8}{'tiles':<38}{'ms':>10}{'peak MiB':>11}  diff max/mean, seam"]
    for row in rows:
        c = row["case"]
        ms = f"{row['median_ms']:.1f}" if "median_ms" in row else "-"
        extra = row.get("error", "")
        if "compare" in row:
            d = row["compare"]
            extra = f"{d['max_abs_diff']:.3g} / {d['mean_abs_diff']:.3g}" + (
                f", seam {d['seam_ratio']:.3f}" if "seam_ratio" in d else "")
        lines.append(f"{c['submodel']:<12}{c['size']:>6} {c['mode']:<8}{row.get('tiles', '-'):<38}{ms:>10}"
                     f"{row.get('peak_mib', 0):>11.0f}  {extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="build folder with engines (see above)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")) / "tiles")
    parser.add_argument("--tiny", action="store_true", help="CPU check: ort-cpu fp32, sizes 256 512, tile 128")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--tile", type=int, help="tile pixels (default: the profile's max image)")
    parser.add_argument("--overlap", type=int, help="overlap pixels (default: tile / 4)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--submodels", nargs="+", default=["unet", "vae_decoder"])
    parser.add_argument("--conv-search", default="HEURISTIC", help="cuDNN algorithm search (EXHAUSTIVE|HEURISTIC|DEFAULT)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds for all cases together")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    backend = args.backend or ("ort-cpu" if args.tiny else "ort-cuda")
    precision = args.precision or ("fp32" if args.tiny else "fp16")
    sizes = args.sizes or ([256, 512] if args.tiny else [1024, 2048])
    tile = args.tile or (128 if args.tiny else None)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiles-"))
    rows, deadline = [], time.monotonic() + args.timeout
    for name in args.submodels:
        for size in sizes:
            pair = {}
            for mode in ("untiled", "tiled"):
                case = {"build": str(args.build), "backend": backend, "precision": precision, "submodel": name,
                        "size": size, "mode": mode, "tile": tile, "overlap": args.overlap, "reps": args.reps,
                        "conv_search": args.conv_search, "threads": 1 if args.tiny else None,
                        "output": str(work / f"{name}-{size}-{mode}.npy")}
                left = deadline - time.monotonic()
                if left < 5:
                    rows.append({"case": case, "error": "skipped: out of the time budget"})
                    continue
                try:
                    proc = subprocess.run([sys.executable, __file__, "--build", str(args.build), "--worker",
                                           json.dumps(case)], capture_output=True, text=True, timeout=left)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                    row = json.loads(lines[-1]) if lines else {"case": case, "error": proc.stderr.strip()[-400:]}
                except subprocess.TimeoutExpired:
                    row = {"case": case, "error": "timed out"}
                rows.append(row)
                pair[mode] = row
                print(table([row]).splitlines()[-1], flush=True)
            if all(m in pair and "median_ms" in pair[m] for m in ("untiled", "tiled")):
                pair["tiled"]["compare"] = compare(Path(pair["untiled"]["case"]["output"]),
                                                   Path(pair["tiled"]["case"]["output"]), pair["tiled"]["case"])
    device = "cpu"
    if backend == "ort-cuda":
        import torch
        device = torch.cuda.get_device_name(0)
    result = {"device": device, "backend": backend, "precision": precision, "conv_search": args.conv_search,
              "build": str(args.build), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    (args.out / "tiles.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(f"wrote {args.out / 'tiles.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
