"""Generate the Triton model repository for a build folder: `write_repo(OUT)` -> OUT/triton_model_repo.

    toonark (ensemble)  PROMPT, NEGATIVE_PROMPT?, SEED?, STEPS?, GUIDANCE?, WIDTH?, HEIGHT?, FORMAT?, NUM_IMAGES?,
                        QUALITY? -> IMAGE [, NSFW when the build has a safety checker]
      preprocess    (python)  kid template + safety + CLIP tokenizer -> input_ids (2B, L), uncond first;
                              resolves the defaults of every optional input (the one place they live)
      text_encoder  (engine)  input_ids [, lora, lora_scale] -> last_hidden_state; python layout: an ensemble
                              step that answers from toonark's prompt-embedding cache (toonark.embedding_cache,
                              keyed by the token ids and the LoRA) and runs its engine on a miss. Native layouts
                              (another backend's model): preprocess owns the cache and calls it by BLS on a miss
      denoise       (python)  DPM-Solver++ 2M with classifier-free guidance over the UNet (UNET_LOOPS: in process,
                              the default of the python layout, owning the UNet and VAE encoder engines; or `unet`
                              by BLS each step); returns the VAE decoder's input (the model family's
                              latents_to_vae: the one place the scaling factor is applied)
      unet          (engine)  sample, timestep, encoder_hidden_states -> out_sample   (BLS only; not with in_process)
      vae_encoder   (engine)  sample -> latent_parameters (BLS only, IMAGE_IN; when its engine was built and the UNet
                              is not in process)
      vae_decoder   (engine)  latent_sample -> sample (python layout: tiled above the profile, toonark.tiling)
      safety_checker (python) only when OUT/safety_checker/ exists (export/safety_checker.py): CLIP safety
                              checker on the decoded images; flagged ones become white, NSFW flags them
      postprocess   (python)  sample (B, 3, H, W) in [-1, 1] -> one PNG / WebP per image (WebP at QUALITY)

Every Python model reports toonark_* Prometheus metrics (triton_model_repo/metrics.py).

Every config.pbtxt is written here: the ensemble I/O comes from toonark.api's ENSEMBLE_INPUTS /
ENSEMBLE_OUTPUTS (the served API, declared once), every submodel I/O block from the specs (toonark.specs). Triton 2.51 ensembles
accept `optional: true` inputs (checked on the bundled server) and hand "absent" on to the step that
declares the same input optional, so `preprocess` declares them optional and fills in the defaults.

Layouts (same generator):
  python            engines run in a Python-backend ONNX Runtime runner (onnx_runner/1/model.py copied
                    into each engine model); what the pip-bundled CPU server runs.
  onnxruntime_onnx  platform onnxruntime_onnx + 1/model.onnx (NGC tritonserver images).
  tensorrt_plan     platform tensorrt_plan + 1/model.plan, KIND_GPU (NGC images with the same TensorRT).

Scalars: Triton has no 0-d tensors, so the spec declares the UNet's `timestep` with shape [1] and
export gives the ONNX that input shape; the native onnxruntime_onnx / tensorrt_plan backends feed it as is.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from toonark import triton_model_repo
# The served API (ensemble I/O, resolved tensors, defaults) is declared in toonark/api.py; re-exported here
# for the generator's readers.
from toonark.api import (ENSEMBLE, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, NSFW_OUTPUT, RESOLVED,  # noqa: F401
                         DENOISE_INPUTS, LORA_RESOLVED, POSTPROCESS_INPUTS, Port, config_defaults)
from toonark.embedding_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from toonark.engines.backends import backend_for
from toonark.files import atomic_dir, write_json
from toonark.layout import BuildLayout
from toonark.specs import SERVED_SUBMODELS, BuildInfo, SubmodelSpec, TensorSpec

LAYOUTS = ("python", "onnxruntime_onnx", "tensorrt_plan")
# What made the repository (backend, precision, layout) and what its engines need from the server (the
# TensorRT version and GPU of tensorrt_plan plans): written by write_repo, checked by the launcher at start.
REPO_RECORD = "repo.json"
# How `denoise` runs the UNet (issue 12): in_process = it owns the UNet engine (python layout; ort-cuda: the
# device loop with CUDA graphs per bucket, no per-step hop), bls = one BLS call to `unet` per step with host
# tensors, bls_device = one BLS call per step with device tensors (DLPack) and the solver step on the device
# (the native layouts, where the UNet is another backend's model).
UNET_LOOPS = ("in_process", "bls", "bls_device")
# Batch sizes (images per request) that get a CUDA graph of their own at the opt image size (in_process on
# ort-cuda); other sizes run a dynamic-shape session.
GRAPH_BATCHES = (1, 2, 4)
# Request batching (in_process on ort-cuda): `denoise` itself is configured with max_batch_size > 0, and Triton's
# dynamic batcher hands it up to max(GRAPH_BATCHES) concurrent requests (same steps, guidance and size run in one
# device loop over the B=2/4 CUDA graphs). It stays an ensemble step: Triton 2.51's ensemble (max_batch_size 0)
# feeds a batching step by prepending a batch dimension of 1 to each tensor whose shape matches the step's
# declared dims, and strips it again from the step's outputs for the next (non-batching) step
# (core ensemble_scheduler.cc ReshapeTensorDims; checked on the bundled server), so no front model forwards
# requests by BLS (a BLS callee killed mid-call can abort tritonserver 2.51, issue 18). BATCH_DELAY_US is how long
# the batcher waits for company.
BATCH_DELAY_US = 3000


def engine_kind_of(backend: str) -> str:
    """KIND_GPU or KIND_CPU: where the backend's engines run."""
    return backend_for(backend, strict=False).triton_kind


