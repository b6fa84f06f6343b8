"""Parity of an exported ONNX graph against the PyTorch module it came from.

Both run the same inputs (`spec.sample_inputs` at given sizes); the numbers are
max_abs = max|onnx - torch|, max_rel = max_abs / max|torch| (relative to the output's range, so
near-zero elements do not blow it up) and the cosine similarity of the flattened outputs.
Thresholds are the spec's `max_rel_error` / `min_cosine` for the precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toonark.ort_session import ort_session as core_ort_session
from toonark.specs import SubmodelSpec


@dataclass(frozen=True)
class Parity:
    submodel: str
    precision: str
    level: str            # "opt" / "min": the ShapeLimits level the inputs were made at
    sizes: dict
    output: str
    max_abs: float
    max_rel: float
    cosine: float
    max_rel_limit: float
    min_cosine_limit: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.max_rel_limit and self.cosine >= self.min_cosine_limit

    def to_json(self) -> dict:
        return dict(self.__dict__, ok=self.ok)


def compare(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float, float]:
    """(max_abs, max_rel, cosine) of `actual` against `reference`, computed in float64."""
    if reference.shape != actual.shape:
        raise ValueError(f"output shape {actual.shape} differs from the reference shape {reference.shape}")
    ref, act = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    if not np.isfinite(act).all():
        return float("inf"), float("inf"), float("nan")
    max_abs = float(np.abs(act - ref).max())
    scale = float(np.abs(ref).max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    norms = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float(ref @ act / norms) if norms > 0 else float(max_abs == 0)
    return max_abs, max_rel, cosine


def torch_reference(spec: SubmodelSpec, modules: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the PyTorch module a submodel was exported from, the way optimum's export wraps it:
    text encoder -> last hidden state, UNet -> noise prediction, VAE encoder -> latent
    distribution parameters (mean and log-variance), VAE decoder -> image."""
    import torch
    inputs = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
    module = modules[spec.source]
    with torch.inference_mode():
        if spec.name == "text_encoder":
            result = {"last_hidden_state": module(input_ids=inputs["input_ids"]).last_hidden_state}
        elif spec.name == "unet":
            result = {"out_sample": module(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample}
        elif spec.name == "vae_decoder":
            result = {"sample": module.decode(inputs["latent_sample"]).sample}
        elif spec.name == "vae_encoder":
            result = {"latent_parameters": module.encode(inputs["sample"]).latent_dist.parameters}
        else:
            raise ValueError(f"no PyTorch reference for submodel {spec.name!r}")
    return {name: result[name].float().numpy() for name in spec.output_names}


def ort_session(model_path: Path):
    """A CPU ONNX Runtime session. fp16 graphs run too: ORT's CPU EP has no fp16 kernels for Conv,
    MatMul, Add, the norms, ...; its InsertCastTransformer wraps them in Casts and computes them in
    fp32 (tiny UNet: 97 Casts in the graph, 391 after ORT's transforms; only Reshape/Transpose/
    Shape/Concat-like ops stay fp16). So CPU fp16 parity measures fp16 weight and activation
    storage rounding, not fp16 arithmetic; GPU engines must re-check with their own EP."""
    # log_severity 3 (the factory's default): the fp16 graphs' "cast inserted" notes are expected, not warnings
    return core_ort_session(model_path)


FP16_CPU_PARITY_METHOD = ("onnxruntime CPUExecutionProvider: ops without fp16 CPU kernels (Conv, MatMul, norms, "
                          "elementwise) run in fp32 behind inserted Casts, so this measures fp16 weight/activation "
                          "storage rounding, not fp16 arithmetic")


def measure(spec: SubmodelSpec, precision: str, level: str, sizes: dict, session,
            feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Parity]:
    outputs = session.run(spec.output_names, feeds)
    rows = []
    for name, actual in zip(spec.output_names, outputs):
        max_abs, max_rel, cosine = compare(reference[name], actual)
        rows.append(Parity(spec.name, precision, level, dict(sizes), name, max_abs, max_rel, cosine,
                           spec.max_rel_error[precision], spec.min_cosine[precision]))
    return rows


def format_table(rows: list[Parity]) -> str:
    header = f"{'submodel':<13} {'prec':<5} {'level':<5} {'sizes':<18} {'max_abs':>10} {'max_rel':>10} " \
             f"{'rel_limit':>10} {'cosine':>10} {'cos_limit':>10}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        sizes = "B={B} {H}x{W}".format(**r.sizes)
        lines.append(f"{r.submodel:<13} {r.precision:<5} {r.level:<5} {sizes:<18} {r.max_abs:>10.3e} "
                     f"{r.max_rel:>10.3e} {r.max_rel_limit:>10.1e} {r.cosine:>10.7f} {r.min_cosine_limit:>10.5f}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def raise_on_failure(rows: list[Parity]) -> None:
    for r in rows:
        if not r.ok:
            raise ValueError(
                f"{r.submodel} {r.precision} parity vs PyTorch failed at {r.level} sizes {r.sizes} on {r.output!r}: "
                f"max_rel {r.max_rel:.3e} (limit {r.max_rel_limit:.1e}), cosine {r.cosine:.7f} "
                f"(limit {r.min_cosine_limit}), max_abs {r.max_abs:.3e}; keep more ops in fp32 "
                f"(op_block_list in export/onnx_export.py) or loosen the spec's thresholds only with a reason")
