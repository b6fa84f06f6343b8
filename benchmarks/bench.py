"""Side-by-side speed of toonark's engines and what a user would run instead (diffusers in
PyTorch eager, torch.compile), in one process, on the same device, with the same weights.

    python scripts/bench.py --tiny            # CPU, seconds: structure check (tests, CI)
    python scripts/bench.py                   # SD-1.5 shapes, random weights, CUDA

Stages timed (medians over repeats, host clock after a device synchronize):
    text encoder batch 2, one UNet CFG step at batch 2, VAE decode batch 1,
    a whole DPM-Solver++ image (tokens in, uint8-ready float image on the host out),
    and images/s at larger batches; peak device memory per backend.

toonark's GPU path keeps every tensor on the device for the whole loop: ORT I/O binding to
OrtValues, the UNet (optionally a CUDA graph) writes its noise prediction into a fixed buffer,
and a small ONNX graph (`step_model`) does classifier-free guidance + the DPM-Solver++ update
on the device, writing the next UNet input in place. Per step the host only sends six float
coefficients and the timestep. No torch in that path.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toonark.export.torch_onnx import OPSET, export_onnx, make_modules, pipeline_dims  # noqa: F401
from toonark.files import atomic_dir, write_json
from toonark.timing import time_ms  # noqa: F401

log = logging.getLogger("toonark.benchmarks.bench")


# ----------------------------------------------------------------------------- settings

@dataclass
class BenchConfig:
    kind: str = "sd15"                 # "sd15" or "tiny" (build_pipeline CONFIGS)
    device: str = "cuda"               # "cuda" or "cpu"
    image: int = 512
    steps: int = 20
    guidance: float = 7.5
    reps: int = 15
    image_reps: int = 5
    warmup: int = 3
    batches: tuple[int, ...] = (2, 4)  # throughput batch sizes (images per request)
    backends: tuple[str, ...] = ("torch-eager", "torch-compile", "ort", "ort-graph", "ort-unfused")
    work: Path = Path("build/bench")
    seed: int = 0

    @property
    def torch_dtype_name(self) -> str:
        return "float16" if self.device == "cuda" else "float32"

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


# ----------------------------------------------------------------------------- timing

class DeviceMemory:
    """Device memory a backend holds: used-memory delta from before its models were loaded to the
    end of its runs (cudaMemGetInfo, so ORT's arena and torch's caching allocator count alike),
    plus torch's own peak allocation where torch is the backend."""

    def __init__(self, device: str):
        self.device = device
        self.base = self._used()
        if device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()

    def _used(self) -> int:
        if self.device != "cuda":
            return 0
        import torch
        free, total = torch.cuda.mem_get_info()
        return total - free

    def report(self, torch_backend: bool = False) -> dict:
        if self.device != "cuda":
            return {}
        import torch
        out = {"device_used_delta_mib": round((self._used() - self.base) / 2 ** 20, 1)}
        if torch_backend:
            out["torch_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        return out


# ----------------------------------------------------------------------------- models

def prepare_engines(fp32: dict[str, Path], work: Path, modules, device: str, variants: set[str]) -> dict:
    """Fused (and, for comparison, plain) fp16 graphs for CUDA; the fp32 export as is for CPU."""
    from toonark.engines.fusions import fuse_for_cuda, heads_from_config
    out: dict = {"fused": {}, "plain": {}, "reports": {}}
    if device != "cuda":
        out["fused"] = dict(fp32)
        return out
    heads = heads_from_config(dict(modules["unet"].config))
    for name, src in fp32.items():
        dst = work / "fused-fp16" / name / "model.onnx"
        if not dst.is_file():   # model and fusion.json land together, in one rename, or not at all
            with atomic_dir(dst.parent) as folder:
                report = fuse_for_cuda(src, folder / dst.name, name, num_heads=heads if name == "unet" else 0,
                                       fp16=True)
                write_json(folder / "fusion.json", report.to_json())
            out["reports"][name] = report.to_json()
        elif (dst.parent / "fusion.json").is_file():
            out["reports"][name] = json.loads((dst.parent / "fusion.json").read_text())
        out["fused"][name] = dst
    if "ort-unfused" in variants:
        from onnxruntime.transformers.onnx_model import OnnxModel
        import onnx
        dst = work / "plain-fp16" / "unet" / "model.onnx"
        if not dst.is_file():
            model = OnnxModel(onnx.load(str(fp32["unet"]), load_external_data=True))
            model.convert_float_to_float16(keep_io_types=True)
            with atomic_dir(dst.parent) as folder:
                model.save_model_to_file(str(folder / dst.name), use_external_data_format=False)
        out["plain"]["unet"] = dst
    return out


# ----------------------------------------------------------------------------- scheduler on device

# The device loop is the product's (toonark.engines.ort_loop, used by load_pipeline for ort-cuda);
# the bench times that same code.
from toonark.engines.ort_loop import DeviceLoop, onnx_io, step_coefficients, step_model  # noqa: E402,F401


def dpm_schedule(steps: int):
    from toonark.export.pipelines import SCHEDULER_CONFIG
    from toonark.scheduler import DPMSolverConfig, DPMSolverMultistep
    return DPMSolverMultistep(DPMSolverConfig.from_dict(SCHEDULER_CONFIG)).schedule(steps)


# ----------------------------------------------------------------------------- ORT engines

def ort_engines(paths: dict[str, Path], dims, device: str, cuda_graph: bool = False, sizes: dict | None = None,
                submodels=("text_encoder", "unet", "vae_decoder")) -> dict:
    """toonark.engines.ort.OrtEngine over the bench's ONNX files with the settings `make engine` records for
    ort-cuda fp16 (fused graph, ORT optimizers at load, CUDA EP options), CUDA graphs for UNet + VAE."""
    from toonark.engines.ort import OrtEngine, ort_build_settings
    from toonark.specs import submodel_specs
    specs = submodel_specs(dims)
    backend = "ort-cuda" if device == "cuda" else "ort-cpu"
    # small shared CPUs: one intra-op thread keeps the numbers stable (optimum-notes.md)
    settings = ort_build_settings(backend, threads=None if device == "cuda" else 1)
    settings["load_optimization_level"] = "all"
    engines = {}
    for name in submodels:
        graph = cuda_graph and name != "text_encoder"
        engines[name] = OrtEngine(paths[name], specs[name], {"settings": settings, "io": onnx_io(paths[name])},
                                  cuda_graph=graph, graph_sizes=sizes if graph else None, fallback=False)
    return engines


# ----------------------------------------------------------------------------- torch runner

class TorchRunner:
    """What a user runs: the diffusers modules (fp16 on CUDA) with diffusers' DPM-Solver++."""

    def __init__(self, modules, device: str, compile_mode: str | None = None):
        import torch
        self.torch = torch
        self.device = device
        self.dtype = torch.float16 if device == "cuda" else torch.float32
        self.text_encoder = modules["text_encoder"].to(device, self.dtype)
        self.unet_module = modules["unet"].to(device, self.dtype)
        self.vae_module = modules["vae"].to(device, self.dtype)
        self.unet_fn, self.decode_fn = self.unet_module, self.vae_module.decode
        if compile_mode:
            self.unet_fn = torch.compile(self.unet_module, mode=None if compile_mode == "default" else compile_mode)
            self.decode_fn = torch.compile(self.vae_module.decode,
                                           mode=None if compile_mode == "default" else compile_mode)

    def tensor(self, array, dtype=None):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype or self.dtype)

    def text(self, ids):
        with self.torch.inference_mode():
            return self.text_encoder(input_ids=ids, return_dict=False)[0]

    def unet(self, sample, t, text):
        with self.torch.inference_mode():
            return self.unet_fn(sample, t, text, return_dict=False)[0]

    def vae(self, latents):
        with self.torch.inference_mode():
            return self.decode_fn(latents, return_dict=False)[0]

    def image(self, ids: np.ndarray, latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        from diffusers import DPMSolverMultistepScheduler

        from toonark.export.pipelines import SCHEDULER_CONFIG
        torch = self.torch
        scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps, device=self.device)
        with torch.inference_mode():
            text = self.text(self.tensor(ids, torch.int64))
            x = self.tensor(latents)
            for t in scheduler.timesteps:
                noise = self.unet(torch.cat([x, x]), t, text)
                uncond, cond = noise.chunk(2)
                x = scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
            image = self.vae(x / self.vae_module.config.scaling_factor)
            return image.float().cpu().numpy()