def default_unet_loop(backend: str, layout: str, family=None, loras: bool = False) -> str:
    """python layout: in_process, denoise owns the UNet engine (CUDA: the device loop; ort-cpu: the host loop, where
    it measured within noise of the BLS hop, benchmarks/results/2026-12-02-cpu-served-loops.json, README "Speed"),
    so no model of the default repositories is a BLS callee (killing one mid-call can abort tritonserver 2.51,
    issue 18). Native layouts: bls_device on the GPU (the UNet belongs to the onnxruntime / tensorrt backend), bls
    on the CPU. bls for a family without the device loop (ModelFamily.device_loop: Qwen-Image's transformer and
    flow-matching sampler are served over BLS) and for LoRA styles on a GPU (they are switched in a runner on host
    tensors: the `unet` model's on BLS calls; on ort-cpu the one denoise owns)."""
    if family is not None and not family.device_loop:
        return "bls"
    gpu = engine_kind_of(backend) == "KIND_GPU"
    if layout == "python":
        return "bls" if loras and gpu else "in_process"
    return "bls_device" if gpu else "bls"


def graph_buckets(info: BuildInfo) -> str:
    """The cuda_graph_sizes parameter of an in_process denoise: one bucket per GRAPH_BATCHES size the build
    serves, at the opt image size."""
    size = info.limits.opt_image
    return ";".join(f"B={b},H={size},W={size}" for b in GRAPH_BATCHES if b <= info.limits.max_batch)


# The models that get the QueuePolicy (dynamic_batching { default_queue_policy }): see QueuePolicy for why
# only the ensemble's bottleneck. A BLS callee must never get one (500 ms stalls, issue 12; found by HBLS).
QUEUED_MODELS = ("denoise",)
# The model folders Triton loads (thin model.py files) live in the triton_model_repo package.
SOURCE_DIR = Path(triton_model_repo.__file__).resolve().parent


_TRITON_TYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
                 "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def triton_type(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _TRITON_TYPES:
        raise ValueError(f"no Triton type for numpy dtype {name!r}; extend _TRITON_TYPES in {__file__}")
    return _TRITON_TYPES[name]


def io_precision(precision: str) -> str:
    """Float dtype at the engine boundary: fp16 engines take and return fp16, int8/fp32 engines fp32."""
    return "fp16" if precision == "fp16" else "fp32"


def spec_port(tensor: TensorSpec, precision: str, name: str | None = None, dtype=None) -> Port:
    """A spec tensor as a Triton I/O entry, with the spec's dims (the UNet's timestep is (1,) in the spec:
    Triton has no 0-d tensors)."""
    dims = tuple(tensor.triton_dims())
    dtype = dtype or tensor.numpy_dtype(io_precision(precision))
    return Port(name or tensor.name, triton_type(dtype), dims)


def serving_defaults(info: BuildInfo) -> dict[str, str]:
    """Defaults of the optional ensemble inputs (toonark.api.config_defaults; strings: Triton config parameters
    are strings). Steps, the template and the negative prompt come from toonark.prompts' policy at serve time."""
    return config_defaults(info)


# --- config.pbtxt text ------------------------------------------------------------------------

def _quote(value: str) -> str:
    return json.dumps(str(value))  # pbtxt string literals accept JSON escapes for these characters


def _io_block(kind: str, ports) -> str:
    rows = []
    for port in ports:
        dims = ", ".join(str(d) for d in port.dims)
        extra = " optional: true" if port.optional else ""
        if port.reshape is not None:
            extra += f" reshape: {{ shape: [ {', '.join(str(d) for d in port.reshape)} ] }}"
        rows.append(f'  {{ name: {_quote(port.name)} data_type: TYPE_{port.triton_type} dims: [ {dims} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}\n"
                   for k, v in sorted(params.items()))


