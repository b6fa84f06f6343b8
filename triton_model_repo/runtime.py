"""What the Triton Python-backend models of toonark do, importable and testable without Triton.

Each `triton_model_repo/<name>/1/model.py` only parses its config (`model_parameters`), builds
one object from here in `initialize`, and moves tensors in and out in `execute`:

    preprocess   RequestPreparer.prepare   prompts + optional inputs -> resolved values, input_ids (2B, L)
    denoise      Denoiser.run              text embeddings (+ picture, mask) -> the VAE's input latents (unet and
                                           vae_encoder by callback; tiles above the profile)
    postprocess  encode_images             decoded (B, 3, H, W) in [-1, 1] -> PNG / WebP bytes
    engines      load_runner               the built engine in <model>/1/ (ONNX Runtime); the VAE engines in
                                           TiledRunner (tiles above the profile)

The math is the offline pipeline's (toonark.pipeline, toonark.scheduler): same tokenizer,
same seeded noise, same solver, same guidance, same uint8 conversion, so the server's image
equals `Text2ImagePipeline`'s for the same seed.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from toonark.api import (DEFAULT_QUALITY, IMAGE_FORMATS, RAW_FORMAT, RequestError, ResolvedRequest,  # noqa: F401
                         Serves, one_value, resolve_request, text_value)
from toonark.specs import BuildInfo

# Every config parameter a toonark model reads, with its type (config parameters are strings).
PARAMETER_TYPES: dict[str, type] = {
    "default_seed": int, "default_guidance": float,
    "default_width": int, "default_height": int, "default_format": str,
    "unet_model": str, "unet_output": str, "unet_float_type": str, "text_hidden_name": str, "latent_name": str,
    "engine_file": str, "intra_op_threads": int, "intra_op_spinning": int, "cuda_graph_sizes": str,
    # denoise: which loop runs the UNet (in_process | bls | bls_device) and where the BLS UNet's tensors live
    "unet_loop": str, "unet_device": str,
    # the prompt-embedding cache (PromptEncoder): its bound, in text_encoder (python layout) or in preprocess (native
    # layouts, which call text_encoder by BLS on a miss: its name, input and input type)
    "prompt_cache_bytes": int, "text_encoder_model": str, "text_encoder_input": str, "text_encoder_input_type": str,
    # Set by the launcher's watchdog when it reloads a model whose process died: a changed config makes
    # Triton load a new instance in place (the ensemble stays up); never read by the models.
    "reload_generation": str,
    "default_quality": int,
    # image input and tiling (toonark.image_input, toonark.tiling): whether a VAE encoder is served, the
    # model denoise calls for it, and the tile size / overlap in pixels (0 / -1: the profile's defaults)
    "image_input": int, "vae_encoder_model": str, "vae_encoder_float_type": str, "tiling": str, "tiled_sizes": int,
    # denoise of families that read the token ids too (Qwen-Image: which text rows are padding)
    "text_ids_name": str,
    # safety_checker: thresholds of diffusers' StableDiffusionSafetyChecker (comma-separated, one per concept)
    "concept_thresholds": str, "special_care_thresholds": str, "safety_adjustment": float,
    # LoRA styles (repositories written with LORAS=dir): preprocess' registered names, the engines' LRU size
    "lora_names": str, "lora_cache_size": int, "lora_strategy": str,
    # the batched loop model on CUDA graphs: 1 pads 3 images into the B=4 graph instead of B=2 + B=1
    "pad_batches": int,
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
        # Loads the safety classifier now (ONNX session, tokenizer): a missing or stale build fails the model's
        # load with the command that rebuilds it, and the first request does not pay the load.
        self.policy.check("a happy otter in a sunny meadow")
        self.family = family_for_folder(pipeline)
        self.tokenizer = self.family.load_tokenizer(pipeline)
        # The preprocess config's default_<input> parameters (serving.repository writes api.config_defaults).
        self.defaults = {key[len("default_"):]: value for key, value in params.items() if key.startswith("default_")}
        self.known_loras = tuple(n for n in params.get("lora_names", "").split(",") if n)
        # Whether a VAE encoder is served and whether sizes above the profile are tiled (the python layout).
        self.serves = Serves(images=bool(params.get("image_input", 0)), tiled_sizes=bool(params.get("tiled_sizes", 0)))

    def prepare(self, **inputs) -> tuple[ResolvedRequest, np.ndarray]:
        """One request's ensemble inputs (keyword = the input's name in lower case; None = not sent)."""
        resolved = resolve_request(self.info, self.policy, self.defaults, self.serves, self.known_loras, **inputs)
        return resolved, resolved.input_ids(self.tokenizer, self.family, self.info.dims)


class PromptEncoder:
    """Token ids -> text embeddings through toonark's prompt-embedding cache (toonark.embedding_cache): a hit
    skips the text encoder; a miss runs `encode()` and stores the result only when it is a good embedding. A
    failed run raises and stores nothing, so a fault of the text encoder never outlives its recovery (issue 18).
    Where it lives: in the served `text_encoder` model (python layout), the ensemble step between preprocess and
    denoise, whose miss runs the engine in the same process; in the native layouts (text_encoder is another
    backend's model) in preprocess, whose miss calls text_encoder by BLS. A text-encoder LoRA (api.LORA_RESOLVED:
    name and scale) goes into the key (lora_id)."""

    def __init__(self, max_bytes: int, metrics=None, instance: str = ""):
        from toonark.embedding_cache import PromptEmbeddingCache
        self.cache = PromptEmbeddingCache(max_bytes)
        self.metrics = metrics
        self.instance = instance
        self._reported = self.cache.stats.as_dict()
        self._report()

    @staticmethod
    def lora_id(name: str, scale: float) -> str | None:
        """The id of the LoRA the text encoder applies: its name and scale as the engine reads it (float32);
        None for the base model ("" name, whatever the scale)."""
        if not name:
            return None
        return f"{name}@{float(np.float32(scale))!r}"

    def key(self, input_ids: np.ndarray, lora_id: str | None = None) -> tuple:
        """Everything that changes the embedding: the token ids, and the text encoder's LoRA."""
        return self.cache.key(input_ids, text_encoder_lora=lora_id)

    def __call__(self, input_ids: np.ndarray, encode: Callable[[], np.ndarray], lora_id: str | None = None) -> np.ndarray:
        try:
            value, _ = self.cache.get_or_compute(self.key(input_ids, lora_id), encode, rows=input_ids.shape[0])
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


