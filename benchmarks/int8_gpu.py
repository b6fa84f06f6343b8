"""INT8 (explicit QDQ) vs fp16 UNet on ONNX Runtime's CUDA EP: speed and error (issue 5, GPU numbers).

    python benchmarks/int8_gpu.py                          # SD-1.5-shaped UNet on CUDA (benchmarks/int8_gpu.sh)
    python benchmarks/int8_gpu.py --kind tiny --device cpu --image 64 --reps 3   # structure check (tests)

One process, one device, same weights, same inputs:
  1. the UNet of `make_modules(kind)` (random weights, same seed: torch.manual_seed(seed + 1)), built alone;
  2. fp32 ONNX with toonark.benchmarks.bench's export recipe (torch.onnx TorchScript exporter, opset 18, the spec's
     names and dynamic axes; optimum is not needed), weights in one model.onnx.data when big;
  3. fp16 ONNX: onnxruntime.transformers' float16 converter, keep_io_types (the `ort-unfused` graph of
     benchmarks/NOTES.md); optionally the fused fp16 graph (engines.fusions.fuse_for_cuda) if time is left;
  4. INT8 QDQ ONNX: toonark.calibration.quantize.quantize_unet (TensorRT-style placement, default
     keep-float layers), MinMax over `--calib` DPM-Solver-like inputs (x_t = alpha_t x0 + sigma_t eps at
     timesteps of the 20-step schedule, CFG batch 2, random text embeddings); calibration runs on the
     CUDA EP (quantize_unet's `calibration_providers`);
  5. one UNet CFG step (batch 2, latents H/8 x W/8, 77 x hidden text) per variant on the EP, I/O bound to
     device OrtValues, median of `--reps` after `--warmup`; device memory the session holds; relative L2 /
     cosine of the output vs the fp32 graph with TF32 off (exact fp32), on `--eval` held-out inputs.

Variants: fp32-ref (TF32 off, the reference), fp32 (CUDA EP defaults, TF32 on), fp16, int8-qdq (as is,
ORT_ENABLE_ALL), int8-qdq-folded (session.disable_quant_qdq=1: ORT folds the constant weight
DequantizeLinear into float weights; the activation Q/DQ pairs still run), fp16-fused (optional).
JSON goes to --results as <date>-<gpu>-int8.json after every variant; a short table is printed last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import resource
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("toonark.int8_gpu")

EXTERNAL_BYTES = 1 << 30            # weights past this go to one model.onnx.data (protobuf caps at 2 GiB)
FUSION_ESTIMATE_S = {"sd15": 230, "tiny": 30}   # fuse_for_cuda + session + timing (NOTES.md: 157 s fusion)


# ----------------------------------------------------------------------------- model and files

def build_unet(kind: str, seed: int = 0):
    """The UNet `toonark.benchmarks.bench.make_modules(kind, seed)` builds (same config, same seed), without the
    text encoder and VAE."""
    import torch
    from diffusers import UNet2DConditionModel

    from toonark.export.pipelines import CONFIGS
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**CONFIGS[kind]["unet"])
    return unet.eval().requires_grad_(False)


def unet_dims(kind: str, unet):
    from toonark.export.pipelines import CLIP_MAX_LENGTH, CONFIGS
    from toonark.specs import PipelineDims
    return PipelineDims(text_length=CLIP_MAX_LENGTH, text_hidden=int(unet.config.cross_attention_dim),
                        latent_channels=int(unet.config.in_channels),
                        vae_scale=2 ** (len(CONFIGS[kind]["vae"]["block_out_channels"]) - 1),
                        vae_scaling_factor=0.18215)


def onnx_bytes(path: Path) -> int:
    """model.onnx plus the external-data files beside it."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.iterdir()
                                     if p != path and p.suffix in (".data", ".onnx_data", ".bin"))


