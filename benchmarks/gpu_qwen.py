"""Qwen-Image transformer step on one GPU (issue 17): the reduced-depth, real-width MMDiT
(`make tiny KIND=qwen-image-shaped`: 24 heads x 128 = 3072 wide, text width 3584, 64 packed channels,
RoPE axes 16/56/56; 2 blocks by default) timed side by side in ONE process on the same weights and inputs:

  torch eager  fp16 / bf16   diffusers' QwenImageTransformer2DModel.forward (complex RoPE, SDPA)
  torch.compile     bf16     the same module compiled (default mode; --compile-dtypes to change)
  ORT CUDA EP  fp16          toonark's export (real cos/sin RoPE inputs, attention as ORT's fused
                             com.microsoft MultiHeadAttention), ONNX Runtime's transformer optimizer
                             (LayerNorm, RMSNorm = SimplifiedLayerNormalization, FastGelu) then fp16, I/O
                             binding; the op counts are reported, so a fusion that did not apply shows.

Shapes: 1024x1024 images -> 128x128 latents -> 64x64 = 4096 image tokens, text 128 tokens, batch 2
(true CFG runs cond and uncond). Reported per variant: median step ms (CUDA events), the time of one
block alone, the non-block rest, the full-depth (60 block) extrapolation = rest + 60 x block, peak GPU
memory of the step, and the real model's weight memory (60 blocks) from the parameter count.

    . benchmarks/device_env.sh && python3 benchmarks/gpu_qwen.py --out "$OUT"      # H200, <= 3 min
    python benchmarks/gpu_qwen.py --tiny --out /tmp/qwen-tiny                    # CPU check, < 60 s

Needs on the GPU box: torch (CUDA), numpy, onnx, diffusers 0.39 (+ huggingface_hub, safetensors, regex;
carried in the wheel bundle), onnxruntime-gpu for the ORT variant (skipped with a note when only the CPU
onnxruntime is importable). No transformers: only the transformer is built.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

FULL_DEPTH = 60          # Qwen-Image's transformer blocks
TEXT_TOKENS = 128


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for qwen_gpu.json")
    parser.add_argument("--tiny", action="store_true", help="tiny transformer on the CPU (code-path check)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks built (default 2)")
    parser.add_argument("--image", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--text", type=int, default=TEXT_TOKENS, help="text tokens (default 128)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--dtypes", default="fp16,bf16", help="eager dtypes")
    parser.add_argument("--compile-dtypes", default="bf16", help="torch.compile dtypes ('' to skip)")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime variant")
    return parser.parse_args(argv)


def build_transformer(args):
    import torch
    from diffusers import QwenImageTransformer2DModel
    from toonark.export.qwen_pipelines import QWEN_CONFIGS
    config = dict(QWEN_CONFIGS["qwen-image" if args.tiny else "qwen-image-shaped"]["transformer"])
    config["num_layers"] = args.layers
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**config).eval().requires_grad_(False)


def dims_of(transformer):
    from toonark.specs import QwenImageDims
    c = transformer.config
    return QwenImageDims(text_length=4096, text_hidden=c.joint_attention_dim, latent_channels=c.in_channels // 4,
                         vae_scale=8, vae_scaling_factor=1.0, heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                         patch_size=c.patch_size, out_channels=c.out_channels, rope_axes=tuple(c.axes_dims_rope),
                         vocab_size=1)


def make_inputs(dims, image: int, text: int, batch: int = 2) -> dict[str, np.ndarray]:
    from toonark.family import FAMILIES
    family = FAMILIES["qwen-image"]
    rng = np.random.default_rng(0)
    tokens = (image // 16) ** 2
    img_rope, txt_rope = family.rope(dims, image, image, text)
    return {"hidden_states": rng.standard_normal((batch, tokens, dims.latent_channels * 4)).astype(np.float32),
            "timestep": np.array([0.7], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, text, dims.text_hidden)).astype(np.float32),
            "encoder_hidden_states_mask": np.ones((batch, text), np.int64),
            "img_rope": img_rope, "txt_rope": txt_rope}


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, reps: int, warmup: int = 2) -> list[float]:
        import torch
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
        return samples


def torch_variants(transformer, dims, feeds, args, device, timer) -> tuple[dict, dict]:
    import torch
    results, outputs = {}, {}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    wanted = [(d, False) for d in args.dtypes.split(",") if d] + \
             [(d, True) for d in args.compile_dtypes.split(",") if d and (device == "cuda" or args.tiny)]
    batch, tokens = feeds["hidden_states"].shape[:2]
    side = int(math.isqrt(tokens))
    for name, compiled in wanted:
        dtype = dtypes[name]
        label = f"torch.compile {name}" if compiled else f"torch eager {name}"
        try:
            # A fresh copy per variant: casting one module fp16 -> bf16 -> ... would compound the roundings.
            model = copy.deepcopy(transformer).to(device=device, dtype=dtype)
            t = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            hidden, text = t["hidden_states"].to(dtype), t["encoder_hidden_states"].to(dtype)
            kwargs = dict(hidden_states=hidden, encoder_hidden_states=text,
                          encoder_hidden_states_mask=None, timestep=t["timestep"].expand(batch).to(dtype),
                          img_shapes=[[(1, side, side)]] * batch, return_dict=False)
            forward = torch.compile(model) if compiled else model
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.no_grad():
                first = forward(**kwargs)[0]
            first_s = time.perf_counter() - started
            with torch.no_grad():
                samples = timer(lambda: forward(**kwargs), args.reps)
                block = per_block(model, hidden, text, t, batch, side, timer, args.reps, compiled)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
            step = statistics.median(samples)
            results[label] = summarise(step, block, args.layers, peak, first_s)
            outputs[label] = first.float().cpu().numpy()
            print(f"{label:24s} step {step:8.2f} ms  block {block:7.2f} ms  full depth {results[label]['full_depth_ms']:9.1f} ms"
                  f"  peak {peak if peak is None else round(peak, 2)} GiB", flush=True)
        except Exception as err:   # noqa: BLE001 - one variant failing must not lose the others
            results[label] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(f"{label}: {results[label]['error']}", flush=True)
        finally:
            model = forward = None
            if device == "cuda":
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()
    return results, outputs


def per_block(model, hidden, text, t, batch, side, timer, reps, compiled: bool = False) -> float:
    """One transformer block alone on the step's real inputs (after img_in / txt_in / embeddings);
    compiled on its own for the torch.compile row."""
    import torch
    h = model.img_in(hidden)
    e = model.txt_in(model.txt_norm(text))
    temb = model.time_text_embed(t["timestep"].expand(batch).to(h.dtype), h)
    rope = model.pos_embed([(1, side, side)], max_txt_seq_len=e.shape[1], device=h.device)
    block = model.transformer_blocks[0]
    if compiled:
        block = torch.compile(block)
    return statistics.median(timer(lambda: block(hidden_states=h, encoder_hidden_states=e,
                                                 encoder_hidden_states_mask=None, temb=temb,
                                                 image_rotary_emb=rope), reps))


def summarise(step_ms: float, block_ms: float, layers: int, peak_gib, first_s: float) -> dict:
    rest = max(step_ms - layers * block_ms, 0.0)
    return {"step_ms": round(step_ms, 3), "block_ms": round(block_ms, 3), "rest_ms": round(rest, 3),
            "full_depth_ms": round(rest + FULL_DEPTH * block_ms, 1), "peak_gib": None if peak_gib is None else
            round(peak_gib, 3), "first_call_s": round(first_s, 1)}


def ort_variant(transformer, dims, feeds, args, work: Path, device: str, timer_reps: int) -> tuple[dict, np.ndarray | None]:
    """Export (toonark's real-RoPE wrapper) -> ORT transformer optimizer -> fp16 -> timed with I/O binding."""
    import onnx
    import onnxruntime as ort
    import torch
    from toonark.export import qwen_export
    from toonark.specs import qwen_image_specs
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"error": f"{provider} not available (install onnxruntime-gpu)"}, None
    spec = qwen_image_specs(dims)["transformer"]
    raw = work / "raw" / "transformer" / "model.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    small = {"B": 1, "H": 64, "W": 64, "T": 8}
    # Attention exported as ORT's fused MultiHeadAttention (qwen_export.RealRopeAttnProcessor): ORT's optimizer
    # cannot pattern-match Qwen's attention; it fuses the LayerNorms, RMSNorms and Gelus below.
    qwen_export.export_onnx({"transformer": transformer, "vae": torch.nn.Module()}, dims,
                            {"transformer": spec}, work / "raw", ["transformer"], small, fused_attention=True)
    export_s = time.perf_counter() - started
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions("mmdit")
    started = time.perf_counter()
    optimized = optimize_model(str(raw), model_type="mmdit", num_heads=dims.heads, hidden_size=dims.heads * dims.head_dim,
                               opt_level=0, optimization_options=options, use_gpu=device == "cuda",
                               only_onnxruntime=False)
    fused_counts = {op: n for op, n in sorted(optimized.get_operator_statistics().items())
                    if op in ("MultiHeadAttention", "Attention", "LayerNormalization", "SkipLayerNormalization",
                              "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "Gelu",
                              "BiasGelu", "RotaryEmbedding", "MatMul", "Softmax")}
    if device == "cuda":   # as engines/fusions.py does for the UNet: fusions on fp32, then fp16 (float32 I/O)
        optimized.convert_float_to_float16(keep_io_types=True, op_block_list=[])
    fused = work / "fused" / "model.onnx"
    from toonark.export.graph import save_model
    optimized.topological_sort()
    save_model(optimized.model, fused)   # external data past 2 GB (the fp32 2-block model is ~2.9 GB)
    optimize_s = time.perf_counter() - started
    session = ort.InferenceSession(str(fused), providers=[provider])
    binding = session.io_binding()
    on_device = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda" if device == "cuda" else "cpu", 0)
                 for k, v in feeds.items()}
    for name, value in on_device.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(spec.output_names[0], "cuda" if device == "cuda" else "cpu")

    def run():
        session.run_with_iobinding(binding)
    for _ in range(2):
        run()
    samples = []
    for _ in range(timer_reps):
        t = time.perf_counter()
        run()
        binding.synchronize_outputs()
        samples.append((time.perf_counter() - t) * 1e3)
    output = binding.copy_outputs_to_cpu()[0]
    step = statistics.median(samples)
    result = {"step_ms": round(step, 3), "export_s": round(export_s, 1), "optimize_s": round(optimize_s, 1),
              "ops": fused_counts, "nodes": len(onnx.load(str(fused), load_external_data=False).graph.node),
              "note": "whole step only: a per-block ORT time needs a second export (not measured)"}
    print(f"{'ORT ' + ('CUDA fp16' if device == 'cuda' else 'CPU fp32'):24s} step {step:8.2f} ms  ops {fused_counts}",
          flush=True)
    return result, output


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:   # the CPU check; --tiny --compile-dtypes fp32 also runs torch.compile (needs a C++ compiler)
        args.image, args.text, args.reps = 64, 8, 3
        args.dtypes = "fp32"
        args.compile_dtypes = args.compile_dtypes if args.compile_dtypes in ("", "fp32") and \
            "--compile-dtypes" in (argv or sys.argv) else ""
    timer = Timer(device)
    transformer = build_transformer(args)
    dims = dims_of(transformer)
    feeds = make_inputs(dims, args.image, args.text)
    params = sum(p.numel() for p in transformer.parameters())
    block_params = sum(p.numel() for p in transformer.transformer_blocks[0].parameters())
    full_params = params + (FULL_DEPTH - args.layers) * block_params
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "layers": args.layers, "image": args.image, "image_tokens": feeds["hidden_states"].shape[1],
              "text_tokens": args.text, "batch": 2, "params": params, "block_params": block_params,
              "full_depth_params": full_params, "full_depth_weights_gib_16bit": round(full_params * 2 / 2 ** 30, 2),
              "variants": {}}
    print(f"{result['device']}: {args.layers} blocks, {result['image_tokens']} image + {args.text} text tokens, "
          f"batch 2; full-depth params {full_params / 1e9:.2f} B", flush=True)
    variants, outputs = torch_variants(transformer, dims, feeds, args, device, timer)
    result["variants"].update(variants)
    if not args.no_ort:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="qwen-ort-") as work:
            try:
                ort_result, ort_out = ort_variant(transformer, dims, feeds, args, Path(work), device, args.reps)
            except Exception as err:   # noqa: BLE001
                ort_result, ort_out = {"error": f"{type(err).__name__}: {err}"[:500]}, None
                print(f"ORT: {ort_result['error']}", flush=True)
        reference = next((o for k, o in outputs.items() if "eager" in k), None)
        if ort_out is not None and reference is not None:
            ort_result["rel_l2_vs_torch_eager"] = float(f"{np.linalg.norm(ort_out - reference) / np.linalg.norm(reference):.3g}")
        result["variants"]["ORT " + ("CUDA fp16" if device == "cuda" else "CPU fp32")] = ort_result
    eager = {k: v for k, v in outputs.items()}
    if len(eager) > 1:
        ref = next(iter(eager.values()))
        result["rel_l2_vs_first"] = {k: float(f"{np.linalg.norm(v - ref) / np.linalg.norm(ref):.3g}")
                                     for k, v in eager.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qwen_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["variants"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