@dataclass(frozen=True)
class DenoiseRequest:
    """One denoise request's values (what preprocess resolved and text_encoder encoded)."""
    text_embeddings: np.ndarray   # (2B, L, D), uncond rows first
    seed: list                    # one seed, or one per image
    steps: int
    guidance: float
    width: int
    height: int
    # The resolved edit (api.IMAGE, MASK, STRENGTH): 0 rows (or None) when the request sent no IMAGE_IN.
    image: np.ndarray | None = field(default=None, metadata={"edit": True})
    mask: np.ndarray | None = field(default=None, metadata={"edit": True})
    strength: float = field(default=0.0, metadata={"edit": True})

    @property
    def edits(self) -> bool:
        return self.image is not None and np.asarray(self.image).size > 0

    def options(self) -> dict:
        """run_loop's keywords besides the text embeddings (the text-to-image values)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "text_embeddings" and not f.metadata.get("edit")}

    def edit_options(self) -> dict:
        """run's edit keywords (empty when the request edits nothing)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("edit")} if self.edits else {}


class Denoiser:
    """DPM-Solver++ with classifier-free guidance over a UNet given as a callable (`run`, the host loop: a BLS
    call to the `unet` model, or the engine denoise owns) or in a device loop (`run_loop`, `run_batch`)."""

    def __init__(self, pipeline: Path, info: BuildInfo, tiling: str | None = None):
        from toonark.family import family_for_folder
        self.info = info
        self.family = family_for_folder(pipeline)
        self.scheduler = self.family.sampler(pipeline)
        self.tile, self.tile_overlap = tile_settings(tiling)
        self.last_unet_seconds: list[float] = []
        self.last_plan = None

    def initial_latents(self, seed, batch: int, height: int, width: int) -> np.ndarray:
        """The starting noise exactly as the offline pipeline draws it. seed: one int (the batch's noise from
        one generator) or one per image (each image's noise drawn alone: NUM_IMAGES requests)."""
        from toonark import pipeline as offline
        seeds = [int(s) for s in np.asarray(seed).reshape(-1)]
        sigma, dims = self.scheduler.init_noise_sigma, self.info.dims
        if len(seeds) == 1:
            return offline.initial_latents(seeds[0], batch, dims, height, width, init_noise_sigma=sigma)
        if len(seeds) == batch:
            return np.concatenate([offline.initial_latents(s, 1, dims, height, width, init_noise_sigma=sigma)
                                   for s in seeds])
        raise RequestError(f"{len(seeds)} seeds for {batch} images; send 1 or one per image")

    @staticmethod
    def _batch(text_embeddings: np.ndarray) -> int:
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] % 2:
            raise RequestError(f"text embeddings of shape {list(text_embeddings.shape)} are not (2B, L, D)")
        return text_embeddings.shape[0] // 2

    def tile_plan(self, height: int, width: int):
        """toonark.tiling.TilePlan of a size: tiled above the profile."""
        from toonark import tiling
        return tiling.TilePlan.for_size(self.info.limits, self.info.dims, height, width, self.tile, self.tile_overlap)

    def device_loop_takes(self, item: DenoiseRequest) -> bool:
        """Whether a device loop (run_loop, run_batch) can run `item`: text-to-image at a size within the
        profile. An edit (the VAE encoder's start, the inpainting blend every step) or a size above the profile
        (UNet tiles) runs the host loop, `run`, which does both as the offline pipeline does."""
        return not item.edits and not self.tile_plan(item.height, item.width).tiled

    def run(self, text_embeddings: np.ndarray, *, seed: int | list[int], steps: int, guidance: float, width: int,
            height: int, unet: UnetCall, float_dtype=np.float32, image: np.ndarray | None = None,
            mask: np.ndarray | None = None, strength: float = 0.0, vae_encoder=None) -> np.ndarray:
        """The host loop: latents ready for the VAE decoder (the family's latents_to_vae: divided by
        vae_scaling_factor), one `unet` call per step (per tile group above the profile). seed: see
        initial_latents. image / mask / strength: the resolved edit (api.IMAGE, MASK, STRENGTH; 0 rows = none);
        vae_encoder: pixels -> encoder parameters (a BLS call, tiled above the profile by the vae_encoder model
        itself). Sizes above the profile run the UNet in tiles (toonark.tiling.TiledUnet; last_plan says which)."""
        from toonark import tiling
        from toonark import pipeline as offline
        batch = self._batch(text_embeddings)
        dims = self.info.dims
        unet_spec = self.info.specs["unet"]
        io = "fp16" if np.dtype(float_dtype) == np.float16 else "fp32"
        seeds = [int(s) for s in np.asarray(seed).reshape(-1)]
        latents = self.initial_latents(seeds, batch, height, width)

        def typed_unet(feeds: dict) -> np.ndarray:
            # Float inputs in the unet engine's I/O precision ("float" in the spec), fixed dtypes as declared.
            return unet({t.name: feeds[t.name].astype(t.numpy_dtype(io), copy=False) for t in unet_spec.inputs})

        schedule = self.scheduler.schedule(steps)
        plan = self.tile_plan(height, width)
        self.last_plan = plan
        call = tiling.TiledUnet(typed_unet, plan, 2 * self.info.limits.max_batch) if plan.tiled else typed_unet
        edit_plan = None
        if image is not None and np.asarray(image).size:
            from toonark.editing import EditPlan
            from toonark.image_input import EditInput
            if vae_encoder is None:
                raise RequestError("IMAGE_IN needs the VAE encoder, which this repository does not serve; "
                                   "regenerate it with `make repo` after `make engine`")
            edit = EditInput(np.asarray(image, np.float32), np.asarray(mask, np.float32) if mask is not None and
                             np.asarray(mask).size else None, float(strength))
            edit_plan = EditPlan.build(edit, vae_encoder, schedule, seeds, latents, dims, dims.unet_channels,
                                       self.scheduler.init_noise_sigma)
            latents = edit_plan.latents
        latents, unet_ms, _ = offline.denoise_latents(self.scheduler, latents, text_embeddings, schedule, guidance,
                                                      call, edit=edit_plan)
        self.last_unet_seconds = [ms / 1e3 for ms in unet_ms]
        return self.family.latents_to_vae(latents, dims)

    def run_loop(self, text_embeddings: np.ndarray, *, seed, steps: int, guidance: float, width: int, height: int,
                 loop) -> np.ndarray:
        """The device loop: the same request on `loop` (a DeviceLoop that owns the UNet, or a BlsDeviceLoop
        that calls it by BLS with device tensors): the latents stay on the device for every step and come
        back once, already scaled for the VAE decoder. Text-to-image within the profile only (callers route
        the rest to `run`, see device_loop_takes)."""
        batch = self._batch(text_embeddings)
        latents = self.initial_latents(seed, batch, height, width)
        config = self.scheduler.config
        start = time.perf_counter()
        out = loop.latents_for_vae(text_embeddings, latents, self.scheduler.schedule(steps), guidance,
                                   solver_order=config.solver_order, prediction_type=config.prediction_type)
        self.last_unet_seconds = [(time.perf_counter() - start) / max(steps, 1)] * steps
        return out

    def run_batch(self, items: list[DenoiseRequest], loop_for, buckets=(1, 2, 4), pad: bool = False) -> list:
        """Several requests in shared device loops (the batched loop model). Requests with the same steps,
        guidance and size share a loop, in chunks of bucket sizes (images); each chunk's text rows are the
        requests' uncond rows, then their cond rows (the step graph's CFG split). pad: a chunk between two
        bucket sizes runs at the next bucket up with its first image repeated in the spare rows (3 images -> the
        B=4 graph); off (the served default): it is split into bucket sizes (2 + 1), measured cheaper on the
        H200 with the fused ORT UNet (389 ms vs 421 ms for 3 images, benchmarks/gpu_served.py `ceiling`). Returns one result per item, in order: its
        latents for the VAE, or the exception that refused it."""
        results: list = [None] * len(items)
        ready = []
        for index, item in enumerate(items):
            try:
                batch = self._batch(item.text_embeddings)
                ready.append((index, batch, self.initial_latents(item.seed, batch, item.height, item.width)))
            except Exception as err:   # noqa: BLE001 - this request is refused, the others run
                results[index] = err
        groups: dict = {}
        for entry in ready:
            item = items[entry[0]]
            groups.setdefault((item.steps, item.guidance, item.width, item.height), []).append(entry)
        config = self.scheduler.config
        for (steps, guidance, width, height), entries in groups.items():
            for chunk in _chunks(entries, buckets, pad):
                try:
                    images = sum(b for _, b, _ in chunk)
                    spare = next((b for b in sorted(buckets) if b >= images), images) - images if pad else 0
                    texts = [np.asarray(items[i].text_embeddings, np.float32) for i, _, _ in chunk]
                    first = (texts[0][:1], texts[0][chunk[0][1]:chunk[0][1] + 1], chunk[0][2][:1])
                    text = np.concatenate([t[: b] for t, (_, b, _) in zip(texts, chunk)] + [first[0]] * spare
                                          + [t[b:] for t, (_, b, _) in zip(texts, chunk)] + [first[1]] * spare)
                    latents = np.concatenate([lat for _, _, lat in chunk] + [first[2]] * spare)
                    loop = loop_for(latents.shape[0], height, width)
                    out = loop.latents_for_vae(text, latents, self.scheduler.schedule(steps), guidance,
                                               solver_order=config.solver_order, prediction_type=config.prediction_type)
                    start = 0
                    for index, batch, _ in chunk:
                        results[index] = out[start:start + batch]
                        start += batch
                except Exception as err:   # noqa: BLE001 - the chunk's requests fail alike, others run
                    for index, _, _ in chunk:
                        results[index] = err
        return results


