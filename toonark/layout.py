"""Where each stage writes under a build folder (`OUT`). Resolved here once; every stage and
script asks this object instead of joining paths itself.

    OUT/pipeline/                      tokenizer/, scheduler/, model_index.json, toonark.json (dims + limits)
    OUT/onnx/<precision>/<submodel>/   model.onnx [+ model.onnx.data]      (export/)
    OUT/onnx/<precision>/export.json   source hash, parity report          (export/)
    OUT/calibration/                   capture/, int8/unet/model.onnx, report.json, sheets  (calibration/)
    OUT/engines/<backend>-<precision>/<submodel>/  model.onnx | model.plan, engine.json    (engines/)
    OUT/engines/timing.cache           TensorRT timing cache shared by builds
    OUT/triton_model_repo/             generated Triton model repository  (triton_model_repo/)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")


@dataclass(frozen=True)
class BuildLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def pipeline_info(self) -> Path:
        return self.pipeline / "toonark.json"

    def onnx_dir(self, precision: str) -> Path:
        return self.root / "onnx" / precision

    def onnx_model(self, precision: str, submodel: str) -> Path:
        return self.onnx_dir(precision) / submodel / "model.onnx"

    def export_report(self, precision: str) -> Path:
        return self.onnx_dir(precision) / "export.json"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def int8_unet(self) -> Path:
        return self.calibration / "int8" / "unet" / "model.onnx"

    def engine_dir(self, backend: str, precision: str) -> Path:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        return self.root / "engines" / f"{backend}-{precision}"

    @property
    def timing_cache(self) -> Path:
        return self.root / "engines" / "timing.cache"

    @property
    def triton_repo(self) -> Path:
        return self.root / "triton_model_repo"
