"""What the Triton Python-backend models of toonark do, importable and testable without Triton.

Each `triton_model_repo/<name>/1/model.py` only parses its config (`model_parameters`), builds
one object from here in `initialize`, and moves tensors in and out in `execute`:

    preprocess   RequestPreparer.prepare   prompts + optional inputs -> resolved values, input_ids (2B, L)
    denoise      Denoiser.run              text embeddings -> the VAE's input latents (unet by callback)
    postprocess  encode_images             decoded (B, 3, H, W) in [-1, 1] -> PNG / WebP bytes
    engines      load_runner               the built engine in <model>/1/ (ONNX Runtime)

The math is the offline pipeline's (toonark.pipeline, toonark.scheduler): same tokenizer,
same seeded noise, same solver, same guidance, same uint8 conversion, so the server's image
equals `Text2ImagePipeline`'s for the same seed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np

from toonark.api import (DEFAULT_QUALITY, IMAGE_FORMATS, RequestError, ResolvedRequest, one_value,  # noqa: F401
                         resolve_request, text_value)
from toonark.specs import BuildInfo

# Every config parameter a toonark model reads, with its type (config parameters are strings).
PARAMETER_TYPES: dict[str, type] = {
    "default_seed": int, "default_guidance": float,
    "default_width": int, "default_height": int, "default_format": str,
    "unet_model": str, "unet_output": str, "unet_float_type": str, "text_hidden_name": str, "latent_name": str,
    # preprocess: the prompt-embedding cache in front of the text encoder (PromptEncoder)
    "text_encoder_model": str, "text_encoder_input": str, "text_encoder_input_type": str,
    "prompt_cache_bytes": int,
    # Set by the launcher's watchdog when it reloads a model whose process died: a changed config makes
    # Triton load a new instance in place (the ensemble stays up); never read by the models.
    "reload_generation": str,
    "engine_file": str, "intra_op_threads": int, "cuda_graph_sizes": str,
    "default_quality": int,
    # safety_checker: thresholds of diffusers' StableDiffusionSafetyChecker (comma-separated, one per concept)
    "concept_thresholds": str, "special_care_thresholds": str, "safety_adjustment": float,
}


class UpstreamError(RuntimeError):
    """A model this one called (BLS) answered with an error: passed on with that model's error code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


def call_model(pb_utils, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One BLS call: `output` of `model` for `inputs`, or UpstreamError with that model's message and code
    (a dead stub's "Stub process '<model>_0_0' is not healthy.", UNAVAILABLE while it reloads, ...)."""
    response = pb_utils.InferenceRequest(
        model_name=model, requested_output_names=[output],
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()]).exec()
    if response.has_error():
        error = response.error()
        raise UpstreamError(error.message(), error.code() if hasattr(error, "code") else None)
    tensor = pb_utils.get_output_tensor_by_name(response, output)
    if tensor is None:
        raise UpstreamError(f"model {model!r} answered without {output}")
    return tensor.as_numpy()


def respond_each(requests, handle, pb_utils, metrics=None) -> list:
    """Exactly one response per request, in order. `handle(request)` returns the output tensors; a bad
    request (RequestError, or a ValueError such as a shape or dtype the engine was not built for) becomes
    INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT), an UpstreamError keeps the called model's code, and
    anything else becomes INTERNAL with its message; the other requests of the batch are still answered.
    metrics: a Metrics whose stage duration times each request."""
    responses = []
    for request in requests:
        try:
            if metrics is None:
                tensors = handle(request)
            else:
                with metrics.timed():
                    tensors = handle(request)
            responses.append(pb_utils.InferenceResponse(output_tensors=list(tensors)))
        except UpstreamError as err:
            code = pb_utils.TritonError.INTERNAL if err.code is None else err.code
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code)))
        except ValueError as err:   # RequestError included
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)))
        except Exception as err:   # noqa: BLE001 - one failed request must not fail the batch
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)))
    return responses