def _chunks(entries: list, buckets, pad: bool = False) -> list[list]:
    """Consecutive entries (index, images, latents) in chunks of at most the largest bucket's images; without
    pad, chunks whose image counts are bucket sizes where they can be (a CUDA graph each), largest first (with
    pad the caller fills a chunk up to the next bucket instead). An entry larger than every bucket runs alone."""
    chunks, current, images = [], [], 0
    largest = max(buckets)
    for entry in entries:
        if current and images + entry[1] > largest:
            chunks.append(current)
            current, images = [], 0
        current.append(entry)
        images += entry[1]
    if current:
        chunks.append(current)
    if pad:
        return chunks
    out = []
    for chunk in chunks:   # 3 images -> 2 + 1: both replay graphs
        total = sum(e[1] for e in chunk)
        if total in buckets or len(chunk) == 1:
            out.append(chunk)
            continue
        part, count = [], 0
        for entry in chunk:
            if part and (count + entry[1]) not in buckets and count in buckets:
                out.append(part)
                part, count = [], 0
            part.append(entry)
            count += entry[1]
        out.append(part)
    return out


class UnetLoops:
    """The UNet engine owned by `denoise` (python layout): on ort-cuda one DeviceLoop per CUDA-graph size
    ("bucket": batch, height, width; one ORT session each, captured on first use) plus one dynamic-shape loop
    for every other size; on ort-cpu the engine itself, called by the host loop (same bytes as the BLS path).
    """

    def __init__(self, engine_path: Path, spec, metadata: dict, dims, family, *, threads: int | None = None,
                 spinning: bool | None = None, graph_sizes: list[dict] = (), lora: dict | None = None,
                 idle_s: float = 0.0, log=None):
        """lora: {"params": the config's parameters, "loras": <repo>/loras} for a LoRA repository (ort-cpu host loop:
        the UNet engine is engines.lora's LoraOrtEngine, switched per request by unet_call's lora=)."""
        import threading
        from toonark.engines.backends import backend_for
        self.path, self.spec, self.metadata, self.dims, self.family = engine_path, spec, metadata, dims, family
        self.backend = backend_for(metadata["backend"])
        self.options = {"threads": threads, **({"spinning": spinning} if spinning is not None else {})}
        self.on_cuda = self.backend.serves_cuda_graphs
        if lora is not None and self.on_cuda:
            raise ValueError("LoRA styles in an in_process denoise run the host loop on ort-cpu only; serve them with "
                             "unet_loop bls on CUDA (regenerate the repository with `make repo`)")
        self.graph_sizes = [dict(s) for s in graph_sizes] if self.on_cuda else []
        # request batching chunks images into these sizes (one CUDA graph each; any size on the CPU)
        self.buckets = tuple(sorted({s["B"] for s in self.graph_sizes})) or (1, 2, 4)
        self._loops: dict = {}
        self._lora = lora
        self.engine = None if self.on_cuda and lora is None else self._load_host()
        # Idle unload (make serve IDLE_UNLOAD_S=N): after idle_s seconds without a request every session and
        # CUDA graph is freed; the next request loads (and captures) again inside busy(). The UNet is what
        # holds the GPU memory, so the model that owns it frees it (IdleEngine does the same for engine models).
        self.idle_s, self._log = float(idle_s), log
        self._lock = threading.RLock()
        self.last_used = time.monotonic()
        self.unloads = 0
        if self.idle_s > 0:
            threading.Thread(target=self._watch, name="toonark-idle-unload", daemon=True).start()

    def busy(self):
        """Hold the loops for one execute (the idle watcher waits for it to end)."""
        import contextlib

        @contextlib.contextmanager
        def held():
            with self._lock:
                reloading = self.unloads > 0 and not self._loops and self.engine is None
                start = time.monotonic()
                try:
                    yield self
                finally:
                    self.last_used = time.monotonic()
                    if reloading and self._log:
                        self._log(f"idle unload: UNet loaded again in {self.last_used - start:.2f} s for a request "
                                  "(its loop, CUDA graph capture included)")
        return held()

    def _watch(self) -> None:
        import gc
        while True:
            time.sleep(min(1.0, self.idle_s / 4))
            with self._lock:
                loaded = bool(self._loops) or self.engine is not None
                if loaded and time.monotonic() - self.last_used >= self.idle_s:
                    self._loops.clear()
                    self.engine = None
                    self.unloads += 1
                    gc.collect()
                    if self._log:
                        self._log(f"idle unload: UNet session freed (its CUDA graphs too) after {self.idle_s:g} s "
                                  "without requests")

    def _load(self, **options):
        return self.backend.load(self.path, self.spec, self.metadata, **self.options, **options)

    def loop_for(self, batch: int, height: int, width: int):
        """The DeviceLoop for one request size (created on first use; its graph captured on its first run)."""
        from toonark.engines.ort_loop import DeviceLoop
        if not self.on_cuda:   # ort-cpu: one loop over the engine serves every size (the batched loop model)
            if "cpu" not in self._loops:
                self._loops["cpu"] = DeviceLoop({"unet": self.host_engine()}, self.dims, self.family)
            return self._loops["cpu"]
        key = {"B": batch, "H": height, "W": width}
        bucket = next((tuple(sorted(s.items())) for s in self.graph_sizes if s == key), None)
        name = bucket or "dynamic"
        if name not in self._loops:
            engine = self._load(cuda_graph=True, graph_sizes=key, fallback=False) if bucket else self.host_engine()
            self._loops[name] = DeviceLoop({"unet": engine}, self.dims, self.family)
        return self._loops[name]

    def host_engine(self):
        """The engine the host loop calls with numpy (Denoiser.run: the CPU's every request; on ort-cuda the
        requests a device loop does not take, edits and tiled sizes): on ort-cuda the dynamic-shape session,
        created on first use and shared with the dynamic-size DeviceLoop."""
        if self.engine is None:
            self.engine = self._load_host()
        return self.engine

    def _load_host(self):
        """The host loop's engine: a LoRA repository's LoraOrtEngine, else the plain (dynamic-shape) session."""
        if self._lora is not None:
            return load_lora_runner(self.path.parent, self.spec, self.metadata, self._lora["params"],
                                    loras=self._lora["loras"], **self.options)
        return self._load()

    def unet_call(self, lora: dict | None = None) -> UnetCall:
        """The host loop's UNet; lora: {"lora": name, "scale": scale} of the request (a LoRA repository)."""
        output = self.spec.output_names[0]
        engine = self.host_engine()
        options = lora or {}
        return lambda feeds: engine.run(feeds, **options)[output]


