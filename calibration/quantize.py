"""Explicit-QDQ INT8 UNet with onnxruntime.quantization.quantize_static, placed the TensorRT way.

TensorRT builds an INT8 engine from an explicitly quantized ONNX graph: it reads each
QuantizeLinear/DequantizeLinear pair as "run the consumer in int8 with this scale". What it wants
(and what nvidia-modelopt emits; see docs/ and shared int8-notes) is:

  * symmetric int8 activations and weights, zero-points 0, per-channel weights;
  * Q/DQ on the *inputs* of the quantized ops only (Conv, MatMul, Gemm) - never after them
    (`OpTypesToExcludeOutputQuantization` = every op type), which also keeps ORT's CPU from fusing
    to QLinear* kernels that drift from QDQ semantics on non-VNNI CPUs; and a DequantizeLinear output
    feeds only those ops: float layers that share the tensor (a GroupNorm, a skip Concat) read the
    float tensor again (`inputs_only_placement`), else TensorRT would run them on int8 inputs;
  * biases left in float (`QuantizeBias=False`, no int32 bias scale adjustment of the weights);
  * sensitive layers kept in float: conv_in, conv_out, the time embedding and every normalisation.
    Their node names are found in the graph by structure and name pattern (`sensitive_nodes`), never
    by index, and the set is configurable (`QuantConfig.keep_float`, `exclude_patterns`).

Calibration data are the UNet inputs `capture.py` recorded at every sampler step; `ShardReader`
streams them from disk in chunks (`CalibStridedMinMax`), so memory is bounded by `chunk` shards
plus ORT's per-chunk activations, whatever the number of prompts x steps.

The alternative tool is nvidia-modelopt (`modelopt.onnx.quantization.quantize(..., quantize_mode=
"int8", calibration_eps=["cpu"], high_precision_dtype="fp32")`); it is not a dependency here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from toonark.files import atomic_dir, read_json, sha256_onnx, write_json

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
NORM_OP_TYPES = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization")

# Layers that may be kept in float, by name. The defaults follow the TensorRT diffusion demo and
# int8-notes.md: quantizing conv_in/conv_out or the normalisations costs far more accuracy than it saves.
KEEP_FLOAT_GROUPS = ("conv_in", "conv_out", "time_embedding", "norm", "time_emb_proj", "attention_bmm")
DEFAULT_KEEP_FLOAT = ("conv_in", "conv_out", "time_embedding", "norm")

_PASS_THROUGH = ("Identity", "Cast")
_TIME_EMBEDDING = re.compile(r"(^|/)(time_proj|time_embedding|time_embed|time_text_embed)(/|$)")
# An MMDiT has no convolutions: its input and output projections play conv_in's and conv_out's part
# (Qwen-Image: img_in / txt_in, proj_out).
_PROJ_IN = re.compile(r"(^|/)(img_in|txt_in|x_embedder|context_embedder)(/|$)")
_PROJ_OUT = re.compile(r"(^|/)proj_out(/|$)")
_LINEAR_OPS = ("MatMul", "Gemm", "Add")
_TIME_EMB_PROJ = re.compile(r"(^|/)time_emb_proj(/|$)")
_NORM_SCOPE = re.compile(r"(^|/)(norm\d*|norm_out|conv_norm_out|group_norm|layer_norm)(/|$)")
_CONV_IN = re.compile(r"(^|/)conv_in(/|$)")
_CONV_OUT = re.compile(r"(^|/)conv_out(/|$)")

QUANTIZE_INFO = "quantize.json"   # beside the int8 model: what it was made from
# Bump when quantize_unet's fixed options change, so older INT8 models are rebuilt.
RECIPE_VERSION = 3


@dataclass(frozen=True)
class QuantConfig:
    """Every knob that changes the INT8 model; stored beside it and in the gate report."""
    method: str = "percentile"
    percentile: float = 99.99
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    exclude_patterns: tuple[str, ...] = ()
    output_quantization: bool = False      # True = ORT's default placement (Q after ops too); not for TensorRT
    smooth_quant: bool = False
    smooth_quant_alpha: float = 0.5
    preprocess: bool = False               # onnxruntime.quantization.quant_pre_process first
    chunk: int = 8                         # shards per calibration pass (memory bound)

    def __post_init__(self):
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "exclude_patterns", tuple(self.exclude_patterns))
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} must be in 90..100 (99.99 is the default)")
        unknown = [g for g in self.keep_float if g not in KEEP_FLOAT_GROUPS]
        if unknown:
            raise ValueError(f"unknown keep-float group(s) {', '.join(unknown)}; choose from {', '.join(KEEP_FLOAT_GROUPS)}")
        if not self.op_types:
            raise ValueError("op_types is empty: name the op types to quantize (Conv,MatMul,Gemm) or 'all'")
        if "all" in self.op_types and len(self.op_types) > 1:
            raise ValueError(f"op_types {','.join(self.op_types)}: 'all' cannot be combined with op types")
        for pattern in self.exclude_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a regular expression: {err}") from None
        if self.chunk < 1:
            raise ValueError(f"chunk {self.chunk} must be >= 1")
        if not 0.0 < self.smooth_quant_alpha < 1.0:
            raise ValueError(f"SmoothQuant alpha {self.smooth_quant_alpha} must be in (0, 1)")

    def check_available(self) -> None:
        """Fail before any work when an option needs a package that is not installed."""
        if self.smooth_quant and importlib.util.find_spec("neural_compressor") is None:
            raise RuntimeError("--smooth-quant needs Intel Neural Compressor (package `neural-compressor`), which "
                               "onnxruntime.quantization calls for SmoothQuant and which is not installed; "
                               "drop --smooth-quant or add neural-compressor to the environment")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Sensitive layers, found in the graph


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            table.setdefault(name, []).append(node)
    return table


def sensitive_nodes(model: onnx.ModelProto, groups: tuple[str, ...], patterns: tuple[str, ...] = ()
                    ) -> dict[str, list[str]]:
    """{group: node names} for the keep-float groups plus {"pattern:<re>": names} for each pattern.

    conv_in is the Conv fed by a graph input and conv_out the Conv that produces a graph output
    (through Identity/Cast only); both fall back to their diffusers names. The rest match the
    diffusers module scopes in the exported node names (`/time_embedding/linear_1/Gemm`) or op types.
    Raises if a requested group matches nothing, so a renamed graph cannot silently quantize them.
    """
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    graph_inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    initializers = {i.name for i in graph.initializer}
    nodes = [n for n in graph.node if n.name]

    def fed_by_graph_input(node) -> bool:
        name = node.input[0]
        while name not in graph_inputs:
            parent = producers.get(name)
            if parent is None or parent.op_type not in _PASS_THROUGH:
                return False
            name = parent.input[0]
        return True

    def feeds_graph_output(node) -> bool:
        frontier = [node.output[0]]
        while frontier:
            name = frontier.pop()
            if name in graph_outputs:
                return True
            frontier += [c.output[0] for c in consumers.get(name, []) if c.op_type in _PASS_THROUGH]
        return False

    def constant(name: str) -> bool:
        parent = producers.get(name)
        return name in initializers or (parent is not None and parent.op_type in ("Constant", "DequantizeLinear"))

    found: dict[str, list[str]] = {}
    for group in groups:
        if group == "conv_in":
            names = [n.name for n in nodes if n.op_type == "Conv" and fed_by_graph_input(n)] or \
                    [n.name for n in nodes if n.op_type == "Conv" and _CONV_IN.search(n.name)] or \
                    [n.name for n in nodes if n.op_type in _LINEAR_OPS and _PROJ_IN.search(n.name)]
        elif group == "conv_out":
            names = [n.name for n in nodes if n.op_type == "Conv" and feeds_graph_output(n)] or \
                    [n.name for n in nodes if n.op_type == "Conv" and _CONV_OUT.search(n.name)] or \
                    [n.name for n in nodes if n.op_type in _LINEAR_OPS and _PROJ_OUT.search(n.name)]
        elif group == "time_embedding":
            names = [n.name for n in nodes if _TIME_EMBEDDING.search(n.name)]
        elif group == "time_emb_proj":
            names = [n.name for n in nodes if _TIME_EMB_PROJ.search(n.name)]
        elif group == "norm":
            names = [n.name for n in nodes if n.op_type in NORM_OP_TYPES or _NORM_SCOPE.search(n.name)]
        elif group == "attention_bmm":   # activation x activation MatMuls: Q.K^T and P.V
            names = [n.name for n in nodes if n.op_type == "MatMul" and not any(constant(i) for i in n.input)]
        else:
            raise ValueError(f"unknown keep-float group {group!r}; choose from {', '.join(KEEP_FLOAT_GROUPS)}")
        if not names:
            raise ValueError(f"keep-float group {group!r} matches no node in the UNet graph (names like "
                             f"{', '.join(n.name for n in nodes[:3])}, ...); drop it from --keep-float or "
                             f"name the layers with --exclude-pattern")
        found[group] = names
    for pattern in patterns:
        regex = re.compile(pattern)
        names = [n.name for n in nodes if regex.search(n.name)]
        if not names:
            raise ValueError(f"--exclude-pattern {pattern!r} matches no node name (names look like "
                             f"{nodes[len(nodes) // 2].name!r}); fix the pattern")
        found[f"pattern:{pattern}"] = names
    return found


# ---------------------------------------------------------------------------------------------
# Calibration data


def _make_reader(shards: list[Path]):
    from onnxruntime.quantization import CalibrationDataReader

    class ShardReader(CalibrationDataReader):
        """Streams captured UNet inputs, one shard (= one sampler step of one prompt) at a time.
        `set_range` lets quantize_static calibrate in chunks (CalibStridedMinMax), which bounds memory."""

        def __init__(self, paths: list[Path]):
            self.paths = list(paths)
            self.start, self.end = 0, len(self.paths)
            self.position = self.start

        def __len__(self) -> int:
            return len(self.paths)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, min(end_index, len(self.paths))
            self.position = self.start

        def get_next(self):
            if self.position >= self.end:
                return None
            with np.load(self.paths[self.position]) as shard:
                feeds = {name: shard[name] for name in shard.files}
            self.position += 1
            return feeds

        def rewind(self) -> None:
            self.position = self.start

    return ShardReader(shards)


def _stride(total: int, chunk: int) -> int:
    """Largest stride <= chunk that divides total (quantize_static requires divisibility)."""
    for stride in range(min(chunk, total), 0, -1):
        if total % stride == 0:
            return stride
    return 1


# ---------------------------------------------------------------------------------------------
# Quantize


@dataclass
class QuantizeResult:
    path: Path
    source_onnx_sha256: str
    int8_onnx_sha256: str
    config: QuantConfig
    excluded: dict[str, list[str]]
    summary: dict
    seconds: float
    cached: bool = False


def _pre_process(source: Path, target: Path, large: bool) -> None:
    """onnxruntime's quant_pre_process (shape inference + graph cleanup). Its symbolic shape
    inference gives up on some exports ("Incomplete symbolic shape inference"); then it is run
    without that pass, and a second failure is reported with the option that asked for it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    source, target = Path(source).resolve(), Path(target).resolve()   # before the chdir below

    def run(skip_symbolic_shape: bool) -> None:
        # ORT's symbolic shape inference saves sym_shape_infer_temp.onnx (+ uuid .data files) into
        # the current directory on failure: keep that litter out of the caller's cwd.
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch), \
                contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic_shape,
                              save_as_external_data=large)
    try:
        run(skip_symbolic_shape=False)
        return
    except Exception:   # noqa: BLE001 - ORT raises a bare Exception here
        logging.getLogger(__name__).info("quant_pre_process: symbolic shape inference failed; retrying without it")
    try:
        run(skip_symbolic_shape=True)
    except Exception as err:   # noqa: BLE001
        raise RuntimeError(f"--preprocess: onnxruntime quant_pre_process failed on {source}: {err}; "
                           f"run without --preprocess (it changes little for this UNet, see docs)") from None


