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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: `mul * symbol / div`, e.g. Axis("B", mul=2) is "2B", Axis("H", div=8) is "H/8"."""
    symbol: str
    mul: int = 1
    div: int = 1

    @property
    def name(self) -> str:
        return (f"{self.mul}" if self.mul != 1 else "") + self.symbol + (f"/{self.div}" if self.div != 1 else "")

    def value(self, sizes: dict[str, int]) -> int:
        whole, rest = divmod(sizes[self.symbol] * self.mul, self.div)
        if rest:
            raise ValueError(f"{self.symbol}={sizes[self.symbol]} is not a multiple of {self.div} (axis {self.name})")
        return whole


Dim = int | Axis


@dataclass(frozen=True)
class TensorSpec:
    """dtype "float" follows the engine precision (fp32 / fp16 I/O); any other dtype is fixed."""
    name: str
    dtype: str
    dims: tuple[Dim, ...]

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

    def __post_init__(self):
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
        return {"B": batch, "H": image, "W": image}

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
        return dict(self.__dict__)


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
        return dict(self.__dict__)


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
                feeds[t.name] = rng.integers(0, 49407, size=shape).astype(dtype)
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
        return submodel_specs(self.dims)

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
        try:
            return cls(PipelineDims(**data["dims"]), ShapeLimits(**data["limits"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"build info in {build_dir} is from another toonark version ({err}); "
                             f"re-run `make export OUT={build_dir}`") from None