def parse_graph_sizes(text: str) -> list[dict[str, int]]:
    """"B=1,H=512,W=512;B=2,H=512,W=512" -> [{"B": 1, "H": 512, "W": 512}, ...] (config parameter format)."""
    sizes = []
    for bucket in (b for b in text.split(";") if b.strip()):
        sizes.append({k.strip(): int(v) for k, v in (item.split("=") for item in bucket.split(",") if item.strip())})
    return sizes


def call_with_retry(call, retryable, *, attempts: int = 3, delay_s: float = 0.05, sleep=time.sleep):
    """call() until it returns something `retryable(result)` rejects, at most `attempts` times with
    doubling delays (BLS answers UNAVAILABLE while the callee's queue is full or its stub restarts: a
    bounded retry rides that out; anything else is returned at once)."""
    for attempt in range(attempts):
        result = call()
        if attempt == attempts - 1 or not retryable(result):
            return result
        sleep(delay_s * 2 ** attempt)
    return result


class BlsDeviceLoop:
    """DPM-Solver++ on the device around a UNet served by another model (onnxruntime_onnx / tensorrt_plan
    layouts): the step graph (toonark.engines.ort_loop) runs in this process on ORT's CUDA EP (or CPU), and
    each step's BLS call hands the UNet the device buffers by DLPack and takes its output the same way
    (`unet(feeds) -> DLPack tensor`, feeds: {name: object with __dlpack__ or numpy for the timestep}).
    Nothing but the timestep and six coefficients leaves the device between steps."""

    def __init__(self, unet, dims, family, *, on_cuda: bool, device_id: int = 0, unet_dtype=np.float32,
                 names=None):
        import onnxruntime as ort
        from toonark.engines.ort_loop import step_session
        from toonark.specs import SD
        self.ort, self.unet, self.dims, self.family = ort, unet, dims, family
        self.on_cuda, self.device_id, self.unet_dtype = on_cuda, device_id, np.dtype(unet_dtype)
        self.dev = "cuda" if on_cuda else "cpu"
        self.sd = SD
        self.step = step_session(on_cuda, device_id, self.unet_dtype)
        self._coef = np.zeros(6, np.float32)
        self._coef_value = ort.OrtValue.ortvalue_from_numpy(self._coef)
        self._buffers: dict = {}

    def _value(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype.type, self.dev,
                                                               self.device_id)
        value.update_inplace(array)
        return value

    def latents_for_vae(self, text_embeddings, latents, schedule, guidance: float, solver_order: int = 2,
                        prediction_type: str = "epsilon") -> np.ndarray:
        from toonark.engines.dlpack import OrtValueView, borrow
        from toonark.scheduler import step_coefficients
        sd = self.sd
        latents = np.ascontiguousarray(latents, np.float32)
        text = self._value(np.asarray(text_embeddings, self.unet_dtype))
        sample = self._value(np.concatenate([latents, latents]).astype(self.unet_dtype))
        # zero-filled: the first step multiplies m_prev by c = 0 (0 * NaN would be NaN)
        x = [self._value(latents), self._value(np.zeros_like(latents))]
        m = [self._value(np.zeros_like(latents)), self._value(np.zeros_like(latents))]
        final = self._value(np.zeros_like(latents))
        views = {sd.sample: OrtValueView(sample, self.device_id),
                 sd.encoder_hidden_states: OrtValueView(text, self.device_id)}
        cur, steps = 0, len(schedule)
        for i in range(steps):
            timestep = np.full((1,), schedule.timesteps[i], np.float32)
            noise = borrow(self.unet({**views, sd.timestep: timestep}))
            last = i == steps - 1
            self._coef[:] = step_coefficients(schedule, i, guidance, solver_order=solver_order,
                                              prediction_type=prediction_type,
                                              out_scale=self.family.vae_input_scale(self.dims) if last else 1.0)
            binding = self.step.io_binding()
            binding.bind_input("noise_pred", *noise.ort_binding())
            for name, value in (("x", x[cur]), ("m_prev", m[cur]), ("coef", self._coef_value)):
                binding.bind_ortvalue_input(name, value)
            for name, value in (("x_next", final if last else x[1 - cur]), ("m0", m[1 - cur]), ("unet_sample", sample)):
                binding.bind_ortvalue_output(name, value)
            self.step.run_with_iobinding(binding)
            del noise   # the UNet's output buffer may go back to Triton now
            cur = 1 - cur
        return np.array(final.numpy(), copy=True)


