"""LoRA files as people have them, read into one form, and the one merge formula.

    lora = read_lora("styles/crayon.safetensors")            # diffusers/PEFT or kohya keys, safetensors only
    layers = lora.bind(targets)                              # {(submodel, module): LoraLayer}; refuses a key
                                                             # that matches no layer or does not fit its shape
    weight = merged_weight(base, layers[("unet", "mid_block.attentions.0.proj_in")], scale=0.8)

Formats (both for the UNet and the text encoder):
- diffusers / PEFT (`pytorch_lora_weights.safetensors`, what `save_lora_weights` writes):
  `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>.lora_A.weight` ...; alpha from the
  safetensors metadata `lora_adapter_metadata` (`unet.lora_alpha`, `unet.r`) when present, else alpha = rank;
  the older `unet.<module>.lora.down.weight` / `.lora.up.weight` naming too.
- kohya (sd-scripts): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_<module with _>...` for the text encoder. Underscored names are resolved against the base's module
  names (bind), since module names themselves hold underscores (`to_out.0`, `proj_in`).

Merge (always from the pristine base, never from the previous state, so any order of switches gives the
same bytes): W = W0 + (scale * alpha / rank) * (up @ down), float32, in the module's (out, in[, kh, kw]) layout;
that is what diffusers' `fuse_lora` computes (PEFT: delta = (B @ A) * lora_alpha / r * lora_scale).

Core module (rank 0): numpy and safetensors only (no torch).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from toonark.files import sha256_file

SUBMODELS = ("unet", "text_encoder")
# kohya prefixes -> submodel
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# diffusers / PEFT key suffixes -> which matrix
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                  ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
SCALE_RANGE = (0.0, 2.0)       # LORA_SCALE of a request


class LoraError(ValueError):
    """A LoRA file toonark cannot use; the message names the file, the first offending key and the fix."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: delta = (alpha / rank) * up @ down, shaped like the layer's weight."""
    submodel: str
    module: str             # diffusers module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down: np.ndarray        # (r, in) or (r, in, kh, kw)
    up: np.ndarray          # (out, r) or (out, r, 1, 1)
    alpha: float | None     # None: alpha = rank (scale 1)
    key: str                # the file's key prefix (messages)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha_over_rank(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """float32 delta in the layer's weight shape (out, in) or (out, in, kh, kw)."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        return ((up @ down) * np.float32(scale * self.alpha_over_rank)).reshape(shape)

    def check_shape(self, shape: tuple[int, ...], path: str) -> None:
        """Refuse a layer whose rank or shapes do not fit the base weight `shape`."""
        out_features, in_size = shape[0], int(np.prod(shape[1:]))
        if self.up.ndim < 2 or self.up.shape[1] != self.rank or int(np.prod(self.up.shape[2:] or (1,))) != 1:
            raise LoraError(f"{path}: key {self.key!r}: up has shape {list(self.up.shape)}, down has rank {self.rank}; "
                            f"up must be (out, rank) — the file is damaged or not a LoRA")
        if self.up.shape[0] != out_features or int(np.prod(self.down.shape[1:])) != in_size:
            raise LoraError(f"{path}: key {self.key!r}: up {list(self.up.shape)} @ down {list(self.down.shape)} does "
                            f"not fit {self.submodel} layer {self.module!r} of shape {list(shape)}; the LoRA was "
                            f"trained for another base model")


