"""What the Triton Python-backend models of toonark do, importable and testable without Triton.

Each `triton_model_repo/<name>/1/model.py` only parses its config (`model_parameters`), builds
one object from here in `initialize`, and moves tensors in and out in `execute`:

    preprocess   RequestPreparer.prepare   prompts + optional inputs -> input_ids (2B, L), resolved values
    denoise      Denoiser.run              text embeddings -> latents / vae_scaling_factor (unet by callback)
    postprocess  encode_images             decoded (B, 3, H, W) in [-1, 1] -> PNG / WebP bytes
    engines      load_runner               the built engine in <model>/1/ (ONNX Runtime)

The math is the offline pipeline's (toonark.pipeline, toonark.scheduler): same tokenizer,
same seeded noise, same solver, same guidance, same uint8 conversion, so the server's image
equals `Text2ImagePipeline`'s for the same seed.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from toonark.specs import BuildInfo

# Every config parameter a toonark model reads, with its type (config parameters are strings).
PARAMETER_TYPES: dict[str, type] = {
    "default_seed": int, "default_guidance": float,
    "default_width": int, "default_height": int, "default_format": str,
    "unet_model": str, "unet_output": str, "unet_float_type": str, "text_hidden_name": str, "latent_name": str,
    "engine_file": str, "intra_op_threads": int, "cuda_graph_sizes": str,
    "default_quality": int,
    # safety_checker: thresholds of diffusers' StableDiffusionSafetyChecker (comma-separated, one per concept)
    "concept_thresholds": str, "special_care_thresholds": str, "safety_adjustment": float,
}

IMAGE_FORMATS = ("png", "webp")
MAX_NUM_IMAGES = 4          # NUM_IMAGES range 1..4 (and at most the build's max batch)
QUALITY_RANGE = (1, 100)    # WebP quality; PNG is lossless and ignores it
DEFAULT_QUALITY = 90        # WebP quality when a request sends none (the preprocess config may set another)


class RequestError(ValueError):
    """A bad request: sent back to the client as the response's error message, the server stays up.
    `reason` is the safety category when the prompt was refused (a metrics label), else None."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


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

def one_value(values, name: str, default):
    """A scalar request input (absent -> default)."""
    if values is None:
        return default
    flat = np.asarray(values).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value   # BYTES arrays hold bytes


def _texts(values, name: str) -> list[str]:
    out = []
    for value in np.asarray(values, dtype=object).reshape(-1):
        try:
            out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8 text") from None
    return out


@dataclass(frozen=True)
class Resolved:
    """One request's parameters after defaults and checks (preprocess' outputs)."""
    input_ids: np.ndarray        # (2B, L) int64, uncond rows first
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    format: str
    quality: int = DEFAULT_QUALITY
    # NUM_IMAGES requests: one seed per image (SEED + i); empty: the whole batch's noise from `seed`.
    image_seeds: tuple[int, ...] = ()

    def tensors(self, input_ids_name: str) -> dict[str, np.ndarray]:
        return {input_ids_name: self.input_ids,
                "seed": np.array(self.image_seeds or [self.seed], np.int64),
                "quality": np.array([self.quality], np.int32), "steps": np.array([self.steps], np.int32),
                "guidance": np.array([self.guidance], np.float32), "width": np.array([self.width], np.int32),
                "height": np.array([self.height], np.int32),
                "format": np.array([self.format.encode()], dtype=np.object_)}


