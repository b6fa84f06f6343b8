"""Engine stage: build and load ONNX Runtime (CPU / CUDA) and TensorRT engines from the export."""
from toonark.engines.build import build_engines, load_engine

__all__ = ["build_engines", "load_engine"]