def merged_weight(base: np.ndarray, layers, scale: float, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """W0 + sum of the layers' deltas (normally one) at `scale`, float32, from the pristine base."""
    base = np.asarray(base, dtype=np.float32)
    shape = tuple(shape or base.shape)
    out = base.reshape(shape).copy()
    for layer in (layers if isinstance(layers, (list, tuple)) else [layers]):
        out += layer.delta(shape, scale)
    return out


@dataclass
class LoraFile:
    """A read LoRA file: raw entries by key prefix (bind resolves them against a base)."""
    name: str
    path: Path
    sha256: str
    entries: dict[str, dict]          # prefix -> {"down", "up", "alpha", "submodel"?, "format"}
    metadata: dict[str, str]

    def bind(self, targets: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[tuple[str, str], LoraLayer]:
        """targets: {submodel: {module path: weight shape}} of the base (engines.lora.LoraTargets).
        Returns {(submodel, module): LoraLayer}; refuses the first key that matches no layer or does not fit."""
        underscored = {sub: {m.replace(".", "_"): m for m in modules} for sub, modules in targets.items()}
        layers = {}
        for prefix in sorted(self.entries):
            entry = self.entries[prefix]
            missing = [part for part in ("down", "up") if part not in entry]
            if missing:
                raise LoraError(f"{self.path}: key {prefix!r} has no {missing[0]} matrix (only "
                                f"{sorted(k for k in entry if k in ('down', 'up', 'alpha'))}); the file is incomplete")
            submodel, module = entry["submodel"], entry.get("module")
            if submodel not in targets:
                raise LoraError(f"{self.path}: key {prefix!r} adapts the {submodel}, which this build cannot adapt "
                                f"(LoRA targets: {', '.join(targets)})")
            if module is None:   # kohya: underscores for dots
                module = underscored[submodel].get(entry["flat"])
            if module is None or module not in targets[submodel]:
                raise LoraError(f"{self.path}: key {prefix!r} matches no layer of the {submodel} (first unmatched "
                                f"key); the LoRA is for another model family or uses names toonark does not read "
                                f"(diffusers/PEFT or kohya sd-scripts naming)")
            alpha = entry.get("alpha", self._metadata_alpha(submodel))
            layer = LoraLayer(submodel, module, entry["down"], entry["up"], None if alpha is None else float(alpha),
                              prefix)
            layer.check_shape(tuple(targets[submodel][module]), str(self.path))
            layers[(submodel, module)] = layer
        if not layers:
            raise LoraError(f"{self.path}: no LoRA layers found")
        return layers

    def _metadata_alpha(self, submodel: str) -> float | None:
        """diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, "unet.r": 4, ...}); None: alpha = rank."""
        raw = self.metadata.get("lora_adapter_metadata")
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise LoraError(f"{self.path}: metadata lora_adapter_metadata is not JSON") from None
        for pattern in ("alpha_pattern", "rank_pattern"):
            if data.get(f"{submodel}.{pattern}"):
                raise LoraError(f"{self.path}: metadata {submodel}.{pattern} (per-layer alpha/rank) is not supported; "
                                f"re-save the LoRA with one lora_alpha")
        alpha = data.get(f"{submodel}.lora_alpha")
        return None if alpha is None else float(alpha)


def _load_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, TypeError, ValueError) as err:
        raise LoraError(f"{path}: not a readable safetensors file ({err}); convert it with "
                        f"`safetensors` (bf16 tensors: save them as fp16 or fp32)") from None
    return tensors, metadata


def read_lora(path: Path | str, name: str | None = None) -> LoraFile:
    """Read a LoRA safetensors file (diffusers/PEFT or kohya keys). Pickle files (.bin, .pt, .ckpt) are refused:
    loading them runs code."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are read (pickle .bin/.pt/.ckpt files can run code); "
                        f"convert it with safetensors.torch.save_file")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    tensors, metadata = _load_safetensors(path)
    entries: dict[str, dict] = {}
    for key in sorted(tensors):
        entry_key, part, extra = _parse_key(key)
        if entry_key is None:
            raise LoraError(f"{path}: key {key!r} is not a LoRA key toonark reads (first unmatched key); expected "
                            f"diffusers/PEFT (unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down.weight)")
        entry = entries.setdefault(entry_key, dict(extra))
        value = tensors[key]
        if part == "alpha":
            entry["alpha"] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            if value.dtype.kind != "f":
                raise LoraError(f"{path}: key {key!r} has dtype {value.dtype}; LoRA matrices are floating point")
            entry[part] = value
    if not entries:
        raise LoraError(f"{path}: the file holds no tensors")
    return LoraFile(name or path.stem, path, sha256_file(path), entries, metadata)


def _parse_key(key: str):
    """key -> (entry prefix, part, {"submodel", "module"|"flat", "format"}) or (None, None, None)."""
    for prefix, submodel in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in _KOHYA_SUFFIXES.items():
                if key.endswith(suffix):
                    stem = key[: -len(suffix)]
                    return stem, part, {"submodel": submodel, "flat": stem[len(prefix):], "format": "kohya"}
            return None, None, None
    for submodel in SUBMODELS:
        if key.startswith(submodel + "."):
            for suffix, part in _PEFT_SUFFIXES.items():
                if key.endswith(suffix):
                    stem = key[: -len(suffix)]
                    return stem, part, {"submodel": submodel, "module": stem[len(submodel) + 1:], "format": "peft"}
    return None, None, None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def lora_registry(folder: Path | str) -> dict[str, Path]:
    """A folder of LoRA files -> {name (file stem): path}. Names are what requests send in LORA."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraError(f"LoRA folder {folder} does not exist; point LORAS= at a folder of .safetensors files")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            if not _NAME.match(path.stem):
                raise LoraError(f"{path}: a LoRA name must be 1-64 letters, digits, '_', '.', '-' (it is the "
                                f"LORA value clients send); rename the file")
            found[path.stem] = path
        elif path.suffix in (".bin", ".pt", ".ckpt", ".pth"):
            raise LoraError(f"{path}: only .safetensors LoRA files are served (pickle files can run code); convert it")
    if not found:
        raise LoraError(f"LoRA folder {folder} holds no .safetensors files")
    return found


def check_lora_request(lora: str, scale: float, known) -> tuple[str, float]:
    """A request's LORA / LORA_SCALE against the registered names -> (name, scale); "" = the base model.
    Raises ValueError with the list of known names (the API turns it into a 400)."""
    names = sorted(known)
    if lora and lora not in known:
        known_text = ", ".join(names) or "none (this server has no LoRA folder: `make repo ... LORAS=dir`)"
        raise ValueError(f"LORA {lora!r} is not registered; known: {known_text}; send an empty LORA for the base "
                         f"model")
    scale = float(scale)
    if not (np.isfinite(scale) and SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]):
        raise ValueError(f"LORA_SCALE {scale} is out of range; use {SCALE_RANGE[0]:g}..{SCALE_RANGE[1]:g} (1 is the "
                         f"LoRA as trained)")
    return lora, scale
