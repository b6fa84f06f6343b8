"""The one way toonark opens an ONNX Runtime session (engines, the device loop's step graph, export
parity, the safety checker, calibration's scoring UNet). Core module: onnxruntime is imported lazily,
so importing toonark stays light for code that never runs a session.

    session = ort_session("model.onnx")                                  # CPU, defaults
    session = ort_session(path, providers=[("CUDAExecutionProvider", {...}), "CPUExecutionProvider"],
                          level="disable_all", threads=1, sequential=True)
Every keyword left at None keeps ONNX Runtime's own default, so each caller states only what it means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

LEVELS = ("disable_all", "basic", "extended", "all")


def optimization_level(name: str):
    import onnxruntime as ort
    if name not in LEVELS:
        raise ValueError(f"unknown ORT optimization level {name!r}; choose one of {', '.join(LEVELS)}")
    return {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]


def ort_session(model: Path | str | bytes, *, providers: Iterable = ("CPUExecutionProvider",),
                level: str | None = None, threads: int | None = None, inter_threads: int | None = None,
                sequential: bool = False, log_severity: int | None = 3, config: dict[str, str] | None = None,
                free_dimensions: dict[str, int] | None = None, save_to: Path | None = None,
                initializers: dict | None = None):
    """An onnxruntime.InferenceSession. model: a path or serialized bytes. log_severity 3 (errors only):
    ORT warns about every Memcpy node, inserted fp16 Cast and unused initializer, all expected here.
    config: session config entries (e.g. session.disable_quant_qdq); save_to: optimized_model_filepath.
    initializers: {name: OrtValue} used instead of the model's initializers of those names (LoRA weight sets,
    toonark.engines.lora); the caller keeps them alive as long as the session."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = optimization_level(level)
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter_threads is not None:
        options.inter_op_num_threads = inter_threads
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if log_severity is not None:
        options.log_severity_level = log_severity
    for name, value in (free_dimensions or {}).items():
        options.add_free_dimension_override_by_name(name, value)
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))
