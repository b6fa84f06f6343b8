"""The served API, declared once: the `toonark` ensemble's inputs and outputs, the resolved request
tensors that preprocess hands to denoise and postprocess, request defaults and ranges, and the one
resolver of a request.

    resolved = resolve_request(info, policy, prompt=["a happy otter"], seed=3, format="webp")
    ids = resolved.input_ids(tokenizer, family, info.dims)   # (2B, L), refuses a prompt past the window

Read by every user of the API: the Triton models (triton_model_repo/: preprocess resolves, denoise and
postprocess read the resolved names), the repository generator (serving/repository.py writes the
config.pbtxt I/O from these ports), the client and the load tester (serving/), the scripts' defaults
(ports, formats) and the offline pipeline, so offline and served accept exactly the same requests.

A new request input is added here: one Port in ENSEMBLE_INPUTS (its name in lower case is the keyword of
`resolve_request` and the field of serving.client.GenerateOptions), its default and range below, its
check in `resolve_request`; if a later model needs the resolved value, one Port in RESOLVED.

Core module (rank 0): numpy and the stdlib only (Pillow, lazily, through toonark.image_input when IMAGE_IN
arrives); the policy (toonark.prompts) and the tokenizer are passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Port:
    """One tensor of the served API (or of a hand-written model): name, Triton type, dims."""
    name: str
    triton_type: str
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None   # the shape the model sees, when it differs from dims


ENSEMBLE = "toonark"   # the model name clients call

# Defaults of the optional inputs and their ranges (the preprocess config may set other defaults:
# serving.repository writes `config_defaults(info)` into it). Steps, the template and the negative prompt
# come from the prompt policy (toonark/data/prompt_policy.json: presets, default preset).
DEFAULT_SEED = 0
DEFAULT_GUIDANCE = 7.5                   # SD-1.5's usual classifier-free guidance scale
GUIDANCE_RANGE = (0.0, 30.0)
IMAGE_FORMATS = ("png", "webp", "raw")   # raw: the uint8 (B, H, W, 3) pixels in PIXELS, nothing encoded
RAW_FORMAT = "raw"
DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 90                     # WebP quality when a request sends none
QUALITY_RANGE = (1, 100)                 # WebP quality; PNG is lossless and ignores it
MAX_NUM_IMAGES = 4                       # NUM_IMAGES range 1..4 (and at most the build's max batch)
MAX_SEED = 2 ** 63 - 1                   # SEED range 0..MAX_SEED (INT64)
DEFAULT_LORA_SCALE = 1.0                 # LORA_SCALE: the LoRA as trained (toonark.lora.SCALE_RANGE: 0..2)
# STRENGTH (0 < s <= 1) when IMAGE_IN is sent without it: diffusers' defaults (img2img 0.8, inpainting 1.0).
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
# IMAGE_IN / MASK_IN limits (file size, pixels, formats) live in toonark/image_input.py; sizes above the
# profile's max image are made in tiles up to toonark.tiling.MAX_TILED_IMAGE a side.
# Width and height default to the build's opt image size (BuildInfo.limits.opt_image); the build's
# limits (min/max image, image step, max batch) are checked by ShapeLimits.check_request.

# Server ports (tritonserver's own defaults; scripts/serve.py, the launcher, the Makefile's HTTP_PORT...).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_HTTP_URL = f"{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}"
DEFAULT_GRPC_URL = f"{DEFAULT_HOST}:{DEFAULT_GRPC_PORT}"

ENSEMBLE_INPUTS = (
    # Required, but declared optional: Triton 2.51 does not check an ensemble's required inputs and
    # answers a request without PROMPT with "unexpected deadlock"; preprocess says "PROMPT is missing".
    Port("PROMPT", "STRING", (-1,), True),           # one prompt per image (B prompts -> B images)
    Port("NEGATIVE_PROMPT", "STRING", (-1,), True),  # 1 or B strings, appended to the policy's negative prompt
    Port("SEED", "INT64", (1,), True),               # noise seed of the whole request (default DEFAULT_SEED)
    Port("STEPS", "INT32", (1,), True),              # DPM-Solver++ steps (default: the preset's)
    Port("PRESET", "STRING", (1,), True),            # "fast" | "standard" | "hq" (toonark.prompts policy)
    Port("GUIDANCE", "FP32", (1,), True),            # classifier-free guidance scale (GUIDANCE_RANGE)
    Port("WIDTH", "INT32", (1,), True),              # pixels, a multiple of the build's image step
    Port("HEIGHT", "INT32", (1,), True),
    Port("FORMAT", "STRING", (1,), True),            # IMAGE_FORMATS
    Port("NUM_IMAGES", "INT32", (1,), True),         # 1..MAX_NUM_IMAGES images of one PROMPT (<= the build's
                                                     # max batch); image i is drawn from seed SEED + i alone
    Port("QUALITY", "INT32", (1,), True),            # WebP quality (QUALITY_RANGE, default DEFAULT_QUALITY)
    Port("LORA", "STRING", (1,), True),              # a registered LoRA style (`make repo LORAS=dir`); "" = base
    Port("LORA_SCALE", "FP32", (1,), True),          # its strength, LORA_SCALE_RANGE (default DEFAULT_LORA_SCALE)
    Port("IMAGE_IN", "STRING", (1,), True),          # a PNG / WebP / JPEG file to edit (image-to-image)
    Port("MASK_IN", "STRING", (1,), True),           # with IMAGE_IN: white = repaint, black = keep (inpainting)
    Port("STRENGTH", "FP32", (1,), True),            # 0 < s <= 1: how much of IMAGE_IN is redrawn
)
IMAGE_OUTPUT = Port("IMAGE", "STRING", (-1,))        # encoded image bytes, one per prompt (b"" for FORMAT=raw)
# FORMAT=raw: the uint8 pixels (B, H, W, 3), for clients that encode themselves; for png / webp an empty
# (0, 0, 0, 3) tensor (Triton ensembles always return every declared output).
PIXELS_OUTPUT = Port("PIXELS", "UINT8", (-1, -1, -1, 3))
ENSEMBLE_OUTPUTS = (IMAGE_OUTPUT, PIXELS_OUTPUT)
# Only when the build has a safety checker (export/safety_checker.py): True where the image was
# flagged and replaced by a white one. Absent otherwise: no checker ran, so nothing is claimed.
NSFW_OUTPUT = Port("NSFW", "BOOL", (-1,))

# Request parameters after preprocess resolved the defaults: its outputs, denoise's/postprocess' inputs.
# seed holds 1 value (the batch's noise from one generator) or one per image (NUM_IMAGES requests).
SEED, STEPS, GUIDANCE, WIDTH, HEIGHT, FORMAT, QUALITY = (
    Port("seed", "INT64", (-1,)), Port("steps", "INT32", (1,)), Port("guidance", "FP32", (1,)),
    Port("width", "INT32", (1,)), Port("height", "INT32", (1,)), Port("format", "STRING", (1,)),
    Port("quality", "INT32", (1,)))
# The decoded picture to edit (1, 3, H, W) in [-1, 1], its mask (1, 1, H, W) in {0, 1} and the strength; a
# request without IMAGE_IN sends empty pictures (0 rows) and strength 0 (toonark.image_input, toonark.editing).
IMAGE, MASK, STRENGTH = (Port("image", "FP32", (-1, -1, -1, -1)), Port("mask", "FP32", (-1, -1, -1, -1)),
                         Port("strength", "FP32", (1,)))
RESOLVED = (SEED, STEPS, GUIDANCE, WIDTH, HEIGHT, FORMAT, QUALITY, IMAGE, MASK, STRENGTH)
# Only in repositories with a LoRA folder: preprocess emits them, text_encoder and denoise (-> unet) read them.
# They are text_encoder inputs, so its prompt-embedding cache key includes the text-encoder LoRA.
LORA_NAME, LORA_WEIGHT = Port("lora", "STRING", (1,)), Port("lora_scale", "FP32", (1,))
LORA_RESOLVED = (LORA_NAME, LORA_WEIGHT)
DENOISE_INPUTS = (SEED, STEPS, GUIDANCE, WIDTH, HEIGHT, IMAGE, MASK, STRENGTH)   # what denoise reads (after the
                                                                                  # text embeddings)
POSTPROCESS_INPUTS = (FORMAT, QUALITY)                     # what postprocess reads (after the decoded images)

# Triton type -> numpy dtype of the tensors a client sends and the Python models emit.
NUMPY_TYPES = {"STRING": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_,
               "UINT8": np.uint8}


class RequestError(ValueError):
    """A bad request: sent back to the client as the response's error message, the server stays up.
    `reason` is the safety category when the prompt was refused (a metrics label), else None; `layer` the
    layer of the kid-safety filter that refused it (toonark.prompt_safety.LAYERS: word, phrase, language,
    classifier, negative), else None."""

    def __init__(self, message: str, reason: str | None = None, layer: str | None = None):
        super().__init__(message)
        self.reason, self.layer = reason, layer


def offline_batch_and_guidance(batch, guidance) -> float:
    """The offline pipelines' shared argument checks: `batch` a positive integer (bools refused), `guidance`
    as a float, NaN when it is not a number (each family words its own range message)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch {batch!r} must be a positive integer")
    try:
        return float(guidance)
    except (TypeError, ValueError):
        return float("nan")