def save_onnx(model, path: Path) -> None:
    """Save with the weights in one model.onnx.data when they pass EXTERNAL_BYTES."""
    import onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size >= EXTERNAL_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _stamp(folder: Path) -> dict:
    file = folder / "made.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def export_fp32(unet, dims, work: Path, key: dict) -> tuple[Path, dict]:
    """fp32 UNet ONNX from toonark.export.torch_onnx.export_onnx (TorchScript exporter, opset 18, spec names and
    axes), then re-saved with one external data file (the TorchScript exporter writes one file per
    tensor past 2 GB; quantize_unet sizes a model by its *.data files)."""
    import shutil

    import onnx

    from toonark.export.torch_onnx import export_onnx
    dst = work / "fp32" / "model.onnx"
    if dst.is_file() and _stamp(dst.parent) == key:
        return dst, {"cached": True}
    raw = work / "fp32-export"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(dst.parent, ignore_errors=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarnings and the legacy exporter's DeprecationWarning
        exported = export_onnx({"unet": unet}, dims, raw, submodels=("unet",))["unet"]
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    save_onnx(onnx.load(str(exported), load_external_data=True), dst)
    shutil.rmtree(raw, ignore_errors=True)
    (dst.parent / "made.json").write_text(json.dumps(key))
    return dst, {"cached": False, "export_s": round(export_s, 1), "resave_s": round(time.perf_counter() - started, 1)}


def make_fp16(fp32: Path, work: Path, key: dict) -> tuple[Path, dict]:
    """Plain fp16 graph: onnxruntime.transformers OnnxModel.convert_float_to_float16(keep_io_types=True),
    as toonark.benchmarks.bench's `ort-unfused` (no fusions)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel
    dst = work / "fp16" / "model.onnx"
    if dst.is_file() and _stamp(dst.parent) == key:
        return dst, {"cached": True}
    started = time.perf_counter()
    model = OnnxModel(onnx.load(str(fp32), load_external_data=True))
    model.convert_float_to_float16(keep_io_types=True)
    save_onnx(model.model, dst)
    (dst.parent / "made.json").write_text(json.dumps(key))
    return dst, {"cached": False, "seconds": round(time.perf_counter() - started, 1)}


def make_fused(fp32: Path, work: Path, unet, key: dict) -> tuple[Path, dict]:
    from toonark.engines.fusions import fuse_for_cuda, heads_from_config
    dst = work / "fp16-fused" / "model.onnx"
    if dst.is_file() and _stamp(dst.parent) == key:
        return dst, {"cached": True}
    report = fuse_for_cuda(fp32, dst, "unet", num_heads=heads_from_config(dict(unet.config)), fp16=True)
    (dst.parent / "made.json").write_text(json.dumps(key))
    return dst, {"cached": False, "seconds": report.seconds, "fused": report.fused,
                 "nodes_before": report.nodes_before, "nodes_after": report.nodes_after}


# ----------------------------------------------------------------------------- inputs

def sampler_inputs(dims, image: int, count: int, seed: int, steps: int = 20, batch: int = 1) -> list[dict]:
    """`count` UNet feeds like a 20-step DPM-Solver++ run with CFG would give: timesteps spread over the
    schedule, x_t = alpha_t x0 + sigma_t eps (x0, eps ~ N(0, 1)) duplicated to the CFG batch, text =
    [a fixed "uncond" embedding, a random "cond" one] ~ N(0, 1)."""
    from toonark.benchmarks.bench import dpm_schedule
    schedule = dpm_schedule(steps)
    rng = np.random.default_rng(seed)
    lat = image // dims.vae_scale
    shape = (batch, dims.latent_channels, lat, lat)
    uncond = rng.standard_normal((batch, dims.text_length, dims.text_hidden)).astype(np.float32)
    picks = np.linspace(0, steps - 1, count).round().astype(int) if count > 1 else np.array([steps // 2])
    feeds = []
    for i in picks:
        x0, eps = rng.standard_normal(shape), rng.standard_normal(shape)
        x = (schedule.alpha_t[i] * x0 + schedule.sigma_t[i] * eps).astype(np.float32)
        cond = rng.standard_normal(uncond.shape).astype(np.float32)
        feeds.append({"sample": np.concatenate([x, x]),
                      "timestep": np.array([schedule.timesteps[i]], np.float32),
                      "encoder_hidden_states": np.concatenate([uncond, cond])})
    return feeds


def write_shards(feeds: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feed in enumerate(feeds):
        path = folder / f"set{i:03d}.npz"
        np.savez(path, **feed)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- quantization

def quantize(fp32: Path, shards: list[Path], work: Path, providers: list[str] | None, key: str) -> dict:
    from toonark.calibration.quantize import QuantConfig, quantize_unet
    config = QuantConfig(method="minmax", chunk=len(shards))
    started = time.perf_counter()
    result = quantize_unet(fp32, shards, work / "int8" / "model.onnx", config, capture_key=key,
                           calibration_providers=tuple(providers or ("CPUExecutionProvider",)))
    return {"path": str(result.path), "seconds": round(time.perf_counter() - started, 1),
            "quantize_unet_s": result.seconds, "cached": result.cached, "config": config.to_json(),
            "calibration_providers": providers or ["CPUExecutionProvider"], "calibration_sets": len(shards),
            "excluded": {k: len(v) for k, v in result.excluded.items()}, "summary": result.summary,
            "bytes": onnx_bytes(result.path)}


# ----------------------------------------------------------------------------- sessions

def make_session(path: Path, device: str, *, tf32: bool = True, disable_qdq: bool = False, threads: int = 0):
    """ORT session with toonark's CUDA EP options (engines.ort.cuda_provider_options: cuDNN EXHAUSTIVE,
    max workspace), graph optimizations ALL, EP assignment recorded."""
    import onnxruntime as ort

    from toonark.engines.ort import cuda_provider_options
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if disable_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if device == "cuda":
        options = cuda_provider_options(0)
        options["use_tf32"] = "1" if tf32 else "0"
        providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if session.get_providers()[0] != wanted:
        raise RuntimeError(f"{path}: ORT fell back to {session.get_providers()} (wanted {wanted})")
    return session


def placement(session) -> dict:
    """{EP: {"nodes": n, "ops": {op_type: count}}} of the session's partitioned graph (ORT >= 1.31)."""
    try:
        info = session.get_provider_graph_assignment_info()
    except Exception as err:  # noqa: BLE001 - older ORT: recorded, not fatal
        return {"error": f"{type(err).__name__}: {err}"[:200]}
    out: dict = {}
    for subgraph in info:
        ops = out.setdefault(subgraph.ep_name, Counter())
        ops.update(node.op_type for node in subgraph.get_nodes())
    return {ep: {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
            for ep, ops in out.items()}


class BoundUnet:
    """One session with its inputs and output bound to OrtValues on the device (I/O binding)."""

    def __init__(self, session, device: str, feed: dict):
        import onnxruntime as ort
        self.session, self.dev = session, ("cuda" if device == "cuda" else "cpu")
        self.binding = session.io_binding()
        self.inputs = {}
        for name, value in feed.items():
            self.inputs[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.dev, 0)
            self.binding.bind_ortvalue_input(name, self.inputs[name])
        out = session.get_outputs()[0].name
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(list(feed["sample"].shape), np.float32, self.dev, 0)
        self.binding.bind_ortvalue_output(out, self.output)

    def __call__(self):
        self.session.run_with_iobinding(self.binding)

    def run(self, feed: dict) -> np.ndarray:
        for name, value in feed.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        self()
        return np.array(self.output.numpy(), copy=True)


def errors(outputs: list[np.ndarray], references: list[np.ndarray]) -> dict:
    rel, cos, mx = [], [], []
    for out, ref in zip(outputs, references):
        a, b = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        mx.append(float(np.max(np.abs(a - b))))
    return {"rel_l2_mean": float(f"{np.mean(rel):.4g}"), "rel_l2_max": float(f"{np.max(rel):.4g}"),
            "cosine_min": round(min(cos), 6), "cosine_mean": round(float(np.mean(cos)), 6),
            "max_abs": float(f"{max(mx):.4g}"), "finite": bool(all(np.isfinite(o).all() for o in outputs)),
            "sets": len(outputs)}


def measure(name: str, path: Path, cfg, time_feed: dict, eval_feeds: list[dict], **session_kw) -> dict:
    from toonark.benchmarks.bench import DeviceMemory, time_ms
    mem = DeviceMemory(cfg.device)
    started = time.perf_counter()
    session = make_session(path, cfg.device, threads=cfg.threads, **session_kw)
    session_s = time.perf_counter() - started
    res = {"model": str(path), "session": {k: v for k, v in session_kw.items()}, "session_s": round(session_s, 1),
           "placement": placement(session)}
    bound = BoundUnet(session, cfg.device, time_feed)
    res["unet_step_b2"] = time_ms(bound, cfg.device, cfg.reps, cfg.warmup)
    res["_outputs"] = [bound.run(feed) for feed in eval_feeds]
    res["memory"] = mem.report()
    res["setup_s"] = round(time.perf_counter() - started, 1)
    del bound, session
    gc.collect()
    log.info("%s: %.3f ms (session %.1f s)", name, res["unet_step_b2"]["median_ms"], session_s)
    return res


# ----------------------------------------------------------------------------- report

VARIANT_ORDER = ("fp32-ref", "fp32", "fp16", "fp16-fused", "int8-qdq", "int8-qdq-folded")


def summarize(results: dict) -> None:
    """Errors vs fp32-ref and fp16, ratios vs fp16 (>1: slower than fp16)."""
    variants = results["variants"]
    ref = variants.get("fp32-ref", {}).get("_outputs")
    fp16 = variants.get("fp16", {}).get("_outputs")
    for name, res in variants.items():
        if "_outputs" not in res:
            continue
        if ref is not None:
            res["error_vs_fp32"] = errors(res["_outputs"], ref)
        if fp16 is not None and name != "fp16":
            res["error_vs_fp16"] = errors(res["_outputs"], fp16)
    ratios = {}
    for base in ("fp16", "fp16-fused", "fp32"):
        if "unet_step_b2" not in variants.get(base, {}):
            continue
        ms = variants[base]["unet_step_b2"]["median_ms"]
        ratios[f"time_vs_{base}"] = {name: round(res["unet_step_b2"]["median_ms"] / ms, 3)
                                     for name, res in variants.items() if "unet_step_b2" in res}
    results["ratios"] = ratios


def write(results: dict, results_dir: Path | None, tag: str) -> Path | None:
    if results_dir is None:
        return None
    from toonark.benchmarks.bench import write_results
    results["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results["total_s"] = round(time.perf_counter() - results["_started"], 1)
    results["host_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summarize(results)
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    clean["variants"] = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results["variants"].items()}
    path = write_results(clean, results_dir, tag)
    results["json_path"] = str(path)
    return path


def table(results: dict) -> str:
    variants = results["variants"]
    rows = [["variant", "ms (median)", "x fp16", "relL2 vs fp32", "cos vs fp32", "relL2 vs fp16", "mem MiB"]]
    for name in [n for n in VARIANT_ORDER if n in variants] + [n for n in variants if n not in VARIANT_ORDER]:
        res = variants[name]
        if "unet_step_b2" not in res:
            rows.append([name, res.get("error") or res.get("skipped", "")])
            continue
        e32, e16 = res.get("error_vs_fp32", {}), res.get("error_vs_fp16", {})
        ratio = results.get("ratios", {}).get("time_vs_fp16", {}).get(name)
        rows.append([name, f"{res['unet_step_b2']['median_ms']:.2f}", f"{ratio:.2f}" if ratio else "-",
                     f"{e32['rel_l2_mean']:.3g}" if e32 else "-", f"{e32['cosine_min']:.5f}" if e32 else "-",
                     f"{e16['rel_l2_mean']:.3g}" if e16 else "-",
                     str(res.get("memory", {}).get("device_used_delta_mib", "-"))])
    width = [max(len(r[i]) for r in rows if len(r) == len(rows[0])) for i in range(len(rows[0]))]
    s = results["settings"]
    lines = [f"{results.get('device', '?')} | UNet {s['kind']} ({results.get('unet', {}).get('params_m', '?')} M), "
             f"batch 2 CFG step, {s['image']}px, median of {s['reps']}; errors: mean over {s['eval']} held-out "
             f"inputs vs fp32 (TF32 off); cos = min"]
    for r in rows:
        lines.append("  ".join(c.ljust(width[i]) for i, c in enumerate(r)).rstrip() if len(r) == len(rows[0])
                     else f"{r[0].ljust(width[0])}  ({r[1][:100]})")
    q = results.get("quantize", {})
    if q.get("summary"):
        lines.append(f"int8: {q['summary'].get('quantized_nodes')} quantized nodes "
                     f"{q['summary'].get('quantized_by_type')}, Q/DQ {q['summary'].get('quantize_linear')}/"
                     f"{q['summary'].get('dequantize_linear')}, {q.get('bytes', 0) / 1e6:.0f} MB, quantize "
                     f"{q.get('seconds')} s, calibration on {q.get('calibration_providers', ['?'])[0]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--image", type=int, default=512, help="image size in pixels (latents are 1/8)")
    p.add_argument("--calib", type=int, default=8, help="calibration inputs (CFG batch 2 each)")
    p.add_argument("--eval", type=int, default=4, help="held-out inputs for the error figures")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's choice)")
    p.add_argument("--calib-provider", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--fused", choices=("auto", "yes", "no"), default="auto",
                   help="also time fuse_for_cuda's fp16 graph (auto: on CUDA, if the deadline leaves time)")
    p.add_argument("--skip", default="", help="comma list of variants not to run")
    p.add_argument("--deadline-s", type=float, default=540.0, help="optional steps are skipped past this")
    p.add_argument("--work", default=None)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--tag", default="int8")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def versions() -> dict:
    from toonark.benchmarks.bench import versions as bench_versions
    return bench_versions()


def main(argv=None) -> dict:
    logging.basicConfig(level=os.environ.get("TOONARK_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")
    cfg = parse_args(argv)
    started = time.perf_counter()
    if cfg.device == "cuda":
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    import torch
    if cfg.device == "cpu":
        torch.set_num_threads(max(cfg.threads, 1))
    from toonark.benchmarks.bench import device_name
    work = Path(cfg.work or f"build/int8-{cfg.kind}")
    results_dir = Path(cfg.results) if cfg.results else None
    skip = {s for s in cfg.skip.split(",") if s}
    results: dict = {"_started": started, "device": device_name(cfg.device), "settings": vars(cfg).copy(),
                     "versions": versions(), "timings": {}, "variants": {}}
    timings = results["timings"]

    def left() -> float:
        return cfg.deadline_s - (time.perf_counter() - started)

    t0 = time.perf_counter()
    unet = build_unet(cfg.kind, cfg.seed)
    dims = unet_dims(cfg.kind, unet)
    results["unet"] = {"params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
                       "config": f"export.pipelines.CONFIGS[{cfg.kind!r}]['unet'], torch.manual_seed({cfg.seed + 1})"}
    timings["build_s"] = round(time.perf_counter() - t0, 1)
    from toonark.export.torch_onnx import OPSET
    key = {"kind": cfg.kind, "seed": cfg.seed, "opset": OPSET}
    t0 = time.perf_counter()
    fp32, info = export_fp32(unet, dims, work, key)
    timings["export_s"] = round(time.perf_counter() - t0, 1)
    results["export"] = {**info, "tool": "torch.onnx.export TorchScript (dynamo=False), opset 18, toonark.benchmarks.bench "
                         "recipe (spec names/axes)", "bytes": onnx_bytes(fp32)}
    log.info("fp32 ONNX %s (%.2f GB) in %.1f s", fp32, onnx_bytes(fp32) / 1e9, timings["export_s"])

    # Everything the calibration sets depend on: also the quantize cache key (a run at --image 64 must not
    # hand its INT8 model to one at 512).
    calib_inputs = {"image": cfg.image, "sets": cfg.calib, "seed": 1, "steps": 20, "batch": 1,
                    "generator": "sampler_inputs: x_t = alpha_t x0 + sigma_t eps, N(0,1) text, DPM schedule"}
    calib = sampler_inputs(dims, calib_inputs["image"], calib_inputs["sets"], seed=calib_inputs["seed"],
                           steps=calib_inputs["steps"], batch=calib_inputs["batch"])
    held_out = sampler_inputs(dims, cfg.image, cfg.eval, seed=12345)
    time_feed = held_out[len(held_out) // 2]
    shards = write_shards(calib, work / "calib")
    results["inputs"] = {"calibration": {"sets": len(calib), "seed": 1,
                                         "timesteps": [float(f["timestep"][0]) for f in calib]},
                         "eval": {"sets": len(held_out), "seed": 12345,
                                  "timesteps": [float(f["timestep"][0]) for f in held_out]},
                         "timing_timestep": float(time_feed["timestep"][0]),
                         "shapes": {k: list(v.shape) for k, v in time_feed.items()}}

    def run_variant(name: str, path: Path, **kw) -> None:
        if name in skip:
            results["variants"][name] = {"skipped": "--skip"}
            return
        t = time.perf_counter()
        try:
            results["variants"][name] = measure(name, path, cfg, time_feed, held_out, **kw)
        except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            log.exception("variant %s failed", name)
            results["variants"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        results["variants"][name]["wall_s"] = round(time.perf_counter() - t, 1)
        write(results, results_dir, cfg.tag)

    run_variant("fp32-ref", fp32, tf32=False)
    if cfg.device == "cuda":
        run_variant("fp32", fp32, tf32=True)

    t0 = time.perf_counter()
    fp16, info = make_fp16(fp32, work, key)
    timings["fp16_convert_s"] = round(time.perf_counter() - t0, 1)
    results["fp16"] = {**info, "tool": "onnxruntime.transformers OnnxModel.convert_float_to_float16(keep_io_types=True)",
                       "bytes": onnx_bytes(fp16)}
    run_variant("fp16", fp16)

    on_cpu = cfg.calib_provider == "cpu" or cfg.device != "cuda"
    providers = None if on_cpu else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    t0 = time.perf_counter()
    try:
        quantize_key = json.dumps({**key, "calib": cfg.calib, "calib_inputs": calib_inputs}, sort_keys=True)
        results["quantize"] = quantize(fp32, shards, work, providers, key=quantize_key)
        int8 = Path(results["quantize"]["path"])
    except Exception as err:  # noqa: BLE001
        log.exception("quantize failed")
        results["quantize"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        int8 = None
    timings["quantize_s"] = round(time.perf_counter() - t0, 1)
    write(results, results_dir, cfg.tag)
    if int8 is not None:
        run_variant("int8-qdq", int8)
        run_variant("int8-qdq-folded", int8, disable_qdq=True)

    want_fused = cfg.fused == "yes" or (cfg.fused == "auto" and cfg.device == "cuda")
    if "fp16-fused" in skip or not want_fused:
        results["variants"]["fp16-fused"] = {"skipped": "not asked" if cfg.device == "cuda" else "CUDA only"}
    elif cfg.fused == "auto" and left() < FUSION_ESTIMATE_S[cfg.kind]:
        results["variants"]["fp16-fused"] = {"skipped": f"deadline: {left():.0f} s left, fusion needs "
                                                         f"~{FUSION_ESTIMATE_S[cfg.kind]} s"}
    else:
        t0 = time.perf_counter()
        try:
            fused, info = make_fused(fp32, work, unet, key)
            results["fused"] = info
            timings["fuse_s"] = round(time.perf_counter() - t0, 1)
            run_variant("fp16-fused", fused)
        except Exception as err:  # noqa: BLE001
            log.exception("fusion failed")
            results["variants"]["fp16-fused"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    write(results, results_dir, cfg.tag)
    if results_dir is None:
        summarize(results)
    print(table(results))
    if results.get("json_path"):
        print(f"JSON: {results['json_path']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