class QwenImageDenoiser:
    """Qwen-Image's denoise (toonark.qwen_pipeline, the offline code): the text encoder's hidden states and
    the token ids -> template tokens dropped, padding masked, RoPE, flow-matching Euler with true CFG over
    a transformer given as a callable (the Triton model's BLS call to `transformer`) -> the VAE decoder's
    input (unpacked, per-channel normalised). Same noise, schedule and math as the offline pipeline."""

    def __init__(self, pipeline: Path, info: BuildInfo):
        from toonark.family import family_for_folder
        from toonark.tokenizer import QwenTokenizer
        self.info = info
        self.family = family_for_folder(pipeline)
        self.scheduler = self.family.sampler(pipeline)
        tokenizer_config = Path(pipeline) / "tokenizer"
        self.pad_id = QwenTokenizer.from_folder(tokenizer_config).pad_id if tokenizer_config.is_dir() else None
        self.last_unet_seconds: list[float] = []

    def run(self, text_embeddings: np.ndarray, *, seed, steps: int, guidance: float, width: int, height: int,
            unet: UnetCall, float_dtype=np.float32, input_ids: np.ndarray | None = None) -> np.ndarray:
        from toonark.qwen_pipeline import denoise
        if input_ids is None or self.pad_id is None:
            raise RequestError("Qwen-Image's denoise needs the token ids (input_ids) and the tokenizer; regenerate "
                               "the repository with `make repo`")
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] % 2 or input_ids.shape[:2] != text_embeddings.shape[:2]:
            raise RequestError(f"text embeddings of shape {list(text_embeddings.shape)} do not fit token ids of shape "
                               f"{list(input_ids.shape)}; expected (2B, L, D) and (2B, L)")
        family, dims = self.family, self.info.dims
        batch = text_embeddings.shape[0] // 2
        seeds = [int(s) for s in np.asarray(seed).reshape(-1)]
        if len(seeds) == 1:
            latents = family.initial_latents(seeds[0], batch, dims, height, width)
        elif len(seeds) == batch:
            latents = np.concatenate([family.initial_latents(s, 1, dims, height, width) for s in seeds])
        else:
            raise RequestError(f"{len(seeds)} seeds for {batch} images; send 1 or one per image")
        lengths = family.token_lengths(input_ids, self.pad_id)
        embeds, mask = family.text_conditioning(text_embeddings.astype(np.float32), lengths, dims)
        img_rope, txt_rope = family.rope(dims, height, width, embeds.shape[1])
        spec = self.info.specs["transformer"]
        io = "fp16" if np.dtype(float_dtype) == np.float16 else "fp32"
        conditioning = {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                        "img_rope": img_rope, "txt_rope": txt_rope}

        def typed(feeds: dict) -> np.ndarray:
            return unet({t.name: feeds[t.name].astype(t.numpy_dtype(io), copy=False) for t in spec.inputs})

        latents, step_ms = denoise(self.scheduler, latents, conditioning,
                                   self.scheduler.schedule(steps, latents.shape[1]), guidance, typed)
        self.last_unet_seconds = [ms / 1e3 for ms in step_ms]
        h, w = family.latent_grid(dims, height, width)
        return family.latents_to_vae(family.unpack_latents(latents, h, w, dims.patch_size), dims)