def request_defaults(info) -> dict:
    """Defaults of the optional inputs for one build (BuildInfo): keyword -> typed value."""
    return {"seed": DEFAULT_SEED, "guidance": DEFAULT_GUIDANCE, "width": info.limits.opt_image,
            "height": info.limits.opt_image, "format": DEFAULT_FORMAT, "quality": DEFAULT_QUALITY}


def config_defaults(info) -> dict[str, str]:
    """request_defaults as the preprocess config's parameters (default_<name>: strings, as Triton keeps them)."""
    return {f"default_{key}": str(value) for key, value in request_defaults(info).items()}


def one_value(values, name: str, default):
    """A scalar request input (absent -> default)."""
    if values is None:
        return default
    flat = np.asarray(values).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value   # BYTES arrays hold bytes


def text_value(values, name: str, default):
    """A scalar text request input (absent -> default), BYTES decoded as UTF-8."""
    value = one_value(values, name, default)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def texts(values, name: str) -> list[str]:
    """A text input of one or more entries (str, bytes, a list of them or a BYTES array)."""
    out = []
    for value in np.asarray(values, dtype=object).reshape(-1):
        try:
            out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8 text") from None
    return out


@dataclass(frozen=True)
class ResolvedRequest:
    """One request after defaults and checks: what the models (or the offline pipeline) run."""
    prompts: tuple[str, ...]       # composed by the policy (template around each subject), one per image
    negatives: tuple[str, ...]     # the policy's negative prompt (+ the request's own words), one per image
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    format: str
    quality: int = DEFAULT_QUALITY
    # NUM_IMAGES requests: one seed per image (SEED + i); empty: the whole batch's noise from `seed`.
    image_seeds: tuple[int, ...] = ()
    lora: str = ""                  # registered LoRA name ("" = the base model) and its scale
    lora_scale: float = DEFAULT_LORA_SCALE
    edit: object = None            # toonark.image_input.EditInput when IMAGE_IN was sent

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def seeds(self) -> list[int]:
        """The served `seed` tensor's values: one per image for NUM_IMAGES requests, else [seed]."""
        return list(self.image_seeds or [self.seed])

    def input_ids(self, tokenizer, family, dims) -> np.ndarray:
        """Token ids (2B, L) int64, uncond rows first (family.encode_prompts). A prompt past the text
        encoder's window would lose its tail silently: the kid-style words of the template follow the
        subject, so it is refused instead. (Negative prompts are the policy's own words first; a user's
        extra negative words past the window are dropped, which only weakens the extra steering.)"""
        ids, truncated = family.encode_prompts(tokenizer, list(self.prompts), list(self.negatives), dims)
        prompts = self.prompts
        for i, cut in enumerate(truncated[len(self.negatives):]):
            if cut:
                used = len(tokenizer.backend.encode(prompts[i], add_special_tokens=False).ids)
                raise RequestError(f"PROMPT{f' {i}' if len(prompts) > 1 else ''} is too long: {used} tokens with the "
                                   f"style words, the text encoder reads {family.text_window(dims)}; "
                                   f"shorten the subject")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def tensors(self) -> dict[str, np.ndarray]:
        """The RESOLVED tensors preprocess emits (name -> array of the port's type)."""
        edit = self.edit
        empty = np.zeros((0, 1, 1, 1), np.float32)
        values = {SEED: self.seeds, STEPS: [self.steps], GUIDANCE: [self.guidance], WIDTH: [self.width],
                  HEIGHT: [self.height], FORMAT: [self.format.encode()], QUALITY: [self.quality],
                  IMAGE: edit.image if edit is not None else empty,
                  MASK: edit.mask if edit is not None and edit.mask is not None else empty,
                  STRENGTH: [edit.strength if edit is not None else 0.0]}
        return {port.name: np.array(values[port], dtype=NUMPY_TYPES[port.triton_type]) for port in RESOLVED}

    def lora_tensors(self) -> dict[str, np.ndarray]:
        """The LORA_RESOLVED tensors (repositories with a LoRA folder)."""
        return {LORA_NAME.name: np.array([self.lora.encode()], dtype=np.object_),
                LORA_WEIGHT.name: np.array([self.lora_scale], dtype=np.float32)}