# ----------------------------------------------------------------------------- the run

def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnx", "numpy", "diffusers", "transformers", "triton"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            out[name] = None
    try:
        import onnxruntime as ort
        out["ort_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def _inputs(dims, batch: int, image: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49407, size=(2 * batch, dims.text_length)).astype(np.int64)
    lat = image // dims.vae_scale
    latents = rng.standard_normal((batch, dims.latent_channels, lat, lat)).astype(np.float32)
    text = rng.standard_normal((2 * batch, dims.text_length, dims.text_hidden)).astype(np.float32)
    return ids, latents, text


def bench_torch(name, modules, dims, cfg: BenchConfig, compile_mode=None) -> dict:
    import torch
    mem = DeviceMemory(cfg.device)
    started = time.perf_counter()
    runner = TorchRunner(modules, cfg.device, compile_mode)
    ids, latents, text = _inputs(dims, 1, cfg.image, cfg.seed)
    t_ids = runner.tensor(ids, torch.int64)
    t_sample = runner.tensor(np.concatenate([latents, latents]))
    t_text = runner.tensor(text)
    t_lat = runner.tensor(latents)
    t_step = torch.tensor(500.0, device=cfg.device)
    res = {"backend": name, "stages": {}}
    res["stages"]["text_encoder_b2"] = time_ms(lambda: runner.text(t_ids), cfg.device, cfg.reps, cfg.warmup)
    res["stages"]["unet_step_b2"] = time_ms(lambda: runner.unet(t_sample, t_step, t_text), cfg.device, cfg.reps,
                                            cfg.warmup)
    res["stages"]["vae_decode_b1"] = time_ms(lambda: runner.vae(t_lat), cfg.device, max(cfg.reps // 2, 3),
                                             cfg.warmup)
    res["image"] = time_ms(lambda: runner.image(ids, latents, cfg.steps, cfg.guidance), cfg.device,
                           cfg.image_reps, 1)
    res["throughput"] = {}
    for batch in cfg.batches:
        b_ids, b_lat, _ = _inputs(dims, batch, cfg.image, cfg.seed + batch)
        t = time_ms(lambda: runner.image(b_ids, b_lat, cfg.steps, cfg.guidance), cfg.device,
                    max(cfg.image_reps // 2, 2), 1)
        res["throughput"][str(batch)] = {"images_per_s": round(batch / (t["median_ms"] / 1e3), 3), **t}
    res["throughput"]["1"] = {"images_per_s": round(1 / (res["image"]["median_ms"] / 1e3), 3)}
    res["memory"] = mem.report(torch_backend=True)
    res["setup_s"] = round(time.perf_counter() - started, 1)
    # Reference output for parity against the engines (same inputs): the first image.
    res["_image"] = runner.image(ids, latents, cfg.steps, cfg.guidance)
    res["_unet"] = runner.unet(t_sample, t_step, t_text).float().cpu().numpy()
    del runner
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_ort(name, paths, dims, cfg: BenchConfig, cuda_graph=False,
              unet_only=False) -> dict:
    mem = DeviceMemory(cfg.device)
    started = time.perf_counter()
    sizes = {"B": 1, "H": cfg.image, "W": cfg.image} if cuda_graph else None
    submodels = ("unet",) if unet_only else ("text_encoder", "unet", "vae_decoder")
    loop = DeviceLoop(ort_engines(paths, dims, cfg.device, cuda_graph, sizes, submodels), dims)
    ids, latents, text = _inputs(dims, 1, cfg.image, cfg.seed)
    buf = loop.buffers(1, cfg.image)
    buf["ids"].update_inplace(ids)
    buf["text"].update_inplace(text)
    buf["sample"].update_inplace(np.concatenate([latents, latents]))
    buf["timestep"].update_inplace(np.full(loop.timestep_shape, 500.0, np.float32))
    buf["x"][0].update_inplace(latents)
    buf["final"].update_inplace(latents / dims.vae_scaling_factor)
    res = {"backend": name, "stages": {}, "cuda_graph": cuda_graph, "session_s": round(time.perf_counter() - started, 1)}
    res["stages"]["unet_step_b2"] = time_ms(lambda: loop.unet(buf), cfg.device, cfg.reps, cfg.warmup)
    res["_unet"] = np.array(buf["noise"].numpy(), copy=True)
    if not unet_only:
        res["stages"]["text_encoder_b2"] = time_ms(lambda: loop.text(buf), cfg.device, cfg.reps, cfg.warmup)
        res["stages"]["vae_decode_b1"] = time_ms(lambda: loop.vae(buf), cfg.device, max(cfg.reps // 2, 3),
                                                 cfg.warmup)
        schedule = dpm_schedule(cfg.steps)
        res["image"] = time_ms(lambda: loop.image(ids, latents, schedule, cfg.guidance), cfg.device,
                               cfg.image_reps, 1)
        res["_image"] = loop.image(ids, latents, schedule, cfg.guidance)
        res["throughput"] = {"1": {"images_per_s": round(1 / (res["image"]["median_ms"] / 1e3), 3)}}
        if not cuda_graph:
            for batch in cfg.batches:
                b_ids, b_lat, _ = _inputs(dims, batch, cfg.image, cfg.seed + batch)
                t = time_ms(lambda: loop.image(b_ids, b_lat, schedule, cfg.guidance), cfg.device,
                            max(cfg.image_reps // 2, 2), 1)
                res["throughput"][str(batch)] = {"images_per_s": round(batch / (t["median_ms"] / 1e3), 3), **t}
    res["memory"] = mem.report()
    res["setup_s"] = round(time.perf_counter() - started, 1)
    del loop, buf
    gc.collect()
    return res


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(f"{np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12):.3g}")


def run(cfg: BenchConfig, results_dir: Path | None = None, tag: str | None = None,
        prepare_only: bool = False) -> dict:
    """The whole benchmark; returns the result dict (also written as JSON when results_dir is set)."""
    import torch
    if cfg.device == "cpu":
        torch.set_num_threads(1)   # small shared CPUs: pinned threads keep the numbers stable (optimum-notes.md)
    if cfg.device == "cuda":
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    started = time.perf_counter()
    work = Path(cfg.work)
    modules = make_modules(cfg.kind, cfg.seed)
    dims = pipeline_dims(modules)
    timings = {}
    t0 = time.perf_counter()
    fp32 = export_onnx(modules, dims, work / "onnx-fp32")
    timings["export_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    engines = prepare_engines(fp32, work, modules, cfg.device, set(cfg.backends))
    timings["fuse_s"] = round(time.perf_counter() - t0, 1)
    header = dict(device=device_name(cfg.device), settings=cfg.to_json(), versions=versions(), timings=timings,
                  fusion=engines.get("reports", {}),
                  targets={"unet_step_b2_ms": 12.0, "vae_decode_b1_ms": 12.0, "image_ms": 300.0})
    results: dict = {"backends": {}, **header}
    if prepare_only:
        results.update(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), ratios={})
        if results_dir is not None:
            results["json_path"] = str(write_results(results, results_dir, tag))
        return results
    reference = None
    for backend in cfg.backends:
        t0 = time.perf_counter()
        try:
            if backend == "torch-eager":
                res = bench_torch(backend, modules, dims, cfg)
            elif backend == "torch-compile":
                if cfg.device != "cuda":
                    results["backends"][backend] = {"backend": backend, "skipped": "torch.compile is timed on CUDA only"}
                    continue
                res = bench_torch(backend, modules, dims, cfg, compile_mode="default")
            elif backend == "ort":
                res = bench_ort(backend, engines["fused"], dims, cfg)
            elif backend == "ort-graph":
                if cfg.device != "cuda":
                    results["backends"][backend] = {"backend": backend, "skipped": "CUDA graphs need CUDA"}
                    continue
                res = bench_ort(backend, engines["fused"], dims, cfg, cuda_graph=True)
            elif backend == "ort-unfused":
                if "unet" not in engines["plain"]:
                    results["backends"][backend] = {"backend": backend, "skipped": "plain fp16 graph is CUDA only"}
                    continue
                res = bench_ort(backend, engines["plain"], dims, cfg, unet_only=True)
            else:
                raise ValueError(f"unknown backend {backend!r}")
        except Exception as err:  # noqa: BLE001 - one failing backend must not lose the others' numbers
            log.exception("backend %s failed", backend)
            results["backends"][backend] = {"backend": backend, "error": f"{type(err).__name__}: {err}"[:2000]}
            continue
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        if reference is None and backend == "torch-eager":
            reference = res
        elif reference is not None:
            parity = {}
            if "_unet" in res:
                parity["unet_rel_l2_vs_torch"] = _rel(res["_unet"], reference["_unet"])
            if "_image" in res:
                parity["image_rel_l2_vs_torch"] = _rel(res["_image"], reference["_image"])
            res["parity"] = parity
        results["backends"][backend] = res
        log.info("%s done in %.1f s", backend, time.perf_counter() - t0)
        if results_dir is not None:   # after every backend: a run cut short keeps what it measured
            _finish(results, started, results_dir, tag)
    results = _finish(results, started, results_dir, tag)
    for res in results["backends"].values():
        for key in [k for k in res if k.startswith("_")]:
            del res[key]
    return results


def _finish(results: dict, started: float, results_dir: Path | None, tag: str | None) -> dict:
    results.update(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   total_s=round(time.perf_counter() - started, 1))
    results["ratios"] = ratios(results)
    if results_dir is not None:
        clean = {**results, "backends": {name: {k: v for k, v in res.items() if not k.startswith("_")}
                                          for name, res in results["backends"].items()}}
        clean.pop("json_path", None)
        results["json_path"] = str(write_results(clean, results_dir, tag))
    return results


def ratios(results: dict) -> dict:
    """speedup of each backend vs torch eager and vs torch.compile, per stage (>1: faster)."""
    backends = results["backends"]
    out = {}
    for ref in ("torch-eager", "torch-compile"):
        base = backends.get(ref, {})
        if "stages" not in base:
            continue
        for name, res in backends.items():
            if "stages" not in res:
                continue
            row = {}
            for stage, t in res["stages"].items():
                if stage in base["stages"]:
                    row[stage] = round(base["stages"][stage]["median_ms"] / t["median_ms"], 3)
            if "image" in res and "image" in base:
                row["image"] = round(base["image"]["median_ms"] / res["image"]["median_ms"], 3)
            out.setdefault(f"vs_{ref}", {})[name] = row
    return out


def write_results(results: dict, results_dir: Path, tag: str | None = None) -> Path:
    gpu = "".join(c if c.isalnum() else "-" for c in results["device"]).strip("-").lower() or "device"
    date = results["date"][:10]
    path = Path(results_dir) / f"{date}-{gpu}{'-' + tag if tag else ''}.json"
    write_json(path, results)
    return path


STAGES = (("text_encoder_b2", "text enc b2"), ("unet_step_b2", "UNet step b2"), ("vae_decode_b1", "VAE dec b1"))


def table(results: dict) -> str:
    """Medians (ms) per stage and whole image, ratios vs torch eager / torch.compile, images/s."""
    backends = results["backends"]
    batches = sorted({b for r in backends.values() for b in r.get("throughput", {})}, key=int)
    head = ["backend"] + [label for _, label in STAGES] + ["image"] + [f"img/s b{b}" for b in batches] + \
        ["x eager (unet/img)", "x compile (unet/img)", "mem MiB"]
    rows = [head]
    for name, res in backends.items():
        if "stages" not in res:
            rows.append([name, res.get("skipped") or res.get("error", "")[:60]])
            continue
        row = [name]
        for stage, _ in STAGES:
            row.append(f"{res['stages'][stage]['median_ms']:.2f}" if stage in res["stages"] else "-")
        row.append(f"{res['image']['median_ms']:.1f}" if "image" in res else "-")
        for b in batches:
            t = res.get("throughput", {}).get(b)
            row.append(f"{t['images_per_s']:.2f}" if t else "-")
        for ref in ("torch-eager", "torch-compile"):
            r = results.get("ratios", {}).get(f"vs_{ref}", {}).get(name, {})
            row.append(f"{r.get('unet_step_b2', float('nan')):.2f}/{r.get('image', float('nan')):.2f}" if r else "-")
        row.append(str(res.get("memory", {}).get("device_used_delta_mib", "-")))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if len(r) == len(head)) for i in range(len(head))]
    lines = [f"{results.get('device', '?')} | {results['settings']['kind']} {results['settings']['image']}px, "
             f"{results['settings']['steps']} steps, times are medians in ms"]
    for r in rows:
        if len(r) == len(head):
            lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        else:
            lines.append(f"{r[0].ljust(widths[0])}  ({r[1]})")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny pipeline on the CPU (seconds; tests/CI)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--image", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (20; 4 with --tiny)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--image-reps", type=int, default=None)
    parser.add_argument("--batches", default=None, help="comma list of throughput batch sizes, e.g. 2,4")
    parser.add_argument("--backends", default=None, help="comma list: torch-eager,torch-compile,ort,ort-graph,ort-unfused")
    parser.add_argument("--work", default=None, help="scratch folder for the model exports")
    parser.add_argument("--results", default="benchmarks/results", help="folder for the JSON result")
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name")
    parser.add_argument("--prepare-only", action="store_true", help="export and fuse, time nothing")
    args = parser.parse_args(argv)
    if args.tiny:
        cfg = BenchConfig(kind="tiny", device=args.device or "cpu", image=args.image or 64, steps=args.steps or 4,
                          reps=args.reps or 5, image_reps=args.image_reps or 2, warmup=1, batches=(2,),
                          backends=("torch-eager", "torch-compile", "ort", "ort-graph", "ort-unfused"),
                          work=Path(args.work or "build/bench-tiny"))
    else:
        cfg = BenchConfig(device=args.device or "cuda", image=args.image or 512, steps=args.steps or 20,
                          reps=args.reps or 15, image_reps=args.image_reps or 5,
                          work=Path(args.work or "build/bench-sd15"))
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: the SD-1.5 benchmark runs on a GPU (benchmarks/gpu_run.sh); "
                         "use --tiny for the CPU structure check")
    if args.batches:
        cfg.batches = tuple(int(b) for b in args.batches.split(",") if b)
    if args.backends:
        cfg.backends = tuple(b for b in args.backends.split(",") if b)
    return cfg, args


def main(argv=None) -> dict:
    logging.basicConfig(level=os.environ.get("TOONARK_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")
    cfg, args = parse_args(argv)
    results = run(cfg, Path(args.results) if args.results else None, args.tag, args.prepare_only)
    print(table(results))
    if "json_path" in results:
        print(f"JSON: {results['json_path']}")
    return results
