"""The one interface the rest of toonark uses to run a built submodel, whatever the backend.

Core: the offline pipeline (toonark.pipeline), calibration and the served models take objects of this
type; the backends that make them (ONNX Runtime, TensorRT) live in engines/ and are chosen there
(toonark.engines.backends)."""
from __future__ import annotations

import abc

import numpy as np

from toonark.specs import SubmodelSpec


class Engine(abc.ABC):
    """A built submodel. `run` takes numpy arrays by input name (the spec's names and dtypes)
    and returns numpy arrays by output name. `metadata` is the engine.json beside the engine."""

    spec: SubmodelSpec
    metadata: dict

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(feeds)
