"""Safety checker: export diffusers' StableDiffusionSafetyChecker to ONNX, and the numpy half that
serves it (CLIP image preprocessing, the per-concept threshold decision, white blanking).

    OUT/safety_checker/model.onnx          clip_input (B, 3, S, S) -> special_cos_dist (B, 3), cos_dist (B, 17)
    OUT/safety_checker/safety_checker.json thresholds, CLIP preprocessing (from feature_extractor/), parity, source hash

Why torch.onnx.export and not optimum: optimum's diffusers export (`onnx_export_from_model`,
task text-to-image) exports text_encoder / unet / vae_encoder / vae_decoder only and has no
OnnxConfig for StableDiffusionSafetyChecker, so the checker is traced here with the TorchScript
exporter (`dynamo=False`, the exporter optimum itself uses, opset 18) from a spec-style declaration
(`checker_spec`: declared in toonark/specs.py beside the other submodels, so names and the
dynamic batch axis are written down once).

Why the graph stops at the cosine distances: diffusers' own decision (`forward`) rounds every score
to 3 decimals and carries a data-dependent `adjustment` from the special-care loop into the concept
loop; `forward_onnx` drops the rounding. Keeping the thresholds out of the graph makes the served
decision exactly `forward`'s (`safety_flags` below, compared against it in tests), and lets an
operator tune each concept's threshold in the Triton config (`concept_thresholds`,
`special_care_thresholds`, `safety_adjustment` parameters) without re-exporting.

Served as the `safety_checker` step of the `toonark` ensemble (triton_model_repo/safety_checker):
flagged images are replaced by a white image (diffusers returns black) and NSFW[i] is True.

Nothing here imports torch at module level: the Triton Python model imports the serving helpers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toonark.ort_session import ort_session
from toonark.specs import SAFETY_CHECKER, SubmodelSpec, TensorSpec  # noqa: F401
from toonark.specs import safety_checker_spec as checker_spec  # noqa: F401  (the declaration lives in the core)

NAME = SAFETY_CHECKER
OPSET = 18
EXPORT_CODE_VERSION = 1
METADATA_FILE = "safety_checker.json"
# fp32 ONNX Runtime vs the PyTorch module on the same clip_input: cosine distances are in [-1, 1].
MAX_ABS_ERROR = 1e-4


def checker_dir(build_dir: Path) -> Path:
    """Where the exported checker lives in a build folder (beside onnx/, outside onnx/<precision>/,
    whose export.json hashes every file it holds)."""
    return Path(build_dir) / NAME


def has_safety_checker(model_dir: Path) -> bool:
    return (Path(model_dir) / NAME / "config.json").is_file()


# --- serving half (numpy + Pillow) ------------------------------------------------------------------

@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's steps for the checker (values from feature_extractor/preprocessor_config.json):
    resize the shortest edge (Pillow, its resample), center crop, rescale, normalize, NCHW float32."""
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3                       # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, config: dict) -> "ClipPreprocess":
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"feature extractor size {size} is not a shortest-edge size; only CLIP-style "
                                 f"preprocessing is supported")
            size = size["shortest_edge"]
        crop_h, crop_w = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), int(crop_h), int(crop_w), int(config.get("resample", 3)),
                   float(config.get("rescale_factor", 1 / 255)),
                   tuple(config.get("image_mean", cls.image_mean)), tuple(config.get("image_std", cls.image_std)),
                   bool(config.get("do_resize", True)), bool(config.get("do_center_crop", True)),
                   bool(config.get("do_rescale", True)), bool(config.get("do_normalize", True)))

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, 3, crop_h, crop_w) float32."""
        from PIL import Image
        out = []
        for image in images:
            if self.do_resize:
                height, width = image.shape[:2]
                short, long = (height, width) if height <= width else (width, height)
                new_long = int(self.shortest_edge * long / short)   # transformers' get_resize_output_image_size
                size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
                image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=self.resample))
            if self.do_center_crop:
                height, width = image.shape[:2]
                top, left = (height - self.crop_height) // 2, (width - self.crop_width) // 2
                if top < 0 or left < 0:
                    raise ValueError(f"image {height}x{width} is smaller than the crop "
                                     f"{self.crop_height}x{self.crop_width}")
                image = image[top:top + self.crop_height, left:left + self.crop_width]
            pixels = image.astype(np.float32)
            if self.do_rescale:
                pixels = pixels * np.float32(self.rescale_factor)
            if self.do_normalize:
                pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
            out.append(pixels.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@dataclass(frozen=True)
class Thresholds:
    special_care: tuple[float, ...]   # special_care_embeds_weights
    concept: tuple[float, ...]        # concept_embeds_weights
    adjustment: float = 0.0           # diffusers' `adjustment`: raise it for a stricter filter

    @staticmethod
    def parse(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in str(text).replace(",", " ").split())
        except ValueError:
            raise ValueError(f"thresholds {text!r} must be numbers separated by commas") from None

    @staticmethod
    def format(values) -> str:
        return ",".join(repr(float(v)) for v in values)


def safety_flags(special_cos_dist: np.ndarray, cos_dist: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """diffusers StableDiffusionSafetyChecker.forward's decision, vectorised: bool (B,).

    special score = round(cos - threshold + adjustment, 3); any > 0 sets the adjustment to 0.01 for
    that image; an image is flagged when any round(concept cos - threshold + adjustment, 3) > 0."""
    special_cos_dist, cos_dist = np.asarray(special_cos_dist, np.float32), np.asarray(cos_dist, np.float32)
    special_thr = np.asarray(thresholds.special_care, np.float32)
    concept_thr = np.asarray(thresholds.concept, np.float32)
    if special_cos_dist.shape[-1] != special_thr.size or cos_dist.shape[-1] != concept_thr.size:
        raise ValueError(f"the checker scores {special_cos_dist.shape[-1]} special-care and {cos_dist.shape[-1]} "
                         f"concepts but {special_thr.size} / {concept_thr.size} thresholds are configured")
    # diffusers subtracts Python floats from numpy float32 values: float64 arithmetic, then round().
    special = np.round(special_cos_dist.astype(np.float64) - special_thr.astype(np.float64) + thresholds.adjustment, 3)
    adjustment = np.where((special > 0).any(axis=1), 0.01, thresholds.adjustment)[:, None]
    concept = np.round(cos_dist.astype(np.float64) - concept_thr.astype(np.float64) + adjustment, 3)
    return (concept > 0).any(axis=1)


BLANK_VALUE = 1.0   # in the VAE's [-1, 1] range: white after to_uint8_hwc


class SafetyChecker:
    """The served checker: decoded VAE images in [-1, 1] -> (images with flagged ones white, flags)."""

    def __init__(self, folder: Path, thresholds: Thresholds | None = None, threads: int | None = None,
                 providers=("CPUExecutionProvider",)):
        folder = Path(folder)
        meta = json.loads((folder / METADATA_FILE).read_text())
        self.preprocess = ClipPreprocess(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in meta["preprocess"].items()})
        self.thresholds = thresholds or Thresholds(tuple(meta["thresholds"]["special_care"]),
                                                   tuple(meta["thresholds"]["concept"]),
                                                   float(meta["thresholds"].get("adjustment", 0.0)))
        self.session = ort_session(folder / "model.onnx", providers=providers, threads=threads or None,
                                   log_severity=None)

    def scores(self, uint8_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        special, concept = self.session.run(["special_cos_dist", "cos_dist"],
                                            {"clip_input": self.preprocess(uint8_images)})
        return special, concept

    def __call__(self, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from toonark import pipeline as offline
        decoded = np.asarray(decoded, np.float32)
        flags = safety_flags(*self.scores(offline.to_uint8_hwc(decoded)), self.thresholds)
        checked = decoded.copy()
        checked[flags] = BLANK_VALUE
        return checked, flags


# --- export half (torch) -----------------------------------------------------------------------------

def _load(model_dir: Path):
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    folder = Path(model_dir) / NAME
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (pickles are never read); save it with "
                                f"`save_pretrained(..., safe_serialization=True)`")
    checker = StableDiffusionSafetyChecker.from_pretrained(str(folder), use_safetensors=True,
                                                           dtype=torch.float32)
    return checker.eval()


def _distances_module(checker):
    """forward_onnx's first half: pooled CLIP vision output -> projection -> cosine distances."""
    import torch

    class CosineDistances(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.checker = checker

        def forward(self, clip_input):
            from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
            pooled = self.checker.vision_model(clip_input)[1]
            embeds = self.checker.visual_projection(pooled)
            return (cosine_distance(embeds, self.checker.special_care_embeds),
                    cosine_distance(embeds, self.checker.concept_embeds))

    return CosineDistances().eval()


def _source_hash(model_dir: Path) -> str:
    from toonark.files import sha256_tree
    return sha256_tree(Path(model_dir) / NAME, (".json", ".safetensors")) + "/" + \
        sha256_tree(Path(model_dir) / "feature_extractor", (".json",))


def is_up_to_date(model_dir: Path, build_dir: Path) -> bool:
    meta_path = checker_dir(build_dir) / METADATA_FILE
    if not (checker_dir(build_dir) / "model.onnx").is_file() or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("source_sha256") == _source_hash(model_dir) and meta.get("code_version") == EXPORT_CODE_VERSION


def export_safety_checker(model_dir: Path, build_dir: Path, force: bool = False) -> Path | None:
    """Export the pipeline folder's safety_checker (if it has one) to OUT/safety_checker/; return that
    folder, or None when the pipeline has no checker. Parity vs PyTorch is checked at B=1 and B=2.
    Skipped when the folder already holds an export of the same checker and feature extractor."""
    import shutil
    from toonark.files import atomic_dir, write_json
    model_dir = Path(model_dir)
    if not has_safety_checker(model_dir):
        # A checker exported from an earlier model into this OUT must not be served with this one.
        shutil.rmtree(checker_dir(build_dir), ignore_errors=True)
        return None
    if not force and is_up_to_date(model_dir, build_dir):
        return checker_dir(build_dir)
    import torch
    extractor = model_dir / "feature_extractor" / "preprocessor_config.json"
    if not extractor.is_file():
        raise FileNotFoundError(f"{model_dir} has a safety_checker but no {extractor.relative_to(model_dir)}: the "
                                f"checker's CLIP preprocessing comes from there")
    preprocess = ClipPreprocess.from_config(json.loads(extractor.read_text()))
    checker = _load(model_dir)
    vision_size = int(checker.config.vision_config.image_size)
    if (preprocess.crop_height, preprocess.crop_width) != (vision_size, vision_size):
        raise ValueError(f"feature extractor crops {preprocess.crop_height}x{preprocess.crop_width} but the checker's "
                         f"vision model takes {vision_size}x{vision_size}")
    spec = checker_spec(vision_size, checker.special_care_embeds.shape[0], checker.concept_embeds.shape[0])
    module = _distances_module(checker)
    sample = spec.sample_inputs({"B": 2})
    target = checker_dir(build_dir)
    with atomic_dir(target) as tmp:
        with torch.no_grad():
            torch.onnx.export(module, (torch.from_numpy(sample["clip_input"]),), str(tmp / "model.onnx"),
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        session = ort_session(tmp / "model.onnx", log_severity=None)
        parity = []
        for batch in (1, 2):
            feeds = spec.sample_inputs({"B": batch}, seed=batch)
            with torch.no_grad():
                reference = [t.numpy() for t in module(torch.from_numpy(feeds["clip_input"]))]
            got = session.run(spec.output_names, feeds)
            for name, ref, out in zip(spec.output_names, reference, got):
                error = float(np.abs(ref - out).max())
                parity.append({"batch": batch, "output": name, "max_abs_error": error})
                if out.shape != ref.shape or error > MAX_ABS_ERROR:
                    raise RuntimeError(f"safety checker ONNX {name} at B={batch} differs from PyTorch: shape "
                                       f"{out.shape} vs {ref.shape}, max |diff| {error:.2e} > {MAX_ABS_ERROR:.0e}")
        del session
        write_json(tmp / METADATA_FILE, {
            "code_version": EXPORT_CODE_VERSION, "opset": OPSET,
            "source_sha256": _source_hash(model_dir),
            "io": {"inputs": {t.name: {"dtype": "float32", "dims": t.triton_dims()} for t in spec.inputs},
                   "outputs": {t.name: {"dtype": "float32", "dims": t.triton_dims()} for t in spec.outputs}},
            "thresholds": {"special_care": [float(v) for v in checker.special_care_embeds_weights],
                           "concept": [float(v) for v in checker.concept_embeds_weights], "adjustment": 0.0},
            "preprocess": preprocess.to_json(),
            "parity": parity})
    return target
