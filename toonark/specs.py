"""One declaration per submodel: names, dtypes, symbolic axes and shape profiles.

Export (dynamic axes, sample inputs, validation), calibration (capture shapes), engines
(TensorRT / ONNX Runtime profiles, buffer shapes) and the Triton configs all read these;
no shape is written down anywhere else.

Axis symbols: `B` is images per request, `H`/`W` the image size in pixels. Every other
size is derived by a factor that comes from the model folder's configs: classifier-free
guidance runs the text encoder and UNet at `2B`; latents are `H/8` when the VAE
downsamples by 8.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: `mul * symbol / div + add`, e.g. Axis("B", mul=2) is "2B", Axis("H", div=8) is "H/8".
    A symbol of several letters is their product: Axis("HW", div=256) is the image token count of a
    2x2-patched transformer over 8x latents (H/16 * W/16); Axis("T", add=34) is T plus 34 template tokens."""
    symbol: str
    mul: int = 1
    div: int = 1
    add: int = 0

    @property
    def name(self) -> str:
        return ((f"{self.mul}" if self.mul != 1 else "") + self.symbol + (f"/{self.div}" if self.div != 1 else "")
                + (f"+{self.add}" if self.add else ""))

    def base(self, sizes: dict[str, int]) -> int:
        if self.symbol in sizes:
            return sizes[self.symbol]
        return math.prod(sizes[letter] for letter in self.symbol)

    def value(self, sizes: dict[str, int]) -> int:
        base = self.base(sizes)
        whole, rest = divmod(base * self.mul, self.div)
        if rest:
            raise ValueError(f"{self.symbol}={base} is not a multiple of {self.div} (axis {self.name})")
        return whole + self.add


Dim = int | Axis


@dataclass(frozen=True)
class TensorSpec:
    """dtype "float" follows the engine precision (fp32 / fp16 I/O); any other dtype is fixed."""
    name: str
    dtype: str
    dims: tuple[Dim, ...]
    # Integer inputs: sample values are drawn from [0, high) (token ids below the vocabulary, masks 0/1).
    high: int = 49407

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d.value(sizes) if isinstance(d, Axis) else d for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d.name for i, d in enumerate(self.dims) if isinstance(d, Axis)}

    def numpy_dtype(self, io_precision: str = "fp32") -> np.dtype:
        if self.dtype == "float":
            return np.dtype(np.float16 if io_precision == "fp16" else np.float32)
        return np.dtype(self.dtype)

    def triton_dims(self) -> list[int]:
        return [-1 if isinstance(d, Axis) else d for d in self.dims]


