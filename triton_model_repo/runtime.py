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
from pathlib import Path
from typing import Callable

import numpy as np

from toonark.api import (DEFAULT_QUALITY, IMAGE_FORMATS, RequestError, ResolvedRequest, Serves,  # noqa: F401
                         one_value, resolve_request, text_value)
from toonark.specs import BuildInfo

# Every config parameter a toonark model reads, with its type (config parameters are strings).
PARAMETER_TYPES: dict[str, type] = {
    "default_seed": int, "default_guidance": float,
    "default_width": int, "default_height": int, "default_format": str,
    "unet_model": str, "unet_output": str, "unet_float_type": str, "text_hidden_name": str, "latent_name": str,
    "engine_file": str, "intra_op_threads": int, "cuda_graph_sizes": str,
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
}


class UpstreamError(RuntimeError):
    """A model this one called (BLS) answered with an error: passed on with that model's error code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


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
        self.known_loras = tuple(n for n in params.get("lora_names", "").split(",") if n)
        # Whether a VAE encoder is served and whether sizes above the profile are tiled (the python layout).
        self.serves = Serves(images=bool(params.get("image_input", 0)), tiled_sizes=bool(params.get("tiled_sizes", 0)))

    def prepare(self, **inputs) -> tuple[ResolvedRequest, np.ndarray]:
        """One request's ensemble inputs (keyword = the input's name in lower case; None = not sent)."""
        resolved = resolve_request(self.info, self.policy, self.defaults, self.serves, self.known_loras, **inputs)
        return resolved, resolved.input_ids(self.tokenizer, self.family, self.info.dims)


# --- denoise --------------------------------------------------------------------------------------

UnetCall = Callable[[dict], np.ndarray]   # {sample, timestep, encoder_hidden_states} -> out_sample


class Denoiser:
    """DPM-Solver++ with classifier-free guidance over a UNet given as a callable
    (the Triton model passes a BLS call to the `unet` model)."""

    def __init__(self, pipeline: Path, info: BuildInfo, tiling: str | None = None):
        from toonark.family import family_for_folder
        self.info = info
        self.family = family_for_folder(pipeline)
        self.scheduler = self.family.sampler(pipeline)
        self.tile, self.tile_overlap = tile_settings(tiling)
        self.last_unet_seconds: list[float] = []
        self.last_plan = None

    def run(self, text_embeddings: np.ndarray, *, seed: int | list[int], steps: int, guidance: float, width: int,
            height: int, unet: UnetCall, float_dtype=np.float32, image: np.ndarray | None = None,
            mask: np.ndarray | None = None, strength: float = 0.0, vae_encoder=None) -> np.ndarray:
        """Latents ready for the VAE decoder (the family's latents_to_vae: divided by vae_scaling_factor).
        seed: one int (the batch's noise from one generator, as the offline pipeline draws it) or one
        seed per image (each image's noise drawn alone: NUM_IMAGES requests).
        image / mask / strength: the resolved edit (api.IMAGE, MASK, STRENGTH; 0 rows = none); vae_encoder:
        pixels -> encoder parameters (a BLS call, tiled above the profile by the vae_encoder model itself).
        Sizes above the profile run the UNet in tiles (toonark.tiling.TiledUnet; last_plan says which)."""
        from toonark import tiling
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

        schedule = self.scheduler.schedule(steps)
        plan = tiling.TilePlan.for_size(self.info.limits, dims, height, width, self.tile, self.tile_overlap)
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
    if "lora_cache_size" in params:   # a LoRA repository: the engine switches styles per request
        return load_lora_runner(folder, spec, metadata, params, threads=threads, cuda_graph=bool(sizes),
                                graph_sizes=sizes or None)
    engine = backend_for(metadata["backend"]).load(
        folder / params.get("engine_file", "model.onnx"), spec, metadata, threads=threads, cuda_graph=bool(sizes),
        graph_sizes=sizes or None)
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


def load_lora_runner(folder: Path, spec, metadata: dict, params: dict, **options):
    """toonark.engines.lora.LoraOrtEngine over <model>/1/'s engine, the base weights and <repo>/loras."""
    from toonark.engines.lora import LoraBase, LoraOrtEngine, LoraSet
    shapes = {sub: {m: tuple(v) for m, v in modules.items()}
              for sub, modules in json.loads((folder / LORA_TARGETS_FILE).read_text()).items()}
    loras = LoraSet.from_folder(folder.parent.parent / LORA_FOLDER, shapes)
    return LoraOrtEngine(folder / params.get("engine_file", "model.onnx"), spec, metadata,
                         LoraBase.load(folder / LORA_BASE_FILE), loras, cache_size=params["lora_cache_size"],
                         strategy=params.get("lora_strategy", "inplace"), **options)