def denoiser_for(pipeline: Path, info: BuildInfo, tiling: str | None = None):
    """The denoise object of the build's model family: {family name: class}; tiling: the `tiling` parameter of
    a family that tiles sizes above the profile."""
    from toonark.family import family_for_folder
    family = family_for_folder(pipeline)
    if family.tiles_large_images:
        return Denoiser(pipeline, info, tiling)
    return {"qwen-image": QwenImageDenoiser}[family.name](pipeline, info)


# --- postprocess ----------------------------------------------------------------------------------

def postprocess_outputs(decoded: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> tuple[list[bytes], np.ndarray]:
    """(B, 3, H, W) VAE output in [-1, 1] -> (IMAGE, PIXELS): for png / webp the encoded images and an empty
    (0, 0, 0, 3) pixel tensor; for raw B empty byte strings and the uint8 (B, H, W, 3) pixels (the pixels
    the PNG of the same request encodes)."""
    from toonark import pipeline as offline
    if fmt == RAW_FORMAT:
        pixels = np.ascontiguousarray(offline.to_uint8_hwc(np.asarray(decoded, dtype=np.float32)))
        return [b""] * len(pixels), pixels
    return encode_images(decoded, fmt, quality), np.zeros((0, 0, 0, 3), np.uint8)


def encode_images(decoded: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> list[bytes]:
    """(B, 3, H, W) VAE output in [-1, 1] -> one encoded image per batch item (quality: WebP only)."""
    from toonark import pipeline as offline
    if fmt not in IMAGE_FORMATS or fmt == RAW_FORMAT:
        encoded = [f for f in IMAGE_FORMATS if f != RAW_FORMAT]
        raise RequestError(f"FORMAT {fmt!r} is not an encoding; use one of {', '.join(encoded)}")
    images = offline.to_uint8_hwc(np.asarray(decoded, dtype=np.float32))
    return [encode_png(image) if fmt == "png" else encode_webp(image, quality) for image in images]


def png_encoder():
    """(name, encode) of the PNG encoder: fpng (Rich Geldreich's fpng through the `fpng` wheel, a toonark
    dependency): 512x512 in about 1 ms where Pillow's zlib takes tens of ms (benchmarks/encode_candidates.py,
    README "Speed"); its files are a little larger than zlib level 6 on smooth pictures, any PNG reader reads
    them. Without the wheel (a machine set up from older wheel parts): Pillow at zlib level 1 with the RLE
    strategy, the fastest Pillow setting measured, and a warning, so the server still answers."""
    global _PNG
    if _PNG is None:
        try:
            import fpng
            _PNG = ("fpng", lambda image: bytes(fpng.from_ndarray(np.ascontiguousarray(image))))
        except ImportError:
            import logging
            logging.getLogger(__name__).warning("fpng is not installed: PNG falls back to Pillow zlib level 1 (slower; "
                                                "pip install fpng, a toonark dependency)")
            _PNG = ("pillow-zlib1-rle", _pillow_png)
    return _PNG


_PNG = None


def _pillow_png(image: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1, compress_type=3)
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes with png_encoder()."""
    return png_encoder()[1](image)


def encode_webp(image: np.ndarray, quality: int) -> bytes:
    """uint8 (H, W, 3) -> lossy WebP at `quality`, libwebp method 0 (the fastest: 2.5-3.5x faster than method
    4 for ~20 % more bytes on the kids' pictures; benchmarks/encode_candidates.py)."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", quality=int(quality), method=0)
    return buffer.getvalue()


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
        self.spec = self.engine.spec   # the submodel's declaration, the same for every load
        # The LoRA runner's switch statistics (engines.lora): those of the latest load, kept while unloaded
        # (a new load starts them at 0 again).
        self.stats = getattr(self.engine, "stats", None)
        self.last_used = self._clock()
        self.loads = 1
        self.last_load_s: float | None = None
        if self.idle_s > 0:
            self._stop = threading.Event()
            threading.Thread(target=self._watch, name="toonark-idle-unload", daemon=True).start()

    def run(self, feeds: dict, **options) -> dict:
        """`options`: the engine's own (the LoRA runner's lora= / scale=)."""
        with self._lock:
            if self.engine is None:
                start = self._clock()
                self.engine = self._load()
                self.stats = getattr(self.engine, "stats", None)
                self.loads += 1
                self.last_load_s = self._clock() - start
                if self._log:
                    self._log(f"idle unload: loaded again in {self.last_load_s:.2f} s for a request")
            self.last_used = self._clock()
            engine = self.engine
            result = engine.run(feeds, **options)
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

def _spinning(params: dict) -> bool | None:
    """intra_op_spinning 0: ORT workers sleep when idle (the generator's choice on the CPU, issue 12);
    absent: ORT's default (spin)."""
    return bool(params["intra_op_spinning"]) if "intra_op_spinning" in params else None


def unet_loops(args: dict, params: dict, log=None) -> UnetLoops:
    """The UNet engine `denoise` owns (unet_loop=in_process): <denoise>/1/unet/ holds the engine and its
    engine.json, linked there by the generator; cuda_graph_sizes lists the CUDA-graph buckets ("B=1,H=512,
    W=512;B=2,..."), other sizes run a dynamic session."""
    from toonark.family import family_for_folder
    folder = version_dir(args) / "unet"
    metadata_path = folder / "engine.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} is missing; regenerate the repository with `make repo`")
    info = build_info(args)
    # A LoRA repository: the styles in <repo>/loras, the UNet's base weights beside its engine (write_repo).
    lora = ({"params": params, "loras": Path(args["model_repository"]).parent / LORA_FOLDER}
            if "lora_cache_size" in params else None)
    return UnetLoops(folder / params.get("engine_file", "model.onnx"), info.specs["unet"],
                     json.loads(metadata_path.read_text()), info.dims, family_for_folder(pipeline_dir(args)),
                     threads=params.get("intra_op_threads") or None, spinning=_spinning(params),
                     graph_sizes=parse_graph_sizes(params.get("cuda_graph_sizes", "")), lora=lora,
                     idle_s=idle_unload_seconds(), log=log)


def load_runner(args: dict, params: dict, name: str | None = None):
    """The engine of a served submodel, from <model>/1/ (model.onnx + engine.json + pipeline/toonark.json),
    loaded by the backend object engine.json names (the python layout serves ONNX Runtime engines). name: an
    engine the model owns besides its own, from <model>/1/<name>/ (an in_process denoise's vae_encoder)."""
    from toonark.engines.backends import backend_for
    folder = version_dir(args) / name if name else version_dir(args)
    name = name or json.loads(args["model_config"])["name"]
    spec = build_info(args).specs[name]
    metadata_path = folder / "engine.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} is missing; regenerate the repository with `make repo`")
    metadata = json.loads(metadata_path.read_text())
    threads = params.get("intra_op_threads") or None
    spinning = _spinning(params)
    # "B=1,H=512,W=512": replay a CUDA graph at that size (ort-cuda; other sizes use a dynamic session).
    sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in params.get("cuda_graph_sizes", "").split(",")
                                            if item.strip())}
    options = {"spinning": spinning} if spinning is not None else {}
    if "lora_cache_size" in params:   # a LoRA repository: the engine switches styles per request
        return load_lora_runner(folder, spec, metadata, params, threads=threads, cuda_graph=bool(sizes),
                                graph_sizes=sizes or None, **options)
    engine = backend_for(metadata["backend"]).load(
        folder / params.get("engine_file", "model.onnx"), spec, metadata, threads=threads, cuda_graph=bool(sizes),
        graph_sizes=sizes or None, **options)
    if name in ("vae_decoder", "vae_encoder") and params.get("tiling"):
        # Pictures above the profile: decoded / encoded in Hann-blended tiles (the offline pipeline wraps the same way).
        return TiledRunner(engine, build_info(args), *tile_settings(params.get("tiling")))
    return engine