def _method_enum(method: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]


def read_quantize_info(int8_path: Path) -> dict | None:
    info = Path(int8_path).parent / QUANTIZE_INFO
    if not Path(int8_path).is_file() or not info.is_file():
        return None
    try:
        return read_json(info, "int8 model info", "")
    except ValueError:
        return None


def quantize_unet(source_onnx: Path, shards: list[Path], output: Path, config: QuantConfig,
                  capture_key: str = "", force: bool = False,
                  calibration_providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> QuantizeResult:
    """Write the QDQ INT8 UNet to `output` (its folder is replaced atomically, with quantize.json).

    Reuses an existing output when it was made from the same source hash, capture and config.
    `calibration_providers` only says where the calibration passes run (e.g. CUDA for an SD-1.5
    UNet); it does not change the model, so it is not part of the config."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    config.check_available()
    source_onnx, output = Path(source_onnx), Path(output)
    if not source_onnx.is_file():
        raise FileNotFoundError(f"source UNet ONNX not found: {source_onnx}; run `make export OUT=<build>` first")
    if not shards:
        raise ValueError("no calibration shards: run the capture first (make calibrate captures before quantizing)")
    source_sha = sha256_onnx(source_onnx)
    key = {"recipe_version": RECIPE_VERSION, "source_onnx_sha256": source_sha, "capture_key": capture_key, "config": config.to_json()}
    info = read_quantize_info(output)
    if not force and info and all(info.get(k) == v for k, v in key.items()):
        return QuantizeResult(output, source_sha, info["int8_onnx_sha256"], config, info["excluded"],
                              info["summary"], info["seconds"], cached=True)

    started = time.perf_counter()
    large = source_onnx.stat().st_size + sum(p.stat().st_size for p in source_onnx.parent.glob("*.data")) > 1_800_000_000
    with tempfile.TemporaryDirectory(prefix="toonark-quant-") as tmp:
        model_input = source_onnx
        if config.preprocess:
            model_input = Path(tmp) / "preprocessed.onnx"
            _pre_process(source_onnx, model_input, large)
        model = onnx.load(str(model_input), load_external_data=False)
        excluded = sensitive_nodes(model, config.keep_float, config.exclude_patterns)
        exclude_names = sorted({name for names in excluded.values() for name in names})
        all_op_types = sorted({n.op_type for n in model.graph.node})
        del model
        extra = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": True,
            "QuantizeBias": False,
            "QDQDisableWeightAdjustForInt32Bias": True,
            "CalibStridedMinMax": _stride(len(shards), config.chunk),
            "CalibPercentile": config.percentile,
        }
        if not config.output_quantization:
            extra["OpTypesToExcludeOutputQuantization"] = all_op_types
        if config.smooth_quant:
            extra.update(SmoothQuant=True, SmoothQuantAlpha=config.smooth_quant_alpha)
        with atomic_dir(output.parent) as folder:
            target = folder / output.name
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)   # "Please consider to run pre-processing" on every call
            all_types = config.op_types == ("all",)
            try:
                with contextlib.redirect_stdout(io.StringIO()):   # ORT prints a line per calibration pass
                    quantize_static(str(model_input), str(target), _make_reader(shards),
                                    quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=None if all_types else list(config.op_types),
                                    per_channel=True, reduce_range=False,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    nodes_to_exclude=exclude_names, use_external_data_format=large,
                                    calibrate_method=_method_enum(config.method), extra_options=extra,
                                    calibration_providers=list(calibration_providers))
            finally:
                root.setLevel(level)
            quantized = onnx.load(str(target), load_external_data=False)
            if not config.output_quantization:
                rewired = inputs_only_placement(quantized, all_op_types if all_types else config.op_types)
                onnx.save(quantized, str(target))   # external data (if any) stays where it is, same folder
            summary = qdq_summary(quantized, tuple(all_op_types) if all_types else config.op_types)
            if not config.output_quantization:
                summary["rewired_float_consumers"] = rewired
            del quantized
            int8_sha = sha256_onnx(target)
            seconds = round(time.perf_counter() - started, 2)
            write_json(folder / QUANTIZE_INFO, {**key, "int8_onnx_sha256": int8_sha, "excluded": excluded,
                                                "summary": summary, "seconds": seconds,
                                                "calibration_shards": len(shards)})
    return QuantizeResult(output, source_sha, int8_sha, config, excluded, summary, seconds)


def inputs_only_placement(model: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    """Make every DequantizeLinear output feed quantized op types only (in place); returns the
    number of rewired inputs.

    quantize_static puts one Q/DQ pair on a tensor and lets *all* its consumers read the DQ
    output, so a float layer that shares an input with a Conv (a GroupNorm's Reshape, a skip
    Concat) would read fake-quantized data, which TensorRT then runs as int8 input too. Those
    consumers are pointed back at the float tensor, and Q/DQ nodes left without readers are dropped.
    """
    graph = model.graph
    dq_source = {}
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_input:
            dq_source[node.output[0]] = q_input[node.input[0]]
    rewired = 0
    for node in graph.node:
        if node.op_type in op_types or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            if name in dq_source:
                node.input[index] = dq_source[name]
                rewired += 1
    for output in graph.output:
        if output.name in dq_source:
            raise RuntimeError(f"graph output {output.name} comes out of a DequantizeLinear; "
                               f"cannot apply input-only placement")
    while True:   # drop Q/DQ nodes whose outputs nobody reads (DQ first, then its Q)
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewired


# ---------------------------------------------------------------------------------------------
# Inspection


def qdq_summary(model: onnx.ModelProto, op_types: tuple[str, ...] = DEFAULT_OP_TYPES) -> dict:
    """Counts and placement facts of a QDQ model (used by the report and the tests).

    `dq_consumers`: op types that read a DequantizeLinear output; with TensorRT-style placement
    these are only the quantized op types. `quantized_nodes`: nodes with a DQ-fed data input."""
    graph = model.graph
    counts = Counter(n.op_type for n in graph.node)
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    dq_consumers = Counter(n.op_type for n in graph.node if n.op_type != "QuantizeLinear"
                           and any(i in dq_outputs for i in n.input))
    quantized = [n.name for n in graph.node if n.op_type in op_types and n.input and n.input[0] in dq_outputs]
    return {"quantize_linear": counts.get("QuantizeLinear", 0), "dequantize_linear": counts.get("DequantizeLinear", 0),
            "dq_consumers": dict(dq_consumers), "quantized_nodes": len(quantized),
            "quantized_by_type": dict(Counter(n.op_type for n in graph.node if n.name in set(quantized))), "nodes": len(graph.node)}