class RequestPreparer:
    """Kid-safe prompt handling (toonark.prompts: template, safety check, default negative prompt,
    step presets) and tokenization; the one place request defaults are applied."""

    def __init__(self, pipeline: Path, info: BuildInfo, params: dict, policy=None):
        from toonark import pipeline as offline
        from toonark.prompts import PromptPolicy
        self.info = info
        self.params = params
        self.policy = policy or PromptPolicy.load()
        self.tokenizer = offline.load_tokenizer(Path(pipeline) / "tokenizer")
        self._tokenize = offline.tokenize

    def prepare(self, prompt, negative_prompt=None, seed=None, steps=None, guidance=None, width=None, height=None,
                format=None, preset=None, num_images=None, quality=None) -> Resolved:
        """One request's ensemble inputs (keyword = the input's name in lower case; None = not sent)."""
        p = self.params
        negative, fmt = negative_prompt, format
        if prompt is None:   # preprocess declares PROMPT optional so that this message reaches the client
            raise RequestError("PROMPT is missing: send one prompt per image (a BYTES tensor of shape [B])")
        subjects = _texts(prompt, "PROMPT")
        if not subjects:
            raise RequestError("PROMPT is empty: send one prompt per image")
        extras = _texts(negative, "NEGATIVE_PROMPT") if negative is not None else [None]
        if len(extras) not in (1, len(subjects)):
            raise RequestError(f"NEGATIVE_PROMPT has {len(extras)} entries; send 1 or one per prompt "
                               f"({len(subjects)})")
        count = one_value(num_images, "NUM_IMAGES", None)
        image_seeds: tuple[int, ...] = ()
        seed = int(one_value(seed, "SEED", p["default_seed"]))
        if count is not None:
            count = int(count)
            if not 1 <= count <= MAX_NUM_IMAGES:
                raise RequestError(f"NUM_IMAGES {count} is out of range; use 1..{MAX_NUM_IMAGES}")
            if count > self.info.limits.max_batch:
                raise RequestError(f"NUM_IMAGES {count} is more than this build serves per request "
                                   f"({self.info.limits.max_batch}, its max batch); ask for fewer, or re-export with "
                                   f"`scripts/export.py --max-batch {count}`, then `make engine`")
            if len(subjects) != 1 and count != 1:
                raise RequestError(f"NUM_IMAGES repeats one prompt, but {len(subjects)} prompts were sent; send "
                                   f"one PROMPT with NUM_IMAGES, or one prompt per image without it")
            subjects = subjects * count
            # Image i is drawn from seed SEED + i alone: the same picture a NUM_IMAGES=1 request with that seed gets.
            image_seeds = tuple(seed + i for i in range(count))
        quality = int(one_value(quality, "QUALITY", p.get("default_quality", DEFAULT_QUALITY)))
        if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
            raise RequestError(f"QUALITY {quality} is out of range; use {QUALITY_RANGE[0]}..{QUALITY_RANGE[1]} "
                               f"(WebP only; PNG ignores it)")
        guidance = float(one_value(guidance, "GUIDANCE", p["default_guidance"]))
        width = int(one_value(width, "WIDTH", p["default_width"]))
        height = int(one_value(height, "HEIGHT", p["default_height"]))
        fmt = str(text_value(fmt, "FORMAT", p["default_format"])).lower()
        preset = text_value(preset, "PRESET", None)
        if fmt not in IMAGE_FORMATS:
            raise RequestError(f"FORMAT {fmt!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}")
        if not 0.0 <= guidance <= 30.0 or not np.isfinite(guidance):
            raise RequestError(f"GUIDANCE {guidance} is out of range; use 0..30 (7.5 is typical)")
        if not 0 <= seed < 2 ** 63 - max(len(image_seeds) - 1, 0):
            raise RequestError(f"SEED {seed} is out of range; use 0..2**63-1"
                               + (f" minus NUM_IMAGES-1 ({len(image_seeds) - 1})" if len(image_seeds) > 1 else ""))
        try:
            steps = self.policy.steps_for(preset, None if steps is None else int(one_value(steps, "STEPS", None)))
            self.info.limits.check_request(len(subjects), height, width)
            pairs = [self.policy.compose(subject, extras[0 if len(extras) == 1 else i])
                     for i, subject in enumerate(subjects)]
        except (ValueError, TypeError) as err:   # refusals (PromptRefused) name the reason
            raise RequestError(str(err), getattr(err, "category", None)) from None
        prompts, negatives = [a for a, _ in pairs], [b for _, b in pairs]
        input_ids, truncated = self._tokenize(self.tokenizer, negatives + prompts, self.info.dims.text_length)
        # A prompt past the text encoder's window would lose its tail silently: the kid-style words of the
        # template follow the subject, so refuse instead. (Negative prompts are the policy's own words first;
        # a user's extra negative words past the window are dropped, which only weakens the extra steering.)
        for i, cut in enumerate(truncated[len(negatives):]):
            if cut:
                used = len(self.tokenizer.backend.encode(prompts[i], add_special_tokens=False).ids)
                raise RequestError(f"PROMPT{f' {i}' if len(prompts) > 1 else ''} is too long: {used} tokens with the "
                                   f"style words, the text encoder reads {self.info.dims.text_length - 2}; "
                                   f"shorten the subject")
        return Resolved(np.ascontiguousarray(input_ids, dtype=np.int64), seed, steps, guidance, width, height, fmt,
                        quality, image_seeds)


def text_value(values, name: str, default):
    """A scalar text request input (absent -> default), BYTES decoded as UTF-8."""
    value = one_value(values, name, default)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# --- denoise --------------------------------------------------------------------------------------

UnetCall = Callable[[dict], np.ndarray]   # {sample, timestep, encoder_hidden_states} -> out_sample


class Denoiser:
    """DPM-Solver++ with classifier-free guidance over a UNet given as a callable
    (the Triton model passes a BLS call to the `unet` model)."""

    def __init__(self, pipeline: Path, info: BuildInfo):
        from toonark.scheduler import DPMSolverMultistep
        self.info = info
        self.scheduler = DPMSolverMultistep.from_file(Path(pipeline) / "scheduler")
        self.last_unet_seconds: list[float] = []

    def run(self, text_embeddings: np.ndarray, *, seed: int | list[int], steps: int, guidance: float, width: int,
            height: int, unet: UnetCall, float_dtype=np.float32) -> np.ndarray:
        """Latents ready for the VAE decoder (already divided by vae_scaling_factor).
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
        return (latents / np.float32(dims.vae_scaling_factor)).astype(np.float32)


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
    """The engine of a served submodel, from <model>/1/ (model.onnx + engine.json + pipeline/toonark.json)."""
    from toonark.engines.ort import OrtEngine
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
    return OrtEngine(folder / params.get("engine_file", "model.onnx"), spec, metadata, threads=threads,
                     cuda_graph=bool(sizes), graph_sizes=sizes or None)