@dataclass(frozen=True)
class QueuePolicy:
    """Back-pressure of the ensemble, set on its bottleneck step (QUEUED_MODELS = denoise): at most
    `max_queue_size` requests wait for an instance; more are rejected at once (HTTP 503 / gRPC
    UNAVAILABLE "Exceeds maximum queue size"), and one that waited longer than `timeout_s` (0: no limit)
    is rejected with "Request timeout expired". Triton 2.51 accepts `dynamic_batching { default_queue_policy }`
    on max_batch_size 0 models (checked on the bundled server: nothing is batched, the queue limits apply);
    ensembles have no queue of their own, so the limit bites at the slowest step (denoise).

    Why only there (issue 12, root cause found by helper HBLS): a queue policy with a size or timeout turns
    off the dynamic batcher's payload prefetching (triton core `PriorityQueue::support_prefetching_`). Without
    it, `DynamicBatchScheduler::Enqueue` wakes the batcher thread only when an instance thread is already
    waiting for work; a request that arrives after the previous execution's completion callback but before
    the instance thread waits again wakes nobody, and the batcher sleeps its idle timeout, a fixed 500 ms.
    BLS callers hit that window all the time: denoise sends the next UNet step about 1 ms after the previous
    answer, so 1-8 of 20 UNet calls per request waited 500 ms (served 0.5-4.7 s for a 0.6 s image). The
    other models are bounded anyway: `unet` is only called by denoise (one call in flight per denoise
    instance); preprocess (text_encoder by BLS on a prompt-cache miss) passes requests on to denoise's queue in
    milliseconds;
    vae_decoder and postprocess get one request per finished denoise."""
    max_queue_size: int = 16
    timeout_s: float = 0.0

    def __post_init__(self):
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if not self.timeout_s >= 0:
            raise ValueError(f"queue timeout must be >= 0 seconds, got {self.timeout_s}")

    def config_text(self, batch_delay_us: int | None = None) -> str:
        """The dynamic_batching block; batch_delay_us: also the batching delay of a batching model (one block)."""
        delay = f"max_queue_delay_microseconds: {int(batch_delay_us)} " if batch_delay_us is not None else ""
        return (f"dynamic_batching {{ {delay}default_queue_policy {{ timeout_action: REJECT "
                f"default_timeout_microseconds: {int(round(self.timeout_s * 1e6))} "
                f"max_queue_size: {self.max_queue_size} }} }}\n")


def model_config(name: str, inputs, outputs, *, backend: str | None = None, platform: str | None = None,
                 kind: str = "KIND_CPU", count: int = 1, params: dict[str, str] | None = None,
                 default_model_filename: str | None = None,
                 max_batch_size: int = 0, batch_delay_us: int | None = None, queue: QueuePolicy | None = None) -> str:
    """max_batch_size > 0 with batch_delay_us: Triton's dynamic batcher hands the model up to that many requests
    per execute, waiting at most batch_delay_us for more. queue: the back-pressure limits (QueuePolicy: only on
    the ensemble's bottleneck). No response_cache option: Triton's response cache stores failures (issue 18;
    toonark's prompt cache is in text_encoder)."""
    head = f"name: {_quote(name)}\n"
    head += f"backend: {_quote(backend)}\n" if backend else f"platform: {_quote(platform)}\n"
    if default_model_filename:
        head += f"default_model_filename: {_quote(default_model_filename)}\n"
    head += f"max_batch_size: {max_batch_size}\n"
    text = head + _io_block("input", inputs) + _io_block("output", outputs)
    text += f"instance_group [ {{ kind: {kind} count: {count} }} ]\n"
    if queue is not None:
        text += queue.config_text(batch_delay_us)
    elif batch_delay_us is not None:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {int(batch_delay_us)} }}\n"
    return text + _parameters(params or {})


