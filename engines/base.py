"""The Engine interface lives in the core (toonark/engine.py) so the offline pipeline and calibration
take engine objects without importing this stage; re-exported here for the backends."""
from toonark.engine import Engine

__all__ = ["Engine"]