def tile_settings(tiling: str | None) -> tuple[int | None, int | None]:
    """(tile, overlap) pixels from the `tiling` config parameter (None: the profile's defaults)."""
    if not tiling:
        return None, None
    from toonark.tiling import parse_tiling_parameter
    values = parse_tiling_parameter(tiling)
    return values["tile"], values["overlap"]


class TiledRunner:
    """An engine whose `run` tiles pictures above the profile (toonark.tiling.TiledVae); `spec` as the engine's."""

    def __init__(self, engine, info: BuildInfo, tile: int | None, overlap: int | None):
        from toonark.tiling import TiledVae
        self.engine, self.spec = engine, engine.spec
        self.tiled = TiledVae(engine.run, engine.spec.name, info.limits, info.dims, tile, overlap)

    def run(self, feeds: dict) -> dict:
        return self.tiled.run(feeds)


LORA_FOLDER = "loras"                       # <repo>/loras/: the registered LoRA files
LORA_BASE_FILE = "lora_base.safetensors"    # <model>/1/: fp32 base weights of the adapted layers (+ Q/K/V siblings)
LORA_TARGETS_FILE = "lora_targets.json"     # <model>/1/: {submodel: {module: shape}} of every adaptable layer


def load_lora_runner(folder: Path, spec, metadata: dict, params: dict, loras: Path | None = None, **options):
    """toonark.engines.lora.LoraOrtEngine over `folder`'s engine (<model>/1/, or denoise/1/unet/ of an in_process
    denoise), the base weights beside it and the registered styles (loras: default <repo>/loras)."""
    from toonark.engines.lora import LoraBase, LoraOrtEngine, LoraSet
    shapes = {sub: {m: tuple(v) for m, v in modules.items()}
              for sub, modules in json.loads((folder / LORA_TARGETS_FILE).read_text()).items()}
    loras = LoraSet.from_folder(loras or folder.parent.parent / LORA_FOLDER, shapes)
    return LoraOrtEngine(folder / params.get("engine_file", "model.onnx"), spec, metadata,
                         LoraBase.load(folder / LORA_BASE_FILE), loras, cache_size=params["lora_cache_size"],
                         strategy=params.get("lora_strategy", "inplace"), **options)


class LoraSwitchCounter:
    """An engine's LoRA switch statistics (engines.lora: cache_hits, cache_misses, seconds) reported as the deltas of
    toonark_lora_switches_total{stage, cache} and toonark_lora_switch_seconds_total{stage}."""

    def __init__(self, metrics, stage: str):
        self.metrics, self.stage = metrics, stage
        self.last = (0, 0, 0.0)

    def report(self, stats, restarted: bool = False) -> None:
        """restarted: the engine was loaded again (idle unload), its statistics start from 0."""
        hits, misses, seconds = (0, 0, 0.0) if restarted else self.last
        self.metrics.count("toonark_lora_switches_total", stats.cache_hits - hits, stage=self.stage, cache="hit")
        self.metrics.count("toonark_lora_switches_total", stats.cache_misses - misses, stage=self.stage, cache="miss")
        self.metrics.count("toonark_lora_switch_seconds_total", stats.seconds - seconds, stage=self.stage)
        self.last = (stats.cache_hits, stats.cache_misses, stats.seconds)