@dataclass(frozen=True)
class ShapeLimits:
    """min/opt/max of the request sizes every profile is built for."""
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_image: int = 256
    opt_image: int = 512
    max_image: int = 768
    image_step: int = 64
    # Text token limits ("T"), for families whose text length is a dynamic axis (Qwen-Image); 0 = no
    # text axis (Stable Diffusion's text length is fixed by CLIP), and then they are not written out.
    min_text: int = 0
    opt_text: int = 0
    max_text: int = 0

    def __post_init__(self):
        if self.max_text and not 1 <= self.min_text <= self.opt_text <= self.max_text:
            raise ValueError(f"text limits must satisfy 1 <= min <= opt <= max, got "
                             f"{self.min_text}/{self.opt_text}/{self.max_text}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch limits must satisfy 1 <= min <= opt <= max, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.image_step <= 0:
            raise ValueError(f"image step must be a positive number of pixels, got {self.image_step}")
        if not 0 < self.min_image <= self.opt_image <= self.max_image:
            raise ValueError(f"image limits must satisfy 0 < min <= opt <= max, got "
                             f"{self.min_image}/{self.opt_image}/{self.max_image}")
        for value in (self.min_image, self.opt_image, self.max_image):
            if value % self.image_step:
                raise ValueError(f"image size {value} is not a multiple of the image step {self.image_step}")

    def sizes(self, level: str) -> dict[str, int]:
        """Symbol values at "min", "opt" or "max"."""
        batch = getattr(self, f"{level}_batch")
        image = getattr(self, f"{level}_image")
        sizes = {"B": batch, "H": image, "W": image}
        if self.max_text:
            sizes["T"] = getattr(self, f"{level}_text")
        return sizes

    def check_request(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError naming the offending value, the built range and how to widen it."""
        if not self.min_batch <= batch <= self.max_batch:
            bound, flag = (("below min_batch", "--min-batch") if batch < self.min_batch
                           else ("above max_batch", "--max-batch"))
            raise ValueError(f"batch {batch} is outside the built range {self.min_batch}..{self.max_batch} "
                             f"({bound}); to serve it re-export with `scripts/export.py {flag} {max(batch, 1)}`, "
                             f"then `make engine`")
        for label, value in (("width", width), ("height", height)):
            if value % self.image_step or not self.min_image <= value <= self.max_image:
                if value < self.min_image:
                    why, fix = "below min_image", f"re-export with `scripts/export.py --min-image {value}`"
                elif value > self.max_image:
                    why, fix = "above max_image", f"re-export with `scripts/export.py --max-image {value}`"
                else:
                    why, fix = (f"not a multiple of image_step {self.image_step}",
                                "re-export with `scripts/export.py --image-step <a divisor of it>`")
                raise ValueError(f"{label} {value} must be a multiple of {self.image_step} in "
                                 f"{self.min_image}..{self.max_image} (the built engine profile): {why}; "
                                 f"to serve it {fix}, then `make engine`")

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        if not self.max_text:   # families without a text axis keep the toonark.json they always had
            for key in ("min_text", "opt_text", "max_text"):
                data.pop(key)
        return data


@dataclass(frozen=True)
class PipelineDims:
    """The sizes a diffusers folder fixes, read from its configs."""
    text_length: int          # tokenizer / text encoder positions (77 for CLIP)
    text_hidden: int          # text encoder width = UNet cross-attention width
    latent_channels: int
    vae_scale: int            # image pixels per latent pixel
    vae_scaling_factor: float  # latents are scaled by this before the UNet (0.18215 for SD-1.5)
    in_channels: int = 3
    # The UNet's input channels when they differ from latent_channels: 9 for an inpainting UNet (latents 4 +
    # mask 1 + masked-picture latents 4); 0 = latent_channels (toonark.editing).
    unet_in_channels: int = 0

    @property
    def unet_channels(self) -> int:
        return self.unet_in_channels or self.latent_channels

    @classmethod
    def from_folder(cls, folder: Path) -> "PipelineDims":
        folder = Path(folder)
        configs = {}
        for part in ("text_encoder", "unet", "vae", "tokenizer"):
            name = "tokenizer_config.json" if part == "tokenizer" else "config.json"
            path = folder / part / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"{folder} is not a diffusers text-to-image folder: {part}/{name} is missing "
                    f"(expected text_encoder/, unet/, vae/, tokenizer/, scheduler/ as saved by save_pretrained)")
            try:
                configs[part] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        text, unet, vae = configs["text_encoder"], configs["unet"], configs["vae"]
        if text.get("hidden_size") != unet.get("cross_attention_dim"):
            raise ValueError(f"text encoder width {text.get('hidden_size')} differs from the UNet's "
                             f"cross_attention_dim {unet.get('cross_attention_dim')}: not one pipeline")
        latent_channels = int(vae.get("latent_channels", unet.get("out_channels", 4)))
        unet_in = int(unet.get("in_channels", latent_channels))
        return cls(text_length=int(text.get("max_position_embeddings", 77)),
                   text_hidden=int(text["hidden_size"]),
                   latent_channels=latent_channels,
                   vae_scale=2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1),
                   vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
                   in_channels=int(vae.get("in_channels", 3)),
                   unet_in_channels=0 if unet_in == latent_channels else unet_in)

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        if not self.unet_in_channels:   # a text-to-image UNet keeps the toonark.json it always had
            data.pop("unet_in_channels")
        return data

    def specs(self) -> dict[str, "SubmodelSpec"]:
        """The declarations of this pipeline's submodels (subclasses of other families override)."""
        return submodel_specs(self)


@dataclass(frozen=True)
class SubmodelSpec:
    name: str                  # folder and Triton model name
    source: str                # diffusers component it is exported from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Parity vs the PyTorch module on the same inputs: max |diff| allowed relative to max |reference|,
    # and the lowest cosine similarity, per precision.
    max_rel_error: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 2e-2})
    min_cosine: dict[str, float] = field(default_factory=lambda: {"fp32": 0.99999, "fp16": 0.999})

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx / optimum style: {tensor name: {axis index: axis name}}."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs}

    def profile(self, limits: ShapeLimits) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)}: one TensorRT optimization profile."""
        return {t.name: tuple(t.shape(limits.sizes(level)) for level in ("min", "opt", "max"))
                for t in self.inputs}

    def shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Every input and output shape for concrete sizes (runtime buffers)."""
        return {t.name: t.shape(sizes) for t in self.inputs + self.outputs}

    def sample_inputs(self, sizes: dict[str, int], io_precision: str = "fp32", seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the declared shapes and dtypes (token ids in range, timesteps in 0..999)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape, dtype = t.shape(sizes), t.numpy_dtype(io_precision)
            if np.issubdtype(dtype, np.integer):
                feeds[t.name] = rng.integers(0, t.high, size=shape).astype(dtype)
            elif t.name == "timestep":
                feeds[t.name] = np.asarray(rng.integers(0, 1000), dtype=dtype).reshape(shape)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        return feeds


class SD:
    """Tensor names of the Stable Diffusion submodels, declared once: submodel_specs below builds the
    specs from them, and the loops (toonark.pipeline, engines/ort_loop.py) and the served models read
    them from here instead of retyping strings."""
    input_ids = "input_ids"                         # text_encoder in
    text_embeddings = "last_hidden_state"           # text_encoder out
    sample = "sample"                               # unet in: latents (2B for classifier-free guidance)
    timestep = "timestep"                           # unet in
    encoder_hidden_states = "encoder_hidden_states"  # unet in: the text embeddings
    noise_pred = "out_sample"                       # unet out
    latent_sample = "latent_sample"                 # vae_decoder in
    image = "sample"                                # vae_decoder out (and vae_encoder in)
    latent_parameters = "latent_parameters"         # vae_encoder out


def submodel_specs(dims: PipelineDims) -> dict[str, SubmodelSpec]:
    """The four submodels of a SD-1.5/2.1-style pipeline, in data-flow order."""
    batch, cfg_batch = Axis("B"), Axis("B", mul=2)
    lat_h, lat_w = Axis("H", div=dims.vae_scale), Axis("W", div=dims.vae_scale)
    img_h, img_w = Axis("H"), Axis("W")
    latents = (dims.latent_channels, lat_h, lat_w)
    unet_in = (dims.unet_channels, lat_h, lat_w)   # 9 channels for an inpainting UNet
    return {
        "text_encoder": SubmodelSpec(
            "text_encoder", "text_encoder",
            inputs=(TensorSpec(SD.input_ids, "int64", (cfg_batch, dims.text_length)),),
            # optimum also exports pooler_output; export prunes it (SD conditions on the last hidden state only).
            outputs=(TensorSpec(SD.text_embeddings, "float", (cfg_batch, dims.text_length, dims.text_hidden)),),
        ),
        "unet": SubmodelSpec(
            "unet", "unet",
            inputs=(TensorSpec(SD.sample, "float", (cfg_batch,) + unet_in),
                    # Shape [1], not a scalar: Triton has no 0-d tensors and TensorRT's demo feeds [1] too;
                    # export reshapes it to the scalar the traced UNet wants (GraphPasses.vectorize_scalar_inputs).
                    TensorSpec(SD.timestep, "float32", (1,)),
                    TensorSpec(SD.encoder_hidden_states, "float", (cfg_batch, dims.text_length, dims.text_hidden))),
            outputs=(TensorSpec(SD.noise_pred, "float", (cfg_batch,) + latents),),
        ),
        "vae_decoder": SubmodelSpec(
            "vae_decoder", "vae",
            inputs=(TensorSpec(SD.latent_sample, "float", (batch,) + latents),),
            outputs=(TensorSpec(SD.image, "float", (batch, dims.in_channels, img_h, img_w)),),
        ),
        "vae_encoder": SubmodelSpec(
            "vae_encoder", "vae",
            inputs=(TensorSpec(SD.image, "float", (batch, dims.in_channels, img_h, img_w)),),
            outputs=(TensorSpec(SD.latent_parameters, "float", (batch, 2 * dims.latent_channels, lat_h, lat_w)),),
        ),
    }


SAFETY_CHECKER = "safety_checker"


def safety_checker_spec(image_size: int, special: int = 3, concepts: int = 17) -> SubmodelSpec:
    """The exported safety checker (export/safety_checker.py): CLIP-preprocessed images in, the cosine
    distances to its special-care and concept embeddings out (thresholded on the host)."""
    batch = Axis("B")
    return SubmodelSpec(
        SAFETY_CHECKER, SAFETY_CHECKER,
        inputs=(TensorSpec("clip_input", "float32", (batch, 3, image_size, image_size)),),
        outputs=(TensorSpec("special_cos_dist", "float32", (batch, special)),
                 TensorSpec("cos_dist", "float32", (batch, concepts))))


# The submodels a text-to-image request runs; vae_encoder is exported for image-to-image users.
SERVED_SUBMODELS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class BuildInfo:
    """What `make export` fixed for a build folder: the model's sizes and the profile limits.
    Written to OUT/pipeline/toonark.json; every later stage starts from `BuildInfo.read(OUT)`."""
    dims: PipelineDims
    limits: ShapeLimits

    @property
    def specs(self) -> dict[str, SubmodelSpec]:
        return self.dims.specs()

    def write(self, build_dir: Path) -> None:
        from toonark.files import write_json
        from toonark.layout import BuildLayout
        write_json(BuildLayout(build_dir).pipeline_info, self.to_json())

    def to_json(self) -> dict:
        return {"dims": self.dims.to_json(), "limits": self.limits.to_json()}

    @classmethod
    def read(cls, build_dir: Path) -> "BuildInfo":
        from toonark.files import read_json
        from toonark.layout import BuildLayout
        data = read_json(BuildLayout(build_dir).pipeline_info, "build info",
                         f"Run `make export MODEL=<diffusers folder> OUT={build_dir}` first.")
        from toonark.family import family_for_folder
        dims_class = family_for_folder(BuildLayout(build_dir).pipeline).dims_class
        try:
            return cls(dims_class(**data["dims"]), ShapeLimits(**data["limits"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"build info in {build_dir} is from another toonark version ({err}); "
                             f"re-run `make export OUT={build_dir}`") from None


class QI:
    """Tensor names of the Qwen-Image submodels (toonark.family.QwenImage), declared once."""
    input_ids = "input_ids"                          # text_encoder in: chat-template token ids, right padded
    text_embeddings = "last_hidden_state"            # text_encoder out (the template's first tokens are dropped after)
    hidden_states = "hidden_states"                  # transformer in: packed latents (2B, image tokens, 4C)
    timestep = "timestep"                            # transformer in: sigma (= t / 1000), shape [1]
    encoder_hidden_states = "encoder_hidden_states"  # transformer in: the text embeddings (2B, T, D)
    encoder_hidden_states_mask = "encoder_hidden_states_mask"   # transformer in: 1 for text tokens, 0 for padding
    img_rope = "img_rope"                            # transformer in: (cos, sin) of the image tokens' 3-axis RoPE
    txt_rope = "txt_rope"                            # transformer in: (cos, sin) of the text tokens' RoPE
    noise_pred = "out_sample"                        # transformer out: the velocity, packed like hidden_states
    latent_sample = "latent_sample"                  # vae_decoder in (normalised back: latents * std + mean)
    image = "sample"                                 # vae_decoder out, vae_encoder in
    latent_parameters = "latent_parameters"          # vae_encoder out (mean and log-variance)


@dataclass(frozen=True)
class QwenImageDims(PipelineDims):
    """The sizes a Qwen-Image folder fixes (PipelineDims' fields keep their meaning: text_length is the
    longest text the build accepts in tokens after the dropped template tokens, text_hidden the text
    encoder width = the transformer's joint_attention_dim, latent_channels the VAE's z_dim)."""
    heads: int = 24
    head_dim: int = 128
    patch_size: int = 2
    out_channels: int = 16
    rope_axes: tuple = (16, 56, 56)
    template_drop: int = 34
    latents_mean: tuple = ()
    latents_std: tuple = ()
    vocab_size: int = 152064

    def __post_init__(self):
        for name in ("rope_axes", "latents_mean", "latents_std"):   # JSON lists back to tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"RoPE axes {self.rope_axes} do not add up to the head width {self.head_dim}")

    @property
    def image_token_div(self) -> int:
        """Pixels per image token along each side: VAE scale x patch size (16 for Qwen-Image)."""
        return self.vae_scale * self.patch_size

    @classmethod
    def from_folder(cls, folder: Path, text_length: int = 512) -> "QwenImageDims":
        folder = Path(folder)
        configs = {}
        for part in ("transformer", "vae", "text_encoder"):
            path = folder / part / "config.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{folder} is not a diffusers Qwen-Image folder: {part}/config.json is missing "
                    f"(expected transformer/, text_encoder/, vae/, tokenizer/, scheduler/ as saved by save_pretrained)")
            try:
                configs[part] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        transformer, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
        text_cfg = text.get("text_config") or text
        if text_cfg.get("hidden_size") != transformer.get("joint_attention_dim"):
            raise ValueError(f"text encoder width {text_cfg.get('hidden_size')} differs from the transformer's "
                             f"joint_attention_dim {transformer.get('joint_attention_dim')}: not one pipeline")
        z_dim = int(vae.get("z_dim", 16))
        patch = int(transformer.get("patch_size", 2))
        if int(transformer.get("in_channels", 64)) != z_dim * patch * patch:
            raise ValueError(f"transformer in_channels {transformer.get('in_channels')} is not the VAE's z_dim "
                             f"{z_dim} x {patch}x{patch} packed latents: not one pipeline")
        return cls(text_length=text_length, text_hidden=int(text_cfg["hidden_size"]), latent_channels=z_dim,
                   vae_scale=2 ** len(vae.get("temperal_downsample", (False, True, True))), vae_scaling_factor=1.0,
                   in_channels=3, heads=int(transformer.get("num_attention_heads", 24)),
                   head_dim=int(transformer.get("attention_head_dim", 128)), patch_size=patch,
                   out_channels=int(transformer.get("out_channels") or z_dim),
                   rope_axes=tuple(transformer.get("axes_dims_rope", (16, 56, 56))),
                   latents_mean=tuple(vae.get("latents_mean") or [0.0] * z_dim),
                   latents_std=tuple(vae.get("latents_std") or [1.0] * z_dim),
                   vocab_size=int(text_cfg.get("vocab_size") or text.get("vocab_size")))

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def specs(self) -> dict[str, SubmodelSpec]:
        return qwen_image_specs(self)


def qwen_image_specs(dims: QwenImageDims) -> dict[str, SubmodelSpec]:
    """The four submodels of a Qwen-Image pipeline. Axes: B images, H/W pixels, T text tokens (after the
    dropped template tokens); the image tokens are H/16 * W/16 ("HW/256" for the 8x VAE and 2x2 patches).
    Classifier-free guidance runs the text encoder and transformer at 2B, [uncond x B, cond x B], with
    both halves padded to one T and the padding masked, as two separate diffusers calls compute."""
    batch, cfg_batch = Axis("B"), Axis("B", mul=2)
    text, templated = Axis("T"), Axis("T", add=dims.template_drop)
    side = dims.image_token_div
    tokens = Axis("HW", div=side * side)
    lat_h, lat_w = Axis("H", div=dims.vae_scale), Axis("W", div=dims.vae_scale)
    img_h, img_w = Axis("H"), Axis("W")
    packed = dims.latent_channels * dims.patch_size ** 2
    half_head = dims.head_dim // 2
    return {
        "text_encoder": SubmodelSpec(
            "text_encoder", "text_encoder",
            inputs=(TensorSpec(QI.input_ids, "int64", (cfg_batch, templated), high=dims.vocab_size),),
            outputs=(TensorSpec(QI.text_embeddings, "float", (cfg_batch, templated, dims.text_hidden)),),
        ),
        "transformer": SubmodelSpec(
            "transformer", "transformer",
            inputs=(TensorSpec(QI.hidden_states, "float", (cfg_batch, tokens, packed)),
                    TensorSpec(QI.timestep, "float32", (1,)),
                    TensorSpec(QI.encoder_hidden_states, "float", (cfg_batch, text, dims.text_hidden)),
                    TensorSpec(QI.encoder_hidden_states_mask, "int64", (cfg_batch, text), high=2),
                    # RoPE stays float32 at every precision, as diffusers applies it in float32.
                    TensorSpec(QI.img_rope, "float32", (2, tokens, half_head)),
                    TensorSpec(QI.txt_rope, "float32", (2, text, half_head))),
            outputs=(TensorSpec(QI.noise_pred, "float", (cfg_batch, tokens, dims.out_channels * dims.patch_size ** 2)),),
        ),
        "vae_decoder": SubmodelSpec(
            "vae_decoder", "vae",
            inputs=(TensorSpec(QI.latent_sample, "float", (batch, dims.latent_channels, lat_h, lat_w)),),
            outputs=(TensorSpec(QI.image, "float", (batch, dims.in_channels, img_h, img_w)),),
        ),
        "vae_encoder": SubmodelSpec(
            "vae_encoder", "vae",
            inputs=(TensorSpec(QI.image, "float", (batch, dims.in_channels, img_h, img_w)),),
            outputs=(TensorSpec(QI.latent_parameters, "float", (batch, 2 * dims.latent_channels, lat_h, lat_w)),),
        ),
    }


# The submodels a Qwen-Image text-to-image request runs.
QWEN_IMAGE_SERVED_SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
