"""Graph cleanup after export: a short chainable pass list (like the TensorRT demo's `Optimizer`)
that logs node and tensor counts after each pass, plus saving and validation against the spec.

    graph = GraphPasses(onnx.load(path), "unet")
    graph.select_outputs(spec.output_names).fold_constants().infer_shapes().check()
    save_model(graph.model, out_path)
    check_against_spec(out_path, spec)

The passes are polygraphy / onnx-graphsurgeon / onnx calls; nothing here rewrites nodes by hand.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from toonark.specs import Axis, SubmodelSpec

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; bigger models keep their weights in one side file.
PROTOBUF_LIMIT_BYTES = 2 ** 31 - 1
EXTERNAL_DATA_NAME = "model.onnx.data"

# ONNX element type of each spec dtype ("float" is float32 I/O in every precision: see onnx_export.py).
ONNX_ELEMENT_TYPES = {
    "float": onnx.TensorProto.FLOAT,
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "int64": onnx.TensorProto.INT64,
    "int32": onnx.TensorProto.INT32,
}


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, summed per initializer and node (the whole message's ByteSize fails past 2 GiB)."""
    return sum(t.ByteSize() for t in model.graph.initializer) + sum(n.ByteSize() for n in model.graph.node)


class GraphPasses:
    """Chainable cleanup passes over one ONNX model; each pass logs the node/tensor counts after it."""

    def __init__(self, model: onnx.ModelProto, name: str):
        self.model = model
        self.name = name
        self.history: list[tuple[str, int]] = []
        self._info("exported")

    def _info(self, step: str) -> None:
        nodes = len(self.model.graph.node)
        self.history.append((step, nodes))
        log.info("%s: %-18s %6d nodes %6d initializers", self.name, step, nodes, len(self.model.graph.initializer))

    def select_outputs(self, keep: list[str]) -> "GraphPasses":
        """Drop graph outputs not in `keep` (e.g. CLIP's pooler_output) and the nodes only they needed."""
        import onnx_graphsurgeon as gs
        graph = gs.import_onnx(self.model)
        by_name = {t.name: t for t in graph.outputs}
        missing = [name for name in keep if name not in by_name]
        if missing:
            raise ValueError(f"{self.name}: the exported graph has no output {missing[0]!r} "
                             f"(it has {sorted(by_name)}); the submodel spec and the export disagree")
        graph.outputs = [by_name[name] for name in keep]
        graph.cleanup().toposort()
        self.model = gs.export_onnx(graph)
        self._info("select_outputs")
        return self

    def cleanup(self) -> "GraphPasses":
        """Remove dead nodes and sort topologically (the fp16 converter appends its Casts at the end)."""
        import onnx_graphsurgeon as gs
        graph = gs.import_onnx(self.model)
        graph.cleanup().toposort()
        self.model = gs.export_onnx(graph)
        self._info("cleanup")
        return self

    def vectorize_scalar_inputs(self, spec: SubmodelSpec) -> "GraphPasses":
        """Give rank-0 graph inputs that the spec declares as shape [1] (the UNet's timestep) that
        shape, with a Reshape back to the scalar the traced graph computes with."""
        declared = {t.name: t for t in spec.inputs}
        graph = self.model.graph
        for value in graph.input:
            want = declared.get(value.name)
            if want is None or want.dims != (1,) or value.type.tensor_type.shape.dim:
                continue
            scalar, shape = f"{value.name}_scalar", f"{value.name}_scalar_shape"
            for node in graph.node:
                node.input[:] = [scalar if name == value.name else name for name in node.input]
            graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((0,), np.int64), shape))
            graph.node.insert(0, onnx.helper.make_node("Reshape", [value.name, shape], [scalar],
                                                       name=f"{value.name}_to_scalar"))
            value.type.tensor_type.shape.dim.add().dim_value = 1
        self._info("vectorize_scalar_inputs")
        return self

    def fold_constants(self) -> "GraphPasses":
        import onnxruntime
        from polygraphy.backend.onnx import fold_constants
        # polygraphy folds with ORT, whose graph optimizer warns once per unsqueeze it cannot
        # remove (hundreds of lines on a UNet); keep ORT's process log at errors.
        onnxruntime.set_default_logger_severity(3)
        # copy=False: a second in-memory copy of SD-1.5's 3.4 GB UNet is what runs a 24 GB box out of memory.
        self.model = fold_constants(self.model, error_ok=False, copy=False)
        self._info("fold_constants")
        return self

    def infer_shapes(self) -> "GraphPasses":
        # polygraphy goes through a file for models past the protobuf limit.
        from polygraphy.backend.onnx import infer_shapes
        self.model = infer_shapes(self.model, error_ok=False)
        self._info("infer_shapes")
        return self

    def name_io_axes(self, spec: SubmodelSpec) -> "GraphPasses":
        """Give the graph's dynamic I/O dims the spec's axis names ("2B", "H/8"). Shape inference
        rewrites output dims to formulas like 'floor(2.0*H/8)'; fixed dims are left alone, so
        check_against_spec still catches a real size mismatch."""
        for declared, values in ((spec.inputs, self.model.graph.input), (spec.outputs, self.model.graph.output)):
            by_name = {v.name: v for v in values}
            for tensor in declared:
                value = by_name.get(tensor.name)
                if value is None or len(value.type.tensor_type.shape.dim) != len(tensor.dims):
                    continue  # check_against_spec reports it with the full context
                for dim, want in zip(value.type.tensor_type.shape.dim, tensor.dims):
                    if isinstance(want, Axis) and not dim.HasField("dim_value"):
                        dim.dim_param = want.name
        self._info("name_io_axes")
        return self

    def check(self) -> "GraphPasses":
        """onnx.checker; path-based (through a temporary file) for models past the protobuf limit."""
        if model_bytes(self.model) < PROTOBUF_LIMIT_BYTES:
            onnx.checker.check_model(self.model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(self.model, path)
                onnx.checker.check_model(str(path))
        self._info("check")
        return self


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Inline when it fits in one protobuf, else all weights in a single `model.onnx.data` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model_bytes(model) < PROTOBUF_LIMIT_BYTES:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
        # onnx.save_model moved the weights out of `model` (raw_data cleared, locations set);
        # read them back so the caller's model is unchanged and can be saved or checked again.
        onnx.load_external_data_for_model(model, str(path.parent))


def load_model(path: Path) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}. Run `make export` first.")
    return onnx.load(str(path), load_external_data=True)


