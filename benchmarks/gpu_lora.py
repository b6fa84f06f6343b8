"""LoRA switching on a GPU (issue 14): switch time cold / cached on an SD-1.5-shaped UNet and text encoder,
in place vs session re-creation, CUDA graphs kept valid, and UNet / image time with vs without a LoRA.

    python benchmarks/gpu_lora.py --build OUT --out $OUT            # OUT: an SD-1.5 build with ort-cuda fp16
                                                                     # engines (benchmarks/gpu_product.py build OUT)
    python benchmarks/gpu_lora.py --tiny --out /tmp/lora-bench       # CPU check of the same path (< 60 s)

It writes random LoRAs for the build's own layers (export/loras.py, from the fp32 export's shapes: no diffusers
folder needed), builds toonark.engines.lora.LoraOrtEngine for each strategy and measures:
- map_s: finding where the fused engine keeps each adapted weight (packed QKV, NHWC, fp16), once per load;
- switch cold (weight set merged from the base) and cached (LRU hit), median of several, per strategy;
- inplace_effective: whether ONNX Runtime read the in-place buffers (else the engine falls back to re-creating);
- with CUDA graphs: the captured graph replays the new weights (output equals a fresh session's);
- unet_ms with and without a LoRA, and a 20-step host-loop image with and without.
Prints a table; writes lora.json to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def prepare_tiny(out: Path) -> Path:
    """A tiny build (pipeline folder + fp32 export + ort-cpu fp32 engines), as gpu_product.build lays it out."""
    import shutil
    from toonark.engines.build import build_engines
    from toonark.export.pipelines import build_pipeline
    from toonark.export.torch_onnx import export_onnx, make_modules, pipeline_dims
    from toonark.layout import BuildLayout
    from toonark.specs import BuildInfo, ShapeLimits
    layout = BuildLayout(out)
    if not (layout.engine_dir("ort-cpu", "fp32") / "unet" / "engine.json").is_file():
        src = build_pipeline(out / "tiny-pipeline", kind="tiny", seed=0)
        layout.pipeline.mkdir(parents=True, exist_ok=True)
        for part in ("tokenizer", "scheduler"):
            shutil.copytree(src / part, layout.pipeline / part, dirs_exist_ok=True)
        shutil.copy(src / "model_index.json", layout.pipeline / "model_index.json")
        modules = make_modules("tiny", 0)
        dims = pipeline_dims(modules)
        BuildInfo(dims, ShapeLimits(min_batch=1, opt_batch=1, max_batch=1, min_image=64, opt_image=128,
                                    max_image=128, image_step=64)).write(out)
        export_onnx(modules, dims, layout.onnx_dir("fp32"))
        build_engines(out, "ort-cpu", "fp32", submodels=["text_encoder", "unet", "vae_decoder"], threads=2)
    return out


def _feeds(spec, metadata, batch_latent):
    rng = np.random.default_rng(0)
    io = metadata["io"]["inputs"]
    feeds = {}
    for tensor in spec.inputs:
        dtype = np.dtype(io[tensor.name]["dtype"])
        shape = batch_latent[tensor.name]
        feeds[tensor.name] = (rng.integers(0, 1000, size=shape) if dtype.kind in "iu"
                              else rng.standard_normal(shape)).astype(dtype)
    return feeds


def measure(build: Path, backend: str, precision: str, size: int, reps: int, graph: bool) -> dict:
    from toonark.engines.lora import LoraOrtEngine, load_loras, lora_bases
    from toonark.export.loras import write_random_loras_for
    from toonark.specs import BuildInfo
    info = BuildInfo.read(build)
    result: dict = {"backend": backend, "precision": precision, "size": size}
    t = time.perf_counter()
    bases = lora_bases(build)
    result["base_s"] = round(time.perf_counter() - t, 2)
    lora_dir = build / "bench-loras"
    write_random_loras_for({s: b.shapes for s, b in bases.items()}, lora_dir, rank=8)
    loras = load_loras(lora_dir, bases)
    result["loras"] = {n: len(l) for n, l in loras.layers.items()}
    latent = size // info.dims.vae_scale
    shapes = {"unet": {"sample": (2, info.dims.latent_channels, latent, latent), "timestep": (1,),
                       "encoder_hidden_states": (2, info.dims.text_length, info.dims.text_hidden)},
              "text_encoder": {"input_ids": (2, info.dims.text_length)}}
    for sub in ("unet", "text_encoder"):
        folder = build / "engines" / f"{backend}-{precision}" / sub
        metadata = json.loads((folder / "engine.json").read_text())
        spec = info.specs[sub]
        feeds = _feeds(spec, metadata, shapes[sub])
        variants = [("inplace", {}), ("recreate", {})]
        if graph and sub == "unet":
            variants += [("inplace+cuda_graph", {"cuda_graph": True,
                                                 "graph_sizes": {"B": 1, "H": size, "W": size}})]
        rows = {}
        reference = {}
        for label, options in variants:
            strategy = label.split("+")[0]
            t = time.perf_counter()
            engine = LoraOrtEngine(folder / "model.onnx", spec, metadata, bases[sub], loras, cache_size=4,
                                   strategy=strategy, verify=True, **options)
            load_s = time.perf_counter() - t
            for _ in range(3):
                engine.run(feeds)            # warm-up (cuDNN search, graph capture)
            base_ms = []
            for _ in range(reps):
                t = time.perf_counter()
                engine.run(feeds)
                base_ms.append(time.perf_counter() - t)
            cold, cached, lora_ms = [], [], []
            names = loras.names
            # A re-created SD-1.5 session costs seconds (ORT optimisation, cuDNN search): fewer repetitions.
            for i in range(reps if strategy == "inplace" else min(reps, 2)):       # cold: a new scale is a new set; cached: the same (name, scale) again
                scale = 0.5 + 0.1 * i
                engine.select(names[i % len(names)], scale)
                cold.append(engine.stats.last_seconds)
                engine.select("", 1.0)
                engine.select(names[i % len(names)], scale)
                cached.append(engine.stats.last_seconds)
            engine.select("crayon", 0.8)
            out = engine.run(feeds)
            for _ in range(reps):
                t = time.perf_counter()
                engine.run(feeds)
                lora_ms.append(time.perf_counter() - t)
            reference[label] = next(iter(out.values()))
            rows[label] = {"load_s": round(load_s, 2), "map_s": round(engine.map.seconds, 2) if engine.map else 0,
                           "touched_initializers": len(engine.touched),
                           "forms": sorted({p.form for ps in engine.map.placements.values() for p in ps})
                           if engine.map else [],
                           "inplace_effective": engine.strategy == strategy if strategy == "inplace" else None,
                           "switch_cold_ms": _ms(statistics.median(cold)), "switch_cached_ms": _ms(statistics.median(cached)),
                           "run_base_ms": _ms(statistics.median(base_ms)), "run_lora_ms": _ms(statistics.median(lora_ms)),
                           "set_mb": round(sum(v.nbytes for v in engine.base_set.values()) / 2**20, 1)}
            print(sub, label, rows[label], flush=True)
            del engine
        ref = reference["recreate"].astype(np.float64)
        for label in rows:
            diff = np.abs(reference[label].astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12)
            rows[label]["max_rel_vs_recreate"] = float(f"{diff:.3g}")
        result[sub] = rows
    result["image"] = image_times(build, backend, precision, size, bases, loras)
    return result


def image_times(build, backend, precision, size, bases, loras, steps: int = 20) -> dict:
    """A 20-step host-loop image with the LoRA engines at base vs with a LoRA selected."""
    import json as _json
    from toonark.engines.lora import LoraOrtEngine
    from toonark.engines.pipeline import load_pipeline
    pipe = load_pipeline(build, backend, precision, device_loop=False, verify=False)
    for sub in ("text_encoder", "unet"):
        folder = build / "engines" / f"{backend}-{precision}" / sub
        metadata = _json.loads((folder / "engine.json").read_text())
        pipe.engines[sub] = LoraOrtEngine(folder / "model.onnx", pipe.engines[sub].spec, metadata, bases[sub], loras)
    out = {}
    for label, name in (("base", ""), ("lora", "storybook")):
        for sub in ("text_encoder", "unet"):
            pipe.engines[sub].select(name, 1.0)
        pipe("a happy otter", steps=2, width=size, height=size)   # warm-up
        samples = []
        for _ in range(3):
            t = time.perf_counter()
            pipe("a happy otter", seed=1, steps=steps, width=size, height=size)
            samples.append(time.perf_counter() - t)
        out[f"{label}_image_ms"] = _ms(statistics.median(samples))
    return out


def table(result: dict) -> str:
    lines = [f"{'submodel':<13}{'variant':<20}{'cold ms':>9}{'cached ms':>10}{'run base':>10}{'run lora':>10}"
             f"{'in place':>9}{'rel diff':>10}"]
    for sub in ("unet", "text_encoder"):
        for label, row in result[sub].items():
            lines.append(f"{sub:<13}{label:<20}{row['switch_cold_ms']:>9}{row['switch_cached_ms']:>10}"
                         f"{row['run_base_ms']:>10}{row['run_lora_ms']:>10}{str(row['inplace_effective']):>9}"
                         f"{row['max_rel_vs_recreate']:>10}")
    lines.append(f"image ({result['size']} px, 20 steps, host loop): base {result['image']['base_image_ms']} ms, "
                 f"with LoRA {result['image']['lora_image_ms']} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, help="SD-1.5 build folder with ort-cuda fp16 engines")
    parser.add_argument("--tiny", action="store_true", help="tiny build on the CPU EP (made in --out if needed)")
    parser.add_argument("--out", type=Path, required=True, help="folder for lora.json")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.tiny:
        build, backend, precision, size, graph = prepare_tiny(args.out / "tiny-build"), "ort-cpu", "fp32", 128, False
    elif args.build:
        build, backend, precision, size, graph = args.build, "ort-cuda", "fp16", 512, True
    else:
        parser.error("give --build OUT (GPU) or --tiny")
    result = measure(build, backend, precision, size, args.reps, graph)
    try:
        import onnxruntime
        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
