"""The product path on a GPU with SD-1.5-shaped random weights (benchmarks/triton_gpu.sh runs it):

    python benchmarks/gpu_product.py build OUT        # fp32 export -> `make engine BACKEND=ort-cuda PRECISION=fp16`
    python benchmarks/gpu_product.py pipeline OUT     # load_pipeline(OUT, "ort-cuda", "fp16"): timings
    python benchmarks/gpu_product.py repo OUT         # `make repo BACKEND=ort-cuda PRECISION=fp16` (python layout)

`build` writes a build folder as `make export` would lay it out (pipeline/ with tokenizer + scheduler from
PIPELINE_SRC (default build/tiny-pipeline, made by `make tiny`), toonark.json with the SD-1.5 dims, onnx/fp32/<submodel>/model.onnx from toonark.benchmarks.bench's exporter:
the GPU image has no optimum), then calls the library function behind `make engine`.
Results: JSON lines on stdout and $OUT/<phase>.json.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _out(name: str, data: dict) -> None:
    print(json.dumps({name: data}), flush=True)
    folder = Path(os.environ.get("OUT", "/tmp/out"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1))


def build(out: Path) -> None:
    from toonark.export.torch_onnx import export_onnx, make_modules, pipeline_dims
    from toonark.engines import build_engines
    from toonark.specs import BuildInfo, ShapeLimits
    from toonark.layout import BuildLayout
    started = time.perf_counter()
    layout = BuildLayout(out)
    src = Path(os.environ.get("PIPELINE_SRC", "build/tiny-pipeline"))   # `make tiny`
    if not layout.pipeline_info.is_file():
        layout.pipeline.mkdir(parents=True, exist_ok=True)
        for part in ("tokenizer", "scheduler"):
            shutil.copytree(src / part, layout.pipeline / part, dirs_exist_ok=True)
        shutil.copy(src / "model_index.json", layout.pipeline / "model_index.json")
    modules = make_modules("sd15", 0)
    dims = pipeline_dims(modules)
    BuildInfo(dims, ShapeLimits()).write(out)
    t0 = time.perf_counter()
    export_onnx(modules, dims, layout.onnx_dir("fp32"))
    export_s = time.perf_counter() - t0
    del modules
    t0 = time.perf_counter()
    results = build_engines(out, "ort-cuda", "fp16")
    _out("build", {"export_s": round(export_s, 1), "engine_s": round(time.perf_counter() - t0, 1),
                   "total_s": round(time.perf_counter() - started, 1),
                   "engines": {name: {"status": r["status"], "build_seconds": r.get("build_seconds"),
                                      "fusion": {k: r.get("fusion", {}).get(k) for k in
                                                 ("fused", "nodes_before", "nodes_after", "seconds")},
                                      "load_optimization_level": r["settings"]["load_optimization_level"],
                                      "source_onnx": r.get("source_onnx")}
                               for name, r in results.items()}})


def pipeline(out: Path, reps: int = 5) -> None:
    """In-process product numbers: device loop with CUDA graphs (what `from_build(..., "ort-cuda")` gives),
    device loop without graphs, and the host loop (numpy per step) for parity."""
    from toonark.engines.pipeline import load_pipeline
    prompt, seed = "a friendly cartoon cat reading a book", 1
    res: dict = {}
    images = {}
    variants = (("device_loop_cuda_graph", dict(cuda_graph=True, graph_sizes={"B": 1, "H": 512, "W": 512})),
                ("device_loop", {}), ("host_loop", dict(device_loop=False)))
    for name, options in variants:
        t0 = time.perf_counter()
        pipe = load_pipeline(out, "ort-cuda", "fp16", verify=False, **options)
        load_s = time.perf_counter() - t0
        for _ in range(2 if name == "host_loop" else 3):   # cuDNN EXHAUSTIVE search + graph capture
            pipe(prompt, seed=seed, steps=20, width=512, height=512)
        samples, last = [], None
        for _ in range(2 if name == "host_loop" else reps):
            t = time.perf_counter()
            last = pipe(prompt, seed=seed, steps=20, width=512, height=512)
            samples.append((time.perf_counter() - t) * 1e3)
        images[name] = last.decoded
        res[name] = {"median_ms": round(statistics.median(samples), 2), "samples_ms": [round(s, 2) for s in samples],
                     "load_s": round(load_s, 1),
                     "last_timings": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in last.timings.items()
                                      if k != "unet_ms"}}
        if "unet_ms" in last.timings:
            res[name]["unet_ms_median"] = round(statistics.median(last.timings["unet_ms"]), 2)
        del pipe
        import gc
        gc.collect()
        print(name, res[name], flush=True)
    ref = images["host_loop"].astype(np.float64)
    for name in images:
        diff = np.linalg.norm(images[name] - ref) / max(np.linalg.norm(ref), 1e-12)
        res[name]["rel_l2_vs_host_loop"] = float(f"{diff:.3g}")
    _out("pipeline", res)


def repo(out: Path) -> None:
    from toonark.serving.repository import write_repo
    path = write_repo(out, "ort-cuda", "fp16", layout="python", verify_engines=False)
    configs = {p.parent.name: p.read_text() for p in Path(out, "triton_model_repo").glob("*/config.pbtxt")}
    _out("repo", {"path": str(path), "unet_config": configs.get("unet", ""), "models": sorted(configs)})


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    phase, out = sys.argv[1], Path(sys.argv[2])
    {"build": build, "pipeline": pipeline, "repo": repo}[phase](out)