def model_parameters(model_config: dict | str) -> dict:
    """Typed values of a model config's `parameters` (the dict Triton passes as args["model_config"])."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    values = {}
    for key, entry in config.get("parameters", {}).items():
        if key not in PARAMETER_TYPES:
            raise ValueError(f"model {config.get('name')!r}: unknown config parameter {key!r}; regenerate the "
                             f"repository with `make repo` (known: {', '.join(sorted(PARAMETER_TYPES))})")
        raw = entry["string_value"] if isinstance(entry, dict) else entry
        try:
            values[key] = PARAMETER_TYPES[key](raw)
        except ValueError:
            raise ValueError(f"model {config.get('name')!r}: parameter {key}={raw!r} is not a valid "
                             f"{PARAMETER_TYPES[key].__name__}") from None
    return values


def version_dir(args: dict) -> Path:
    """<repo>/<model>/<version>/: where the generator put the engine and pipeline files."""
    return Path(args["model_repository"]) / args["model_version"]


def pipeline_dir(args: dict) -> Path:
    return version_dir(args) / "pipeline"


def build_info(args: dict) -> BuildInfo:
    return BuildInfo.read(version_dir(args))


# --- preprocess -----------------------------------------------------------------------------------

class RequestPreparer:
    """A request's ensemble inputs -> (ResolvedRequest, token ids): toonark.api.resolve_request (defaults,
    ranges, the kid-safe prompt policy: template, safety check, negative prompt, step presets; the same
    resolver the offline pipeline calls) and the model family's tokenization."""

    def __init__(self, pipeline: Path, info: BuildInfo, params: dict, policy=None):
        from toonark.family import family_for_folder
        from toonark.prompts import PromptPolicy
        self.info = info
        self.policy = policy or PromptPolicy.load()
        self.family = family_for_folder(pipeline)
        self.tokenizer = self.family.load_tokenizer(pipeline)
        # The preprocess config's default_<input> parameters (serving.repository writes api.config_defaults).
        self.defaults = {key[len("default_"):]: value for key, value in params.items() if key.startswith("default_")}

    def prepare(self, **inputs) -> tuple[ResolvedRequest, np.ndarray]:
        """One request's ensemble inputs (keyword = the input's name in lower case; None = not sent)."""
        resolved = resolve_request(self.info, self.policy, self.defaults, **inputs)
        return resolved, resolved.input_ids(self.tokenizer, self.family, self.info.dims)