@dataclass(frozen=True)
class Serves:
    """What a deployment can do beyond text-to-image at the profile's sizes (preprocess reads it from its config):
    images: a VAE encoder is served (IMAGE_IN); tiled_sizes: sizes above the profile are made in tiles (the
    python layout tiles around the engines; native-backend layouts cannot)."""
    images: bool = True
    tiled_sizes: bool = True


def resolve_request(info, policy, defaults: Mapping | None = None, serves: Serves = Serves(), known_loras=(), *,
                    prompt=None, negative_prompt=None, seed=None, steps=None, preset=None, guidance=None, width=None,
                    height=None, format=None, num_images=None, quality=None, lora=None, lora_scale=None,
                    image_in=None, mask_in=None, strength=None) -> ResolvedRequest:
    """One request's inputs (keyword = the ensemble input's name in lower case; None = not sent; Python
    values or the arrays Triton hands over) -> ResolvedRequest, or RequestError naming the problem and the fix.

    info: the build's BuildInfo (limits: sizes, max batch); policy: toonark.prompts.PromptPolicy (template,
    negative prompt, presets, safety check); defaults: request_defaults(info) unless given (the preprocess
    config's values); known_loras: the registered LoRA names (a LORA outside them is refused, listing them)."""
    d = dict(request_defaults(info))
    d.update(defaults or {})
    negative, fmt = negative_prompt, format
    if prompt is None:   # preprocess declares PROMPT optional so that this message reaches the client
        raise RequestError("PROMPT is missing: send one prompt per image (a BYTES tensor of shape [B])")
    subjects = texts(prompt, "PROMPT")
    if not subjects:
        raise RequestError("PROMPT is empty: send one prompt per image")
    extras = texts(negative, "NEGATIVE_PROMPT") if negative is not None else [None]
    if len(extras) not in (1, len(subjects)):
        raise RequestError(f"NEGATIVE_PROMPT has {len(extras)} entries; send 1 or one per prompt "
                           f"({len(subjects)})")
    count = one_value(num_images, "NUM_IMAGES", None)
    image_seeds: tuple[int, ...] = ()
    seed = int(one_value(seed, "SEED", d["seed"]))
    if count is not None:
        count = int(count)
        if not 1 <= count <= MAX_NUM_IMAGES:
            raise RequestError(f"NUM_IMAGES {count} is out of range; use 1..{MAX_NUM_IMAGES}")
        if count > info.limits.max_batch:
            raise RequestError(f"NUM_IMAGES {count} is more than this build serves per request "
                               f"({info.limits.max_batch}, its max batch); ask for fewer, or re-export with "
                               f"`scripts/export.py --max-batch {count}`, then `make engine`")
        if len(subjects) != 1 and count != 1:
            raise RequestError(f"NUM_IMAGES repeats one prompt, but {len(subjects)} prompts were sent; send "
                               f"one PROMPT with NUM_IMAGES, or one prompt per image without it")
        subjects = subjects * count
        # Image i is drawn from seed SEED + i alone: the same picture a NUM_IMAGES=1 request with that seed gets.
        image_seeds = tuple(seed + i for i in range(count))
    quality = int(one_value(quality, "QUALITY", d["quality"]))
    if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
        raise RequestError(f"QUALITY {quality} is out of range; use {QUALITY_RANGE[0]}..{QUALITY_RANGE[1]} "
                           f"(WebP only; PNG ignores it)")
    guidance = float(one_value(guidance, "GUIDANCE", d["guidance"]))
    edit = None
    if image_in is not None or mask_in is not None or strength is not None:
        from toonark.image_input import read_edit
        if not serves.images:
            raise RequestError("IMAGE_IN is not served by this build: it has no VAE encoder engine; run `make engine` "
                               "(the encoder is exported with the other submodels), then `make repo`")
        strength = one_value(strength, "STRENGTH", None)
        edit, width, height = read_edit(
            image_in, mask_in, None if strength is None else float(strength),
            None if width is None else int(one_value(width, "WIDTH", None)),
            None if height is None else int(one_value(height, "HEIGHT", None)), info.limits,
            DEFAULT_INPAINT_STRENGTH if mask_in is not None else DEFAULT_STRENGTH)
    width = int(one_value(width, "WIDTH", d["width"]))
    height = int(one_value(height, "HEIGHT", d["height"]))
    fmt = str(text_value(fmt, "FORMAT", d["format"])).lower()
    preset = text_value(preset, "PRESET", None)
    if fmt not in IMAGE_FORMATS:
        raise RequestError(f"FORMAT {fmt!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}")
    if not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1] or not np.isfinite(guidance):
        raise RequestError(f"GUIDANCE {guidance} is out of range; use {GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g} "
                           f"({DEFAULT_GUIDANCE} is typical)")
    if not 0 <= seed < MAX_SEED + 1 - max(len(image_seeds) - 1, 0):
        raise RequestError(f"SEED {seed} is out of range; use 0..2**63-1"
                           + (f" minus NUM_IMAGES-1 ({len(image_seeds) - 1})" if len(image_seeds) > 1 else ""))
    try:
        steps = policy.steps_for(preset, None if steps is None else int(one_value(steps, "STEPS", None)))
        from toonark.tiling import check_size
        if serves.tiled_sizes:
            check_size(info.limits, len(subjects), height, width)   # above the profile: tiled (toonark.tiling)
        else:
            info.limits.check_request(len(subjects), height, width)
        pairs = [policy.compose(subject, extras[0 if len(extras) == 1 else i]) for i, subject in enumerate(subjects)]
    except (ValueError, TypeError) as err:   # refusals (PromptRefused) name the reason
        if isinstance(err, RequestError):
            raise
        raise RequestError(str(err), getattr(err, "category", None), getattr(err, "layer", None)) from None
    from toonark.lora import check_lora_request
    try:   # checked before any GPU work: an unknown style or a bad scale is a 400 listing the known names
        lora_name, lora_weight = check_lora_request(str(text_value(lora, "LORA", "") or ""),
                                                    float(one_value(lora_scale, "LORA_SCALE", DEFAULT_LORA_SCALE)),
                                                    known_loras)
    except (ValueError, TypeError) as err:
        raise RequestError(str(err)) from None
    if info.dims.unet_channels != info.dims.latent_channels and (edit is None or edit.mask is None):
        raise RequestError("this build's UNet is an inpainting UNet: send IMAGE_IN and MASK_IN (white = repaint; an "
                           "all-white mask redraws the whole picture)")
    if edit is not None:
        from toonark.editing import start_index
        start_index(steps, edit.strength)   # refuses a strength that runs no step, before any model runs
    return ResolvedRequest(tuple(a for a, _ in pairs), tuple(b for _, b in pairs), seed, steps, guidance, width,
                           height, fmt, quality, image_seeds, lora=lora_name,
                           lora_scale=lora_weight if lora_name else DEFAULT_LORA_SCALE, edit=edit)
