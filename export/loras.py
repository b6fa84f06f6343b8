"""Random LoRA files for a diffusers folder (`make tiny MODEL=dir LORAS=dir`), in the formats people have:
tests and the GPU bench need real files, and no LoRA can be downloaded here.

    write_random_loras(Path("build/tiny-pipeline"), Path("build/loras"))
    # storybook.safetensors  diffusers/PEFT keys, UNet attention + text-encoder attention, alpha = rank
    # crayon.safetensors     kohya keys (lora_unet_ / lora_te_, .alpha = rank / 2), UNet attention, proj_in/out
    #                        (1x1 convs in SD-1.5), feed-forward; text-encoder MLP
    # clay.safetensors       diffusers/PEFT keys with lora_adapter_metadata (lora_alpha = 2 * rank), UNet only

The module names and shapes come from the folder's own safetensors weights (no model is instantiated), so
the same code writes LoRAs for the tiny and the SD-1.5-shaped pipelines.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from toonark.files import atomic_file

# (file name, format, {submodel: module regex}, alpha factor (alpha = factor * rank; None: no alpha stored))
STYLES = (
    ("storybook", "peft", {"unet": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
                           "text_encoder": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"}, None),
    ("crayon", "kohya", {"unet": r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2))$",
                         "text_encoder": r"mlp\.(fc1|fc2)$"}, 0.5),
    ("clay", "peft-metadata", {"unet": r"attn1\.(to_q|to_k|to_v)$"}, 2.0),
)
WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def module_shapes(model_dir: Path, submodel: str) -> dict[str, tuple[int, ...]]:
    """{module: weight shape} of a diffusers folder's Linear / Conv layers (2-D and 4-D `.weight` tensors)."""
    from safetensors import safe_open
    path = Path(model_dir) / WEIGHT_FILES[submodel]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; LoRAs are written for a diffusers folder with safetensors "
                                f"weights (`make tiny MODEL=dir`)")
    shapes = {}
    with safe_open(str(path), framework="numpy") as handle:
        for key in handle.keys():
            if key.endswith(".weight"):
                shape = tuple(handle.get_slice(key).get_shape())
                if len(shape) in (2, 4) and "embed" not in key:
                    shapes[key[: -len(".weight")]] = shape
    return shapes


def random_lora_tensors(shapes: dict[str, tuple[int, ...]], pattern: str, rank: int, rng: np.random.Generator,
                        strength: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (down, up)} for the modules matching `pattern`; up is not zero (a trained LoRA's is not),
    sized so that up @ down is about `strength` times the layer's typical weight scale."""
    out = {}
    for module, shape in sorted(shapes.items()):
        if not re.search(pattern, module):
            continue
        fan_in = int(np.prod(shape[1:]))
        r = min(rank, shape[0], fan_in)
        down_shape = (r, shape[1], *shape[2:]) if len(shape) == 4 else (r, shape[1])
        up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
        down = rng.standard_normal(down_shape).astype(np.float32) / np.sqrt(fan_in)
        up = rng.standard_normal(up_shape).astype(np.float32) * strength / np.sqrt(r)
        out[module] = (down, up)
    return out


def write_random_loras(model_dir: Path, out_dir: Path, *, rank: int = 4, seed: int = 0, strength: float = 0.5,
                       styles=STYLES) -> dict[str, Path]:
    """Write one safetensors LoRA per style into out_dir (each replaced atomically). Returns {name: path}."""
    shapes = {sub: module_shapes(model_dir, sub) for sub in WEIGHT_FILES}
    return write_random_loras_for(shapes, out_dir, rank=rank, seed=seed, strength=strength, styles=styles)


def write_random_loras_for(shapes: dict[str, dict[str, tuple[int, ...]]], out_dir: Path, *, rank: int = 4,
                           seed: int = 0, strength: float = 0.5, styles=STYLES) -> dict[str, Path]:
    """write_random_loras from {submodel: {module: weight shape}} (e.g. engines.lora.LoraBase.shapes of a build's
    fp32 export: the GPU bench has no diffusers folder)."""
    from safetensors.numpy import save
    out_dir = Path(out_dir)
    written = {}
    for index, (name, fmt, patterns, alpha_factor) in enumerate(styles):
        rng = np.random.default_rng([seed, index])
        tensors: dict[str, np.ndarray] = {}
        metadata = {"format": "pt"}
        for submodel, pattern in patterns.items():
            layers = random_lora_tensors(shapes[submodel], pattern, rank, rng, strength)
            if not layers:
                raise ValueError(f"style {name}: no {submodel} layer matches {pattern!r}")
            for module, (down, up) in layers.items():
                if fmt == "kohya":
                    prefix = ("lora_unet_" if submodel == "unet" else "lora_te_") + module.replace(".", "_")
                    tensors[f"{prefix}.lora_down.weight"] = down
                    tensors[f"{prefix}.lora_up.weight"] = up
                    tensors[f"{prefix}.alpha"] = np.array(alpha_factor * down.shape[0], dtype=np.float32)
                else:
                    tensors[f"{submodel}.{module}.lora_A.weight"] = down
                    tensors[f"{submodel}.{module}.lora_B.weight"] = up
            if fmt == "peft-metadata":
                ranks = {down.shape[0] for down, _ in layers.values()}
                r = ranks.pop() if len(ranks) == 1 else rank
                metadata["lora_adapter_metadata"] = json.dumps(
                    {f"{submodel}.r": r, f"{submodel}.lora_alpha": alpha_factor * r, f"{submodel}.rank_pattern": {},
                     f"{submodel}.alpha_pattern": {},
                     f"{submodel}.target_modules": sorted({m.rsplit('.', 1)[-1] for m in layers})}, sort_keys=True)
        path = out_dir / f"{name}.safetensors"
        with atomic_file(path) as handle:
            handle.write(save(tensors, metadata=metadata))
        written[name] = path
    return written