class PromptEncoder:
    """Token ids -> text embeddings through toonark's prompt-embedding cache (toonark.embedding_cache): a hit
    skips the text encoder; a miss calls it (`encode`, a BLS call in the served preprocess) and stores the
    result only when it is a good embedding. A failed call raises and stores nothing, so a fault of the
    text encoder (its process killed mid-request) never outlives its recovery (issue 18)."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], max_bytes: int, metrics=None, instance: str = ""):
        from toonark.embedding_cache import PromptEmbeddingCache
        self.encode = encode
        self.cache = PromptEmbeddingCache(max_bytes)
        self.metrics = metrics
        self.instance = instance
        self._reported = self.cache.stats.as_dict()
        self._report()

    @staticmethod
    def key(cache, resolved: ResolvedRequest, input_ids: np.ndarray) -> tuple:
        """Everything that changes the embedding. The hook for a text-encoder LoRA: pass its id (and scale)
        as text_encoder_lora once the resolved request carries one."""
        return cache.key(input_ids, text_encoder_lora=getattr(resolved, "text_encoder_lora", None))

    def __call__(self, resolved: ResolvedRequest, input_ids: np.ndarray) -> np.ndarray:
        key = self.key(self.cache, resolved, input_ids)
        try:
            value, _ = self.cache.get_or_compute(key, lambda: self.encode(input_ids), rows=input_ids.shape[0])
        finally:
            self._report()
        return value

    def _report(self) -> None:
        if self.metrics is None:
            return
        stats = self.cache.stats.as_dict()
        for name in ("hits", "misses", "evictions", "refused"):
            self.metrics.metric(f"toonark_prompt_cache_{name}_total")   # present from startup, at 0
            self.metrics.count(f"toonark_prompt_cache_{name}_total", stats[name] - self._reported[name])
        self.metrics.set("toonark_prompt_cache_bytes", stats["bytes"], instance=self.instance)
        self.metrics.set("toonark_prompt_cache_entries", stats["entries"], instance=self.instance)
        self._reported = stats


# --- denoise --------------------------------------------------------------------------------------

UnetCall = Callable[[dict], np.ndarray]   # {sample, timestep, encoder_hidden_states} -> out_sample


class Denoiser:
    """DPM-Solver++ with classifier-free guidance over a UNet given as a callable
    (the Triton model passes a BLS call to the `unet` model)."""

    def __init__(self, pipeline: Path, info: BuildInfo):
        from toonark.family import family_for_folder
        self.info = info
        self.family = family_for_folder(pipeline)
        self.scheduler = self.family.sampler(pipeline)
        self.last_unet_seconds: list[float] = []

    def run(self, text_embeddings: np.ndarray, *, seed: int | list[int], steps: int, guidance: float, width: int,
            height: int, unet: UnetCall, float_dtype=np.float32) -> np.ndarray:
        """Latents ready for the VAE decoder (the family's latents_to_vae: divided by vae_scaling_factor).
        seed: one int (the batch's noise from one generator, as the offline pipeline draws it) or one
        seed per image (each image's noise drawn alone: NUM_IMAGES requests)."""
        from toonark import pipeline as offline
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] % 2:
            raise RequestError(f"text embeddings of shape {list(text_embeddings.shape)} are not (2B, L, D)")
        batch = text_embeddings.shape[0] // 2
        dims = self.info.dims
        unet_spec = self.info.specs["unet"]
        io = "fp16" if np.dtype(float_dtype) == np.float16 else "fp32"
        seeds = [int(s) for s in np.asarray(seed).reshape(-1)]
        if len(seeds) == 1:
            latents = offline.initial_latents(seeds[0], batch, dims, height, width,
                                              init_noise_sigma=self.scheduler.init_noise_sigma)
        elif len(seeds) == batch:
            latents = np.concatenate([offline.initial_latents(s, 1, dims, height, width,
                                                              init_noise_sigma=self.scheduler.init_noise_sigma)
                                      for s in seeds])
        else:
            raise RequestError(f"{len(seeds)} seeds for {batch} images; send 1 or one per image")
        def typed_unet(feeds: dict) -> np.ndarray:
            # Float inputs in the unet engine's I/O precision ("float" in the spec), fixed dtypes as declared.
            return unet({t.name: feeds[t.name].astype(t.numpy_dtype(io), copy=False) for t in unet_spec.inputs})

        latents, unet_ms, _ = offline.denoise_latents(self.scheduler, latents, text_embeddings,
                                                      self.scheduler.schedule(steps), guidance, typed_unet)
        self.last_unet_seconds = [ms / 1e3 for ms in unet_ms]
        return self.family.latents_to_vae(latents, dims)


# --- postprocess ----------------------------------------------------------------------------------

def encode_images(decoded: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> list[bytes]:
    """(B, 3, H, W) VAE output in [-1, 1] -> one encoded image per batch item (quality: WebP only)."""
    from PIL import Image
    from toonark import pipeline as offline
    if fmt not in IMAGE_FORMATS:
        raise RequestError(f"FORMAT {fmt!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}")
    images = offline.to_uint8_hwc(np.asarray(decoded, dtype=np.float32))
    out = []
    for image in images:
        buffer = io.BytesIO()
        if fmt == "png":
            Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
        else:
            Image.fromarray(image).save(buffer, format="WEBP", quality=int(quality), method=4)
        out.append(buffer.getvalue())
    return out


# --- idle unload ---------------------------------------------------------------------------------

IDLE_UNLOAD_ENV = "TOONARK_IDLE_UNLOAD_S"   # set by the launcher (make serve IDLE_UNLOAD_S=N); stubs inherit it


def idle_unload_seconds() -> float:
    """Seconds without requests after which an engine model frees its session (0: never)."""
    import os
    raw = os.environ.get(IDLE_UNLOAD_ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{IDLE_UNLOAD_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{IDLE_UNLOAD_ENV}={raw} must be >= 0 (0: never unload)")
    return value


class IdleEngine:
    """An engine that frees itself after `idle_s` seconds without a request and loads again on the next one
    (that request waits for the load; it is never refused). The model and its process stay loaded in
    Triton, so the ensemble stays ready: with explicit model control an unloaded model would refuse
    requests instead. idle_s 0: a plain engine, loaded once."""

    def __init__(self, load: Callable[[], object], idle_s: float = 0.0, log=None):
        import threading
        import time
        self._load, self.idle_s, self._log = load, float(idle_s), log
        self._lock = threading.Lock()
        self._clock = time.monotonic
        self.engine = load()
        self.last_used = self._clock()
        self.loads = 1
        self.last_load_s: float | None = None
        if self.idle_s > 0:
            self._stop = threading.Event()
            threading.Thread(target=self._watch, name="toonark-idle-unload", daemon=True).start()

    def run(self, feeds: dict) -> dict:
        with self._lock:
            if self.engine is None:
                start = self._clock()
                self.engine = self._load()
                self.loads += 1
                self.last_load_s = self._clock() - start
                if self._log:
                    self._log(f"idle unload: loaded again in {self.last_load_s:.2f} s for a request")
            self.last_used = self._clock()
            engine = self.engine
            result = engine.run(feeds)
            self.last_used = self._clock()
            return result

    def _watch(self) -> None:
        import gc
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            with self._lock:
                if self.engine is not None and self._clock() - self.last_used >= self.idle_s:
                    self.engine = None
                    gc.collect()
                    if self._log:
                        self._log(f"idle unload: session freed after {self.idle_s:g} s without requests")


# --- engines --------------------------------------------------------------------------------------

def load_runner(args: dict, params: dict):
    """The engine of a served submodel, from <model>/1/ (model.onnx + engine.json + pipeline/toonark.json),
    loaded by the backend object engine.json names (the python layout serves ONNX Runtime engines)."""
    from toonark.engines.backends import backend_for
    folder = version_dir(args)
    name = json.loads(args["model_config"])["name"]
    spec = build_info(args).specs[name]
    metadata_path = folder / "engine.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} is missing; regenerate the repository with `make repo`")
    metadata = json.loads(metadata_path.read_text())
    threads = params.get("intra_op_threads") or None
    # "B=1,H=512,W=512": replay a CUDA graph at that size (ort-cuda; other sizes use a dynamic session).
    sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in params.get("cuda_graph_sizes", "").split(",")
                                            if item.strip())}
    return backend_for(metadata["backend"]).load(
        folder / params.get("engine_file", "model.onnx"), spec, metadata, threads=threads, cuda_graph=bool(sizes),
        graph_sizes=sizes or None)