def ensemble_config(steps: list[tuple[str, dict[str, str], dict[str, str]]], outputs=ENSEMBLE_OUTPUTS) -> str:
    """steps: (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    text = (f"name: {_quote(ENSEMBLE)}\nplatform: \"ensemble\"\nmax_batch_size: 0\n"
            + _io_block("input", ENSEMBLE_INPUTS) + _io_block("output", outputs))
    rows = []
    for model, inputs, outputs in steps:
        maps = "".join(f" input_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in inputs.items())
        maps += "".join(f" output_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in outputs.items())
        rows.append(f"  {{ model_name: {_quote(model)} model_version: -1{maps} }}")
    return text + "ensemble_scheduling { step [\n" + ",\n".join(rows) + "\n] }\n"


def _engine_io(spec: SubmodelSpec, precision: str, metadata: dict | None):
    """Spec I/O with dtypes from engine.json when it records them (the engine's real boundary)."""
    io = (metadata or {}).get("io", {})

    def port(tensor: TensorSpec, side: str) -> Port:
        recorded = io.get(side, {}).get(tensor.name, {}).get("dtype")
        return spec_port(tensor, precision, dtype=np.dtype(recorded) if recorded else None)

    return [port(t, "inputs") for t in spec.inputs], [port(t, "outputs") for t in spec.outputs]


def repo_configs(info: BuildInfo, *, backend: str = "ort-cpu", precision: str = "fp32", layout: str = "python",
                 metadata: dict[str, dict] | None = None, intra_op_threads: int = 0,
                 queue: QueuePolicy | None = None, safety_checker: dict | None = None,
                 loras: list[str] | None = None, lora_cache_size: int = 4, vae_encoder: bool = False,
                 tile: int = 0, tile_overlap: int = -1, family=None,
                 unet_loop: str | None = None, denoise_instances: int = 1,
                 batch_requests: bool | None = None, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 instances: int | dict[str, int] | None = None) -> dict[str, str]:
    """{model name: config.pbtxt text} for every model of the repository (no files touched).
    queue: the back-pressure limits of the ensemble's bottleneck, QUEUED_MODELS (default QueuePolicy()).
    loras: registered LoRA names (write_repo(loras=dir)): preprocess resolves LORA / LORA_SCALE into `lora` /
    `lora_scale`, inputs of the text_encoder step (its prompt cache keys on them) and of denoise, which switches the
    UNet it owns (in_process, ort-cpu) or passes them on to unet (bls);
    lora_cache_size: weight sets each engine keeps (LRU).
    vae_encoder: serve the VAE encoder (IMAGE_IN; owned by an in_process denoise, otherwise called by denoise over
    BLS, like unet). tile / tile_overlap:
    the tiling of pictures above the profile in pixels (0 / -1: the profile's defaults, toonark.tiling).
    family: the build's model family (toonark.family; default Stable Diffusion): its served submodels are
    the three engine steps (Qwen-Image: text_encoder, transformer, vae_decoder), a family whose denoise
    reads the token ids too (`denoise_reads_ids`) gets input_ids routed to denoise, and editing / tiled
    sizes are served only for a family that has them (`edits_images`, `tiles_large_images`).
    unet_loop: UNET_LOOPS (default: default_unet_loop); in_process leaves out the `unet` model. in_process and
    bls_device run SD's step graph: refused for a family without `device_loop` and with LoRA styles.
    denoise_instances: instances of denoise (each its own UNet session and CUDA graphs when in_process).
    batch_requests: in_process only (default: on for CUDA backends): concurrent requests share one device loop
    (denoise gets max_batch_size > 0: Triton's dynamic batcher; still an ensemble step, no BLS front).
    prompt_cache_bytes: bound of the prompt-embedding cache of each text_encoder instance (preprocess in the native
    layouts; 0: off).
    instances: instances (processes) of every Python model that has one (an int), or {model: count}
    (with_instances)."""
    if loras and layout != "python":
        raise ValueError(f"LoRA styles are switched inside toonark's Python-backend runners; use --layout python, "
                         f"not {layout!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    unet_loop = unet_loop or default_unet_loop(backend, layout, family, bool(loras))
    if unet_loop not in UNET_LOOPS:
        raise ValueError(f"unknown unet_loop {unet_loop!r}; choose one of {', '.join(UNET_LOOPS)}")
    if unet_loop != "bls" and family is not None and not family.device_loop:
        raise ValueError(f"unet_loop {unet_loop} runs Stable Diffusion's solver step graph; the {family.name} family's "
                         f"denoise calls its {family.denoiser_submodel} by BLS: use unet_loop bls")
    lora_host_loop = unet_loop == "bls" or (unet_loop == "in_process" and engine_kind_of(backend) == "KIND_CPU")
    if loras and not lora_host_loop:
        raise ValueError(f"LoRA styles are switched in the UNet's runner on host tensors (the unet model's on each BLS "
                         f"call, or denoise's own on ort-cpu); unet_loop {unet_loop} on {backend} bypasses it: use "
                         f"unet_loop bls (the default with LoRAs on a GPU)")
    if unet_loop == "in_process" and layout != "python":
        raise ValueError(f"unet_loop in_process runs the UNet engine inside denoise (ONNX Runtime, python layout); "
                         f"layout {layout} serves it with another backend: use bls_device or bls")
    if denoise_instances < 1:
        raise ValueError(f"denoise_instances must be >= 1, got {denoise_instances}")
    if batch_requests is None:
        batch_requests = unet_loop == "in_process" and backend_for(backend, strict=False).serves_cuda_graphs
    if batch_requests and unet_loop != "in_process":
        raise ValueError(f"batch_requests groups requests in the device loop denoise owns (unet_loop in_process); "
                         f"got unet_loop {unet_loop}")
    # Which layout serves which engine files: the native TensorRT backend takes plans, the others ONNX.
    serves_plans = backend_for(backend, strict=False).engine_file.endswith(".plan")
    if layout == "tensorrt_plan" and not serves_plans:
        raise ValueError(f"layout tensorrt_plan serves TensorRT plans, but backend is {backend!r}; "
                         f"use --backend tensorrt (build it with `make engine BACKEND=tensorrt`)")
    if layout != "tensorrt_plan" and serves_plans:
        raise ValueError(f"backend tensorrt builds .plan files; serve them with --layout tensorrt_plan, not {layout!r}")
    specs = info.specs
    metadata = metadata or {}
    served = family.served_submodels if family is not None else SERVED_SUBMODELS
    te, unet, vae = (specs[n] for n in served)
    engine_kind = backend_for(backend, strict=False).triton_kind
    configs = {}
    # Tiled pictures need Python-side tiling around the VAE engines (runtime.TiledRunner): the python layout.
    tiled = layout == "python" and (family is None or family.tiles_large_images)
    from toonark.tiling import tiling_parameter
    tiling = ({"tiling": tiling_parameter(info.limits, info.dims, tile or None, tile_overlap if tile_overlap >= 0 else None)}
              if tiled else {})
    for spec in (te, unet, vae) + ((specs["vae_encoder"],) if vae_encoder else ()):
        if spec.name in (unet.name, "vae_encoder") and unet_loop == "in_process":
            continue   # denoise owns it (the VAE encoder too: no BLS callee, issue 18)
        inputs, outputs = _engine_io(spec, precision, metadata.get(spec.name))
        # No Triton response cache anywhere: Triton 2.51 stores a failed response and replays it as an empty
        # success until restart (recipe gotcha 6), so a text encoder killed mid-request poisoned its prompt
        # (issue 18). The prompt-embedding cache is toonark's own (PromptEncoder): in text_encoder here, in
        # preprocess in the native layouts.
        if layout == "python":
            # ort-cuda: a KIND_GPU instance (Triton pins it to the GPU); the UNet and the VAE decoder replay a
            # CUDA graph at the opt size (batch opt_batch, opt_image square), other sizes run a dynamic session.
            # CUDA graphs at the opt B/H/W only where those are the only axes (not over a dynamic text length).
            symbols = {d.symbol for t in spec.inputs for d in t.dims if hasattr(d, "symbol")}
            graph = (backend_for(backend, strict=False).serves_cuda_graphs and spec.name != te.name
                     and symbols <= {"B", "H", "W"})
            configs[spec.name] = model_config(
                spec.name, inputs, outputs, backend="python", kind=engine_kind,
                # No execution provider here: OrtEngine takes its providers from engine.json.
                # ort-cpu: idle ORT workers sleep instead of spinning: several pools share the cores with
                # denoise and tritonserver, which need one between two UNet steps (issue 12).
                params={"engine_file": "model.onnx", "intra_op_threads": str(intra_op_threads),
                        **({"lora_cache_size": str(lora_cache_size)} if loras and spec.name in (te.name, unet.name) else {}),
                        # the prompt-embedding cache (runtime.PromptEncoder): text_encoder runs its engine on a miss
                        **({"prompt_cache_bytes": str(int(prompt_cache_bytes))} if spec.name == te.name else {}),
                        **({"intra_op_spinning": "0"} if engine_kind == "KIND_CPU" else {}),
                        **({"cuda_graph_sizes": f"B={info.limits.opt_batch},H={info.limits.opt_image},"
                                                f"W={info.limits.opt_image}"} if graph else {}),
                        **(tiling if spec.name in ("vae_decoder", "vae_encoder") else {})})
        elif layout == "onnxruntime_onnx":
            configs[spec.name] = model_config(spec.name, inputs, outputs, platform="onnxruntime_onnx",
                                              kind=engine_kind, default_model_filename="model.onnx")
        else:
            configs[spec.name] = model_config(spec.name, inputs, outputs, platform="tensorrt_plan",
                                              kind="KIND_GPU", default_model_filename="model.plan")
    te_in, te_out = _engine_io(te, precision, metadata.get(te.name))
    unet_in, _ = _engine_io(unet, precision, metadata.get(unet.name))
    vae_in, vae_out = _engine_io(vae, precision, metadata.get(vae.name))
    hidden = te_out[0]
    lora_ports = list(LORA_RESOLVED) if loras else []
    if loras:   # the adapted engines read the resolved LoRA (python layout only, checked above)
        for spec in (s for s in (te, unet) if s.name in configs):   # an in_process denoise owns the UNet
            inputs, outputs = _engine_io(spec, precision, metadata.get(spec.name))
            head, _, tail = configs[spec.name].partition("output [")
            configs[spec.name] = head.replace(_io_block("input", inputs), _io_block("input", inputs + lora_ports)) \
                + "output [" + tail
    # Every preprocess input is optional, PROMPT too (the ensemble requires it): a request without PROMPT
    # then gets preprocess' clear refusal instead of Triton's "unexpected deadlock" of the ensemble.
    # The prompt-embedding cache (runtime.PromptEncoder; only a Python model can own a cache that never stores a
    # failure): python layout, in the text_encoder model, an ensemble step (preprocess -> text_encoder -> denoise:
    # no BLS callee, so any Python process can be killed safely, issue 18); native layouts, where text_encoder
    # is another backend's model (no Python process to kill), in preprocess, which calls it by BLS on a miss.
    reads_ids = bool(getattr(family, "denoise_reads_ids", False))
    ids_port = [te_in[0]] if reads_ids else []
    cache_in_encoder = layout == "python"
    ids_params = {"text_encoder_input": te_in[0].name, "text_encoder_input_type": "TYPE_" + te_in[0].triton_type}
    bls_params = {} if cache_in_encoder else {"text_encoder_model": te.name, "text_hidden_name": hidden.name,
                                              "prompt_cache_bytes": str(int(prompt_cache_bytes))}
    configs["preprocess"] = model_config("preprocess", [replace(p, optional=True) for p in ENSEMBLE_INPUTS],
                                         [te_in[0]] + [*RESOLVED, *lora_ports] if cache_in_encoder else
                                         [hidden, *ids_port, *RESOLVED, *lora_ports], backend="python",
                                         params={**serving_defaults(info),
                                                 "image_input": str(int(vae_encoder)), "tiled_sizes": str(int(tiled)),
                                                 **({"lora_names": ",".join(loras)} if loras else {}),
                                                 **ids_params, **bls_params})
    encoder_params = {}
    if vae_encoder:
        encoder_in, _ = _engine_io(specs["vae_encoder"], precision, metadata.get("vae_encoder"))
        # in_process: denoise owns the engine (<denoise>/1/vae_encoder/), otherwise it calls the model by BLS
        encoder_params = {"vae_encoder_model": "in_process" if unet_loop == "in_process" else "vae_encoder",
                          "vae_encoder_float_type": "TYPE_" + encoder_in[0].triton_type}
    loop_params = {"unet_loop": unet_loop}
    if unet_loop == "in_process":
        loop_params.update({"engine_file": "model.onnx", "intra_op_threads": str(intra_op_threads),
                            **({"intra_op_spinning": "0"} if engine_kind == "KIND_CPU" else {}),
                            # LoRA styles: denoise's own UNet runner switches them (ort-cpu, checked above)
                            **({"lora_cache_size": str(lora_cache_size)} if loras else {})})
        if backend_for(backend, strict=False).serves_cuda_graphs:
            loop_params["cuda_graph_sizes"] = graph_buckets(info)
    elif unet_loop == "bls_device":
        loop_params["unet_device"] = "cuda" if engine_kind == "KIND_GPU" else "cpu"
    denoise_inputs = [Port(hidden.name, hidden.triton_type, hidden.dims), *ids_port, *DENOISE_INPUTS, *lora_ports]
    denoise_params = {"unet_model": unet.name, "unet_output": unet.output_names[0],
                      "unet_float_type": "TYPE_" + unet_in[0].triton_type, "text_hidden_name": hidden.name,
                      "latent_name": vae_in[0].name, **tiling, **encoder_params,
                      **({"text_ids_name": te_in[0].name} if reads_ids else {}), **loop_params}
    # Request batching: denoise takes up to max(GRAPH_BATCHES) requests per execute (Triton's dynamic batcher, a
    # leading request dimension the ensemble adds), each delivered as is (the Python backend does not concatenate),
    # grouped by runtime.Denoiser.run_batch; edits and tiled sizes run one at a time in the host loop.
    batching = dict(max_batch_size=max(b for b in GRAPH_BATCHES if b <= info.limits.max_batch),
                    batch_delay_us=BATCH_DELAY_US) if batch_requests else {}
    configs["denoise"] = model_config(
        "denoise", denoise_inputs, [vae_in[0]], backend="python", kind=engine_kind if unet_loop != "bls" else "KIND_CPU",
        count=denoise_instances, params=denoise_params, queue=queue or QueuePolicy(), **batching)
    configs["postprocess"] = model_config("postprocess", [vae_out[0], *POSTPROCESS_INPUTS], list(ENSEMBLE_OUTPUTS),
                                          backend="python")
    resolved = {p.name: p.name for p in RESOLVED}
    lora_map = {p.name: p.name for p in lora_ports}
    ids_map = {te_in[0].name: "input_ids"}
    if cache_in_encoder:
        steps = [("preprocess", {p.name: p.name for p in ENSEMBLE_INPUTS}, {**ids_map, **resolved, **lora_map}),
                 (te.name, {**ids_map, **lora_map}, {hidden.name: "text_embeddings"})]
    else:
        steps = [("preprocess", {p.name: p.name for p in ENSEMBLE_INPUTS},
                  {hidden.name: "text_embeddings", **(ids_map if reads_ids else {}), **resolved, **lora_map})]
    steps += [
        ("denoise", {hidden.name: "text_embeddings", **({te_in[0].name: "input_ids"} if reads_ids else {}),
                     **{p.name: p.name for p in DENOISE_INPUTS}, **lora_map},
         {vae_in[0].name: "latents"}),
        (vae.name, {vae_in[0].name: "latents"}, {vae_out[0].name: "decoded"}),
    ]
    outputs = ENSEMBLE_OUTPUTS
    images = "decoded"
    if safety_checker is not None:
        # Between the VAE and the encoder: flagged images leave as white ones, NSFW says which.
        thresholds = safety_checker["thresholds"]
        from toonark.export.safety_checker import Thresholds
        checked = Port("checked", vae_out[0].triton_type, vae_out[0].dims)
        configs["safety_checker"] = model_config(
            "safety_checker", [replace(vae_out[0], name="images")], [checked, NSFW_OUTPUT], backend="python",
            params={"intra_op_threads": str(intra_op_threads),
                    "concept_thresholds": Thresholds.format(thresholds["concept"]),
                    "special_care_thresholds": Thresholds.format(thresholds["special_care"]),
                    "safety_adjustment": str(float(thresholds.get("adjustment", 0.0)))})
        steps.append(("safety_checker", {"images": "decoded"}, {"checked": "checked", NSFW_OUTPUT.name: NSFW_OUTPUT.name}))
        outputs, images = ENSEMBLE_OUTPUTS + (NSFW_OUTPUT,), "checked"
    steps.append(("postprocess", {vae_out[0].name: images, **{p.name: p.name for p in POSTPROCESS_INPUTS}},
                  {p.name: p.name for p in ENSEMBLE_OUTPUTS}))
    configs[ENSEMBLE] = ensemble_config(steps, outputs)
    return with_instances(configs, instances)


def python_model_names(configs: dict[str, str]) -> list[str]:
    """The models of `configs` that run as Python-backend processes (what the watchdog reloads)."""
    return [name for name, text in configs.items() if 'backend: "python"' in text]


def with_instances(configs: dict[str, str], instances: int | dict[str, int] | None) -> dict[str, str]:
    """More than one instance (process) of a model, where memory allows (issue 18): a killed process then
    costs less, since the other instance keeps serving while the watchdog reloads it (tiny build, 8 clients:
    p99 while a process is down 2.3-3.2 s with 2 instances of each Python model, 3-12 s with one).
    instances: an int raises every Python model that runs one instance to that many (denoise keeps
    denoise_instances / the batching front's count when those are above one); a dict names models and counts."""
    if instances is None or instances == 1:
        return dict(configs)
    if isinstance(instances, int):
        instances = {name: instances for name in python_model_names(configs)
                     if re.search(r"count: 1 \}", configs[name])}
    out = dict(configs)
    for model, count in instances.items():
        if model not in out or model == ENSEMBLE:
            raise ValueError(f"instances: no model {model!r} to scale; choose from "
                             f"{', '.join(m for m in out if m != ENSEMBLE)}")
        if count < 1:
            raise ValueError(f"instances: {model} needs at least 1 instance, got {count}")
        out[model] = re.sub(r"count: \d+ \}", f"count: {int(count)} }}", out[model], count=1)
    return out


# --- files ------------------------------------------------------------------------------------

def _write_loras(repo: Path, lora_set, bases: dict, folders: dict[str, Path]) -> None:
    """<repo>/loras/<name>.safetensors, and per adapted engine its base weights and the layer shapes beside the
    engine (folders: {submodel: the folder its engine was linked into})."""
    from toonark.engines.lora import with_siblings
    from toonark.triton_model_repo.runtime import LORA_BASE_FILE, LORA_FOLDER, LORA_TARGETS_FILE
    for name, lora in lora_set.files.items():
        _link_or_copy(lora.path, repo / LORA_FOLDER / f"{name}.safetensors")
    shapes = {sub: {m: list(shape) for m, shape in base.shapes.items()} for sub, base in bases.items()}
    for sub, base in bases.items():
        version = folders[sub]
        base.subset(with_siblings(lora_set.modules(sub), base.weights)).save(version / LORA_BASE_FILE)
        (version / LORA_TARGETS_FILE).write_text(json.dumps(shapes))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # other filesystem, or links not allowed
        shutil.copy2(source, target)


def _copy_tree(source: Path, target: Path, what: str, fix: str) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"{what} not found: {source}. {fix}")
    shutil.copytree(source, target)


def write_repo(build_dir: Path, backend: str = "ort-cpu", precision: str = "fp32", layout: str = "python", *,
               out: Path | None = None, intra_op_threads: int = 0, queue: QueuePolicy | None = None,
               verify_engines: bool = True, safety_checker: bool | None = None, loras: Path | None = None,
               lora_cache_size: int = 4, tile: int = 0, tile_overlap: int = -1, unet_loop: str | None = None,
               denoise_instances: int = 1, batch_requests: bool | None = None,
               prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, instances: int | dict[str, int] | None = None) -> Path:
    """Write the Triton model repository for the engines of `build_dir` (default OUT/triton_model_repo).

    The folder is replaced atomically; engine files are hard-linked (copied across filesystems)
    into <model>/1/, model.py sources are copied from this source tree, and the tokenizer,
    scheduler config and toonark.json go into <model>/1/pipeline/ of the models that read them.
    queue: back-pressure limits (QueuePolicy). verify_engines: refuse (EngineError naming the fix) an
    engine that no longer matches its engine.json (corrupt) or its source ONNX (stale), as load_engine does.
    loras: a folder of LoRA .safetensors files (`make repo LORAS=dir`), checked against the build's fp32 export
    before anything is written and copied into <repo>/loras/; the adapted engines get their base weights
    (lora_base.safetensors) and the layer shapes (lora_targets.json) beside them.
    """
    build_dir = Path(build_dir)
    paths = BuildLayout(build_dir)
    info = BuildInfo.read(build_dir)
    from toonark.family import family_for_folder
    family = family_for_folder(paths.pipeline)
    served = family.served_submodels
    fix_export = f"Run `make export MODEL=<diffusers folder> OUT={build_dir}` first."
    engine_root = paths.engine_dir(backend, precision)
    engine_backend = backend_for(backend)
    engine_name = engine_backend.engine_file
    metadata = {}
    # The VAE encoder (IMAGE_IN) is served when it was built (engines/build.py builds it when exported) and the
    # family edits pictures.
    encoder = family.edits_images and (engine_root / "vae_encoder" / engine_name).is_file()
    served = served + (("vae_encoder",) if encoder else ())
    for name in served:
        engine = engine_root / name / engine_name
        if not engine.is_file():
            raise FileNotFoundError(f"no {backend} {precision} engine for {name}: {engine} is missing. Build it with "
                                    f"`make engine OUT={build_dir} BACKEND={backend} PRECISION={precision}`.")
        if verify_engines:
            from toonark.engines.build import source_onnx
            from toonark.engines.metadata import check_metadata, read_metadata
            metadata[name] = read_metadata(build_dir, backend, precision, name)
            check_metadata(metadata[name], build_dir=build_dir, backend=backend, precision=precision, submodel=name,
                           source_onnx=source_onnx(build_dir, backend, precision, name,
                                                   fused=bool(metadata[name].get("fusion"))))
            continue
        meta_path = engine_root / name / "engine.json"
        metadata[name] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    from toonark.export.safety_checker import METADATA_FILE, checker_dir
    checker = checker_dir(build_dir)
    checker_meta = None
    if safety_checker is not False and (checker / "model.onnx").is_file():
        checker_meta = json.loads((checker / METADATA_FILE).read_text())
    elif safety_checker is True:
        raise FileNotFoundError(f"no safety checker in {checker}: export one from a pipeline folder that has "
                                f"safety_checker/ (toonark.export.safety_checker.export_safety_checker)")
    lora_set = lora_bases_ = None
    if loras is not None:   # refuse a bad LoRA file before anything is written
        from toonark.engines.lora import load_loras, lora_bases
        lora_bases_ = lora_bases(build_dir)
        lora_set = load_loras(Path(loras), lora_bases_)
    configs = repo_configs(info, backend=backend, precision=precision, layout=layout, metadata=metadata,
                           intra_op_threads=intra_op_threads, queue=queue, safety_checker=checker_meta,
                           loras=lora_set.names if lora_set else None, lora_cache_size=lora_cache_size,
                           vae_encoder=encoder, tile=tile, tile_overlap=tile_overlap, family=family,
                           unet_loop=unet_loop, denoise_instances=denoise_instances, batch_requests=batch_requests,
                           prompt_cache_bytes=prompt_cache_bytes, instances=instances)
    remake = (f"make engine OUT={build_dir} BACKEND={backend} PRECISION={precision} && "
              f"make repo OUT={build_dir} BACKEND={backend} PRECISION={precision} LAYOUT={layout}")
    record = {"backend": backend, "precision": precision, "layout": layout, "remake": remake,
              "runtime": engine_backend.serving_runtime(metadata)}
    unet_name = family.served_submodels[1]
    in_process = unet_name not in configs   # denoise owns the UNet engine
    target = Path(out) if out else paths.triton_repo
    with atomic_dir(target) as tmp:
        for name, text in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
        folders = {}
        for name in served:
            # the UNet (and VAE encoder) of an in_process denoise go to denoise/1/<name>/ (runtime.owned_engine)
            owned = in_process and name in (unet_name, "vae_encoder")
            version = tmp / "denoise" / "1" / name if owned else tmp / name / "1"
            folders[name] = version
            metadata_file = engine_root / name / "engine.json"
            for source in engine_backend.engine_files(engine_root / name) + ([metadata_file] if metadata_file.is_file() else []):
                _link_or_copy(source, version / source.name)
            if layout == "python" and not owned:
                shutil.copy2(SOURCE_DIR / "onnx_runner" / "1" / "model.py", version / "model.py")
        if lora_set is not None:
            _write_loras(tmp, lora_set, lora_bases_, folders)
        for name in ("preprocess", "denoise", "postprocess"):
            shutil.copy2(SOURCE_DIR / name / "1" / "model.py", tmp / name / "1" / "model.py")
        if checker_meta is not None:   # safety_checker: None = when the build has one, True = required, False = off
            _link_or_copy(checker / "model.onnx", tmp / "safety_checker" / "1" / "model.onnx")
            shutil.copy2(checker / METADATA_FILE, tmp / "safety_checker" / "1" / METADATA_FILE)
            shutil.copy2(SOURCE_DIR / "safety_checker" / "1" / "model.py", tmp / "safety_checker" / "1" / "model.py")
        # What each Python model reads at initialize: <model>/1/pipeline/ is a BuildLayout pipeline folder,
        # so BuildInfo.read(<model>/1) works there exactly as on the build folder.
        parts = {"preprocess": ("tokenizer",), "denoise": ("scheduler",) + family.denoise_pipeline_parts,
                 "postprocess": ()}
        if layout == "python":
            parts.update({name: () for name in served if name in configs})
        for name, folders in parts.items():
            pipeline = tmp / name / "1" / "pipeline"
            pipeline.mkdir()
            shutil.copy2(paths.pipeline_info, pipeline / paths.pipeline_info.name)
            if (paths.pipeline / "model_index.json").is_file():   # the model family (toonark.family_for_folder)
                shutil.copy2(paths.pipeline / "model_index.json", pipeline / "model_index.json")
            for part in folders:
                _copy_tree(paths.pipeline / part, pipeline / part, f"pipeline {part}", fix_export)
        write_json(tmp / REPO_RECORD, record)
        (tmp / "README.txt").write_text(
            f"Generated by toonark.serving.repository.write_repo from {build_dir.resolve()}\n"
            f"backend {backend}, precision {precision}, layout {layout}. Do not edit: regenerate with "
            f"`make repo OUT={build_dir} BACKEND={backend} PRECISION={precision}`.\n")
    return target


def check_repo_runtime(repo: Path) -> None:
    """Refuse (EngineError naming the fix) a repository whose engines this machine cannot load: TensorRT plans
    built with another TensorRT or for another GPU (Backend.check_serving_runtime). Called by the launcher
    before tritonserver starts, where Triton itself would only fail the model load without saying why."""
    from toonark.engines.backends import EngineError
    path = Path(repo) / REPO_RECORD
    if not path.is_file():
        plans = [c.parent.name for c in sorted(Path(repo).glob("*/config.pbtxt"))
                 if 'platform: "tensorrt_plan"' in c.read_text()]
        if plans:
            raise EngineError(f"{repo} serves TensorRT plans ({', '.join(plans)}) but has no {REPO_RECORD} saying "
                              f"which TensorRT built them; regenerate it with `make repo BACKEND=tensorrt "
                              f"LAYOUT=tensorrt_plan`")
        return   # a repository of ONNX engines: nothing version-bound to check
    record = json.loads(path.read_text())
    fix = (f"Rebuild the plans and the repository with this machine's TensorRT: `{record.get('remake')}` (in the "
           f"container: its `build` command)")
    backend_for(record.get("backend"), strict=False).check_serving_runtime(record.get("runtime") or {}, Path(repo), fix)