def _dim_text(dim: onnx.TensorShapeProto.Dimension) -> str | int:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or "?"


def check_against_spec(model: onnx.ModelProto | Path, spec: SubmodelSpec) -> None:
    """Raise ValueError naming the first difference between the graph's I/O and the spec:
    names (in order), element types, rank, fixed dims and dynamic dim names."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    for kind, declared, actual in (("input", spec.inputs, model.graph.input),
                                   ("output", spec.outputs, model.graph.output)):
        actual_names = [v.name for v in actual]
        if actual_names != [t.name for t in declared]:
            raise ValueError(f"{spec.name}: ONNX {kind}s are {actual_names}, the spec declares "
                             f"{[t.name for t in declared]}")
        for tensor, value in zip(declared, actual):
            where = f"{spec.name}: {kind} {tensor.name!r}"
            elem = value.type.tensor_type.elem_type
            expected = ONNX_ELEMENT_TYPES[tensor.dtype]
            if elem != expected:
                raise ValueError(f"{where} has element type {onnx.TensorProto.DataType.Name(elem)}, the spec "
                                 f"declares {tensor.dtype} ({onnx.TensorProto.DataType.Name(expected)})")
            dims = [_dim_text(d) for d in value.type.tensor_type.shape.dim]
            want = [d.name if isinstance(d, Axis) else d for d in tensor.dims]
            if len(dims) != len(want):
                raise ValueError(f"{where} has rank {len(dims)} {dims}, the spec declares rank {len(want)} {want}")
            for axis, (have, need) in enumerate(zip(dims, want)):
                if have != need:
                    raise ValueError(f"{where} axis {axis} is {have!r}, the spec declares {need!r} (dims {dims} vs {want})")
