"""LoRA styles on built engines, switched per request without re-export.

    base = LoraBase.from_onnx(layout.onnx("fp32", "unet"), "unet")     # module -> fp32 weight (the pristine base)
    styles = LoraSet.from_folder("styles/", {"unet": base_unet, "text_encoder": base_te})
    unet = LoraOrtEngine(engine_path, spec, metadata, base_unet, styles, cache_size=4)
    unet.select("crayon", 0.8); unet.run(feeds)                          # A -> B -> A gives A's exact bytes

Three steps, each its own piece:
1. **The base** (`LoraBase`): the fp32 export names every layer in its node names
   (`/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`), so the diffusers module path of a
   LoRA key maps to the initializer that holds its weight (MatMul: stored transposed; Conv / Gemm(transB)
   as is). Its values are the pristine fp32 weights every merge starts from.
2. **Where the engine keeps a weight** (`EngineWeightMap`): the engine graph is not the export: ORT's
   optimizer renames initializers, the CUDA fusions pack Q/K/V (self-attention, per head interleaved:
   `dstack(q, k, v).reshape(c, n*3*h)`) or K/V (cross-attention) into one MatMul weight, turn convolutions
   into NhwcConv with (O, kh, kw, I) weights, and fp16 builds cast. The map is found by value: each base
   weight's candidate forms (as stored, transposed, NHWC, packed with its siblings for each head count,
   cast to the engine's dtype as ORT's fp16 conversion casts: `cast`) are compared with the engine's
   initializers of that shape and dtype; a targeted layer without a match is refused by name. Merged weights
   then go through the same form.
3. **Switching** (`LoraOrtEngine`): a weight set is {engine initializer: array} computed from the base
   (`toonark.lora.merged_weight`), kept in an LRU of `cache_size` sets; initializers a set does not touch get
   the base values back when it is selected, so the engine's weights are a function of (name, scale) only.
   Two ways to put a set into ONNX Runtime, measured in benchmarks/gpu_lora.py:
   - `inplace`: the session is created once with `SessionOptions.add_initializer` OrtValues for every
     initializer any registered LoRA touches (`session.disable_prepacking`, so kernels read them, not a packed
     copy), and a switch writes the new values into those same buffers: no session re-creation, and a CUDA
     graph that captured their addresses stays valid.
   - `recreate`: a new session with the set's OrtValues as initializers (always correct; a CUDA graph is
     captured again on its first run).
   `verify=True` (default on the first switch) compares the in-place engine against a recreated one on fixed
   inputs and falls back to `recreate` when ONNX Runtime did not read the buffers (e.g. an EP that copied them).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toonark.lora import LoraError, LoraFile, lora_registry, merged_weight, read_lora

log = logging.getLogger(__name__)

LORA_SUBMODELS = ("unet", "text_encoder")
STRATEGIES = ("inplace", "recreate")
DEFAULT_CACHE_SIZE = 4


# --- 1. the base --------------------------------------------------------------------------------

def _module_of(node_name: str) -> str | None:
    """'/down_blocks.0/attentions.0/proj_in/Conv' -> 'down_blocks.0.attentions.0.proj_in'."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "m":   # the benchmark exporter (export/torch_onnx.py) wraps the module as `m`
        parts = parts[1:]
    return ".".join(parts[:-1]) if len(parts) >= 2 else None


@dataclass
class LoraBase:
    """The adaptable layers of one submodel: module -> fp32 weight in torch layout (out, in[, kh, kw])."""
    submodel: str
    weights: dict[str, np.ndarray]
    # module -> (export initializer name, stored transposed): where a merged export would put the weight
    sources: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(w.shape) for m, w in self.weights.items()}

    @classmethod
    def from_onnx(cls, fp32_onnx: Path, submodel: str) -> "LoraBase":
        import onnx
        from onnx import numpy_helper
        model = onnx.load(str(fp32_onnx), load_external_data=True)
        inits = {t.name: t for t in model.graph.initializer}
        weights: dict[str, np.ndarray] = {}
        sources: dict[str, tuple[str, bool]] = {}
        for node in model.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
                continue
            module = _module_of(node.name)
            if module is None or module in weights:
                continue
            value = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            transposed = False
            if node.op_type == "MatMul" and value.ndim == 2:
                value, transposed = value.T, True    # torch Linear weight is (out, in); MatMul stores (in, out)
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                value, transposed = (value, False) if trans_b else (value.T, True)
            elif node.op_type != "Conv":
                continue
            weights[module] = np.ascontiguousarray(value)
            sources[module] = (node.input[1], transposed)
        if not weights:
            raise LoraError(f"{fp32_onnx}: no MatMul/Gemm/Conv layer names found; LoRA needs the fp32 export of "
                            f"`make export` (node names carry the module paths)")
        return cls(submodel, weights, sources)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save
        from toonark.files import atomic_file
        data = {m: np.ascontiguousarray(w) for m, w in self.weights.items()}
        with atomic_file(Path(path)) as handle:
            handle.write(save(data, metadata={"submodel": self.submodel}))

    @classmethod
    def load(cls, path: Path) -> "LoraBase":
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as handle:
            submodel = (handle.metadata() or {}).get("submodel", "")
            return cls(submodel, {k: handle.get_tensor(k) for k in handle.keys()})

    def subset(self, modules) -> "LoraBase":
        return LoraBase(self.submodel, {m: self.weights[m] for m in modules})


# --- the registry -------------------------------------------------------------------------------

@dataclass
class LoraSet:
    """The registered LoRAs, bound to the bases: name -> {(submodel, module): LoraLayer}."""
    files: dict[str, LoraFile]
    layers: dict[str, dict]

    @classmethod
    def from_folder(cls, folder: Path, shapes: dict[str, dict[str, tuple[int, ...]]]) -> "LoraSet":
        """shapes: {submodel: {module: weight shape}} of every adaptable layer (LoraBase.shapes)."""
        files = {name: read_lora(path, name) for name, path in lora_registry(folder).items()}
        return cls(files, {name: f.bind(shapes) for name, f in files.items()})

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def modules(self, submodel: str) -> set[str]:
        """Modules of `submodel` that any registered LoRA adapts."""
        return {m for layers in self.layers.values() for (sub, m) in layers if sub == submodel}

    def for_submodel(self, name: str, submodel: str) -> dict[str, object]:
        if name and name not in self.layers:
            raise LoraError(f"LoRA {name!r} is not registered; known: {', '.join(self.names)}")
        return {m: layer for (sub, m), layer in self.layers.get(name, {}).items() if sub == submodel}


# --- 2. where the engine keeps a weight ---------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """One engine initializer built from base modules: form 'same' (as the export stores it: transposed for
    MatMul), 'torch' (out, in[...]), 'nhwc' (O, kh, kw, I), 'nchwc<block>[o]' (ORT CPU's blocked conv filters), 'packed' (self-attn QKV / cross-attn KV, `heads`)."""
    initializer: str
    form: str
    modules: tuple[str, ...]
    dtype: str
    heads: int = 0


def _stored(weight: np.ndarray) -> np.ndarray:
    """torch layout -> how MatMul stores it (in, out); convolutions are stored as is."""
    return weight.T if weight.ndim == 2 else weight


def _pack(weights: list[np.ndarray], heads: int) -> np.ndarray:
    """ORT's FusionAttentionUnet packing over (in, out) MatMul weights: per head interleaved."""
    c, out = weights[0].shape
    h = out // heads
    return np.dstack([w.reshape(c, heads, h) for w in weights]).reshape(c, heads * len(weights) * h)


def render(form: str, weights: list[np.ndarray], heads: int = 0) -> np.ndarray:
    """The engine form of torch-layout weights (one, or the packed siblings)."""
    if form == "packed":
        return _pack([_stored(w) for w in weights], heads)
    weight = weights[0]
    if form == "same":
        return _stored(weight)
    if form == "torch":
        return weight
    if form == "nhwc":
        return weight.transpose(0, 2, 3, 1)
    if form.startswith("nchwc"):   # ORT CPU's blocked conv filters (MLAS OIHWBiBo / OIHWBo), same outer shape
        block = int(form[len("nchwc"):].rstrip("o"))
        o, i, kh, kw = weight.shape
        if form.endswith("o"):
            return weight.reshape(o // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1).reshape(weight.shape)
        return weight.reshape(o // block, block, i // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1).reshape(
            weight.shape)
    raise ValueError(f"unknown weight form {form!r}")


FP16_MIN_POSITIVE = np.float16(5.96e-8)   # ORT float16.py's min_positive_val (the smallest fp16 subnormal)
FP16_MAX_FINITE = np.float16(65504.0)      # ... and max_finite_val


def cast(value: np.ndarray, dtype) -> np.ndarray:
    """`value` in the engine dtype, as the fp16 builds cast it. ORT's `convert_float_to_float16` (both
    `make engine` fp16 paths: export/onnx_export.py convert_fp16 and engines/fusions.py) does not round a
    weight as numpy does: nonzero magnitudes below 5.96e-8 become +-5.96e-8 (not 0) and finite ones past
    65504 become +-65504 (not inf). A plain `astype(float16)` differs there, and SD-1.5-sized layers have
    such weights (the random SD-1.5 build: 285 weights in 85 of its attention/feed-forward layers), so
    the value search missed whole layers. Same bytes as ORT's `convert_np_to_float16` (tested), ~9x
    faster (it matters for a cold switch: 33 vs 290 ms per 3.3 M weights)."""
    if np.dtype(dtype) != np.float16:
        return value.astype(dtype)
    value = np.asarray(value, dtype=np.float32)
    with np.errstate(over="ignore"):
        out = value.astype(np.float16)
    small = (out == 0) & (value != 0)
    if small.any():
        out[small] = np.copysign(FP16_MIN_POSITIVE, value[small])
    big = np.isinf(out) & np.isfinite(value)
    if big.any():
        out[big] = np.copysign(FP16_MAX_FINITE, value[big])
    return out


def _siblings(module: str, modules) -> list[tuple[str, ...]]:
    """Packed groups a module may belong to: (to_q, to_k, to_v) and (to_k, to_v) of one attention."""
    parent, _, leaf = module.rpartition(".")
    groups = []
    if leaf in ("to_q", "to_k", "to_v"):
        qkv = tuple(f"{parent}.{x}" for x in ("to_q", "to_k", "to_v"))
        if all(m in modules for m in qkv):
            groups.append(qkv)
        if leaf != "to_q":
            groups.append(tuple(f"{parent}.{x}" for x in ("to_k", "to_v")))
    return groups


class EngineWeightMap:
    """module -> the engine initializers that hold it (Placement), found by value (module docstring)."""

    def __init__(self, engine_onnx: Path, base: LoraBase, modules=None):
        """base: the submodel's base (the adapted modules and their Q/K/V siblings); modules: those to map."""
        import onnx
        from onnx import numpy_helper
        started = time.perf_counter()
        model = onnx.load(str(engine_onnx), load_external_data=True)
        self.values: dict[str, np.ndarray] = {}
        by_shape: dict[tuple, list[str]] = {}
        for tensor in model.graph.initializer:
            if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(tensor.dims) < 2:
                continue
            value = numpy_helper.to_array(tensor)
            self.values[tensor.name] = value
            by_shape.setdefault((value.shape, value.dtype.str), []).append(tensor.name)
        self.engine_onnx = Path(engine_onnx)
        self.placements: dict[str, list[Placement]] = {}
        everything = base.weights
        groups: dict[tuple, list[Placement]] = {}   # packed Q/K/V groups already found (one map per group)

        def matches(typed: np.ndarray, prefix: np.ndarray | None = None):
            """Engine initializers equal to `typed`; `prefix` (its first row) rules most out cheaply first."""
            head = (typed.reshape(typed.shape[0], -1)[:1] if prefix is None else prefix).reshape(-1)
            for name in by_shape.get((typed.shape, typed.dtype.str), ()):
                value = self.values[name]
                if np.array_equal(value.reshape(value.shape[0], -1)[:1].reshape(-1), head) and \
                        np.array_equal(value, typed):
                    yield name

        for module in sorted(base.weights if modules is None else modules):
            found = []
            weight = everything[module]
            forms = ["same", "torch"]
            if weight.ndim == 4:
                forms += ["nhwc"] + [f"nchwc{b}{o}" for b in (8, 16) for o in ("", "o")
                                     if weight.shape[0] % b == 0 and (o or weight.shape[1] % b == 0)]
            for form in forms:
                value = render(form, [weight])
                for dtype in (np.float32, np.float16):
                    found += [Placement(name, form, (module,), np.dtype(dtype).name)
                              for name in matches(cast(value, dtype))]
            for group in _siblings(module, everything):
                if len({everything[m].shape for m in group}) != 1:
                    continue   # cross-attention: q reads the image, k/v the text
                if group not in groups:
                    groups[group] = []
                    out = everything[group[0]].shape[0]
                    for heads in (n for n in range(1, out + 1) if out % n == 0 and n <= 128):
                        first = render("packed", [everything[m][:, :1] for m in group], heads)   # row 0 only
                        for dtype in (np.float32, np.float16):
                            shape = (everything[group[0]].shape[1], first.shape[1])
                            if not any(np.array_equal(self.values[n][:1].reshape(-1), cast(first, dtype).reshape(-1))
                                       for n in by_shape.get((shape, np.dtype(dtype).str), ())):
                                continue
                            full = cast(render("packed", [everything[m] for m in group], heads), dtype)
                            groups[group] += [Placement(name, "packed", group, np.dtype(dtype).name, heads)
                                              for name in matches(full)]
                found += groups[group]
            if not found:
                raise LoraError(f"{engine_onnx}: the weight of layer {module!r} is not in this engine in any form "
                                f"toonark knows (as exported, NCHWc, NHWC, packed QKV/KV; fp32/fp16); rebuild the "
                                f"engine with `make engine`, or report the fusion that changed it")
            self.placements[module] = found
        self.seconds = time.perf_counter() - started
        log.info("%s: %d LoRA layers mapped to %d initializers in %.2f s", engine_onnx.name, len(self.placements),
                 len(self.initializers), self.seconds)

    @property
    def initializers(self) -> dict[str, Placement]:
        return {p.initializer: p for ps in self.placements.values() for p in ps}

    def weight_set(self, base: LoraBase, layers: dict, scale: float, only: set[str] | None = None) -> dict[str, np.ndarray]:
        """{engine initializer: value in the engine dtype} for every initializer holding a module of `layers`
        (or `only`), each computed from the pristine base: modules the LoRA does not adapt keep base values."""
        names = only if only is not None else {p.initializer for m in layers for p in self.placements[m]}
        table = self.initializers
        merged: dict[str, np.ndarray] = {}
        out = {}
        for name in sorted(names):
            placement = table[name]
            weights = []
            for module in placement.modules:
                if module not in merged:
                    merged[module] = (merged_weight(base.weights[module], layers[module], scale)
                                      if module in layers else base.weights[module])
                weights.append(merged[module])
            out[name] = np.ascontiguousarray(cast(render(placement.form, weights, placement.heads), placement.dtype))
        return out


# --- 3. switching -------------------------------------------------------------------------------

@dataclass
class SwitchStats:
    switches: int = 0          # weight-set changes applied to the engine
    cache_hits: int = 0        # ... whose set was already computed (LRU)
    cache_misses: int = 0
    seconds: float = 0.0       # total time spent switching
    last_seconds: float = 0.0
    history: list = field(default_factory=list)   # (name, scale, cold, seconds), last 64

    def record(self, name, scale, cold: bool, seconds: float) -> None:
        self.switches += 1
        self.cache_hits += 0 if cold else 1
        self.cache_misses += 1 if cold else 0
        self.seconds += seconds
        self.last_seconds = seconds
        self.history = (self.history + [(name, scale, cold, seconds)])[-64:]


class LoraOrtEngine:
    """An ORT engine whose adaptable weights follow `select(name, scale)`; ("", any) is the base model.
    run / run_device / graph_values behave as the wrapped OrtEngine's. Thread-safe: the selection and the run
    that uses it happen under one lock (`run(feeds, lora=, scale=)`), so interleaved requests never mix."""

    def __init__(self, engine_path: Path, spec, metadata: dict, base: LoraBase, loras: LoraSet, *,
                 cache_size: int = DEFAULT_CACHE_SIZE, strategy: str = "inplace", verify: bool = True,
                 **engine_options):
        from toonark.engines.ort import OrtEngine
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown LoRA switch strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if cache_size < 1:
            raise ValueError(f"lora cache size must be >= 1, got {cache_size}")
        self.submodel = spec.name
        self.spec, self.metadata, self.engine_path = spec, metadata, Path(engine_path)
        self.loras, self.cache_size, self.strategy, self.verify = loras, cache_size, strategy, verify
        self.engine_options = engine_options
        modules = loras.modules(self.submodel)
        self.base = base
        self.map = EngineWeightMap(engine_path, base, modules) if modules else None
        self.touched = set(self.map.initializers) if self.map else set()
        self.base_set = self.map.weight_set(self.base, {}, 1.0, only=self.touched) if self.map else {}
        self.cache: OrderedDict = OrderedDict()
        self.stats = SwitchStats()
        self.current = ("", 1.0)
        self.lock = threading.RLock()
        self._OrtEngine = OrtEngine
        self.on_cuda = metadata["settings"]["providers"][0][0] == "CUDAExecutionProvider"
        self.device_id = int(metadata["settings"].get("device_id", 0))
        self.engine = self._new_engine(self.base_set, keep=True)

    # -- sessions ----------------------------------------------------------------------------
    def _ortvalues(self, values: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(OrtValues, device tensors). CPU: OrtValues over the numpy buffers themselves (a switch writes into
        them). CUDA: OrtValues over device memory this engine owns (torch tensors shared by DLPack; a switch
        copies into that same memory, so a captured CUDA graph keeps reading valid addresses). ORT refuses
        an initializer in memory it allocated itself ("Buffer containing the initializer must be owned by the
        user", onnxruntime-gpu 1.31 on the H200), and one in host memory is copied to the device once (a
        switch would not reach it)."""
        import onnxruntime as ort
        if not self.on_cuda:
            return {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()}, {}
        import torch
        from onnxruntime.capi import _pybind_state as C
        device = torch.device("cuda", self.device_id)
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)).to(device) for name, value in values.items()}
        torch.cuda.synchronize(device)
        return {name: ort.OrtValue(C.OrtValue.from_dlpack(t.__dlpack__(), False)) for name, t in tensors.items()}, tensors

    def _new_engine(self, values: dict[str, np.ndarray], keep: bool = False):
        # Own buffers: the session reads them for its lifetime (in-place switching writes into them).
        buffers = {name: np.array(value, copy=True) for name, value in values.items()}
        ortvalues, tensors = self._ortvalues(buffers)
        engine = self._OrtEngine(self.engine_path, self.spec, self.metadata, initializers=ortvalues or None,
                                 # CPU: MLAS would prepack (copy) the weights; CUDA: NhwcConv needs its prepack
                                 # (the OIHW -> OHWI transpose) and reads the other weights in place
                                 extra_config={"session.disable_prepacking": "1"} if ortvalues and not self.on_cuda
                                 else None,
                                 **self.engine_options)
        # alive as long as the session
        engine._lora_buffers, engine._lora_ortvalues, engine._lora_tensors = buffers, ortvalues, tensors
        return engine

    # -- weight sets -------------------------------------------------------------------------
    def weight_set(self, name: str, scale: float) -> tuple[dict[str, np.ndarray], bool]:
        """(set, cold): from the LRU, or computed from the base (cold)."""
        key = (name, float(scale))
        if not name or self.map is None:
            return self.base_set, False
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], False
        layers = self.loras.for_submodel(name, self.submodel)
        values = self.map.weight_set(self.base, layers, scale)
        self.cache[key] = values
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return values, True

    def select(self, name: str = "", scale: float = 1.0) -> None:
        """Make the engine's weights those of LoRA `name` at `scale` ("" = base), computed from the base."""
        key = (name or "", float(scale) if name else 1.0)
        with self.lock:
            if name:
                self.loras.for_submodel(name, self.submodel)   # refuses an unknown name
            if key == self.current or self.map is None:     # nothing of this submodel is adapted
                self.current = key
                return
            started = time.perf_counter()
            values, cold = self.weight_set(*key)
            full = {**self.base_set, **values}   # initializers this set does not touch go back to base
            if self.strategy == "recreate":
                self.engine = self._new_engine(full)
            else:
                for name_, value in full.items():
                    np.copyto(self.engine._lora_buffers[name_], value)
                    if self.on_cuda:
                        import torch
                        self.engine._lora_tensors[name_].copy_(torch.from_numpy(self.engine._lora_buffers[name_]))
                if self.on_cuda:
                    torch.cuda.synchronize(self.device_id)   # the next run (or graph replay) reads the new weights
                if self.verify:
                    self._verify(full)
            self.current = key
            self.stats.record(key[0], key[1], cold, time.perf_counter() - started)

    def _verify(self, full: dict) -> None:
        """Once: does the session read the buffers it was given? Compare with a session created with the set."""
        self.verify = False
        feeds = _probe_feeds(self.spec, self.metadata)
        ours = self.engine.run(feeds)
        fresh = self._new_engine(full).run(feeds)
        # CPU: bitwise. CUDA: another session may pick other cuDNN algorithms, so a small relative tolerance
        # (a LoRA's effect is orders of magnitude larger).
        tolerance = 2e-3 if self.on_cuda else 0.0
        if not all(np.abs(ours[k].astype(np.float64) - fresh[k]).max() <= tolerance * max(np.abs(fresh[k]).max(), 1e-12)
                   for k in ours):
            log.warning("%s: ONNX Runtime does not read in-place initializer updates here; switching by "
                        "re-creating the session", self.engine_path)
            self.strategy = "recreate"
            self.engine = self._new_engine(full)

    # -- running -----------------------------------------------------------------------------
    def run(self, feeds: dict, lora: str | None = None, scale: float = 1.0) -> dict:
        with self.lock:
            if lora is not None:
                self.select(lora, scale)
            return self.engine.run(feeds)

    def __call__(self, **feeds):
        return self.run(feeds)

    def run_device(self, *args, **kwargs):
        with self.lock:
            return self.engine.run_device(*args, **kwargs)

    def weights(self) -> dict[str, np.ndarray]:
        """The values the engine runs with now (copies), for tests and checks."""
        return {name: np.array(buffer, copy=True) for name, buffer in self.engine._lora_buffers.items()}

    def __getattr__(self, name):   # graph_values, session, ... of the current engine
        if name in ("engine", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.engine, name)


def _probe_feeds(spec, metadata) -> dict[str, np.ndarray]:
    """Small fixed inputs at the profile's min shapes (deterministic)."""
    rng = np.random.default_rng(0)
    feeds = {}
    profile = metadata.get("profile") or {}
    io = metadata.get("io", {}).get("inputs", {})
    for tensor in spec.inputs:
        shape = profile.get(tensor.name, {}).get("min") or [d if isinstance(d, int) and d > 0 else 1
                                                          for d in io.get(tensor.name, {}).get("shape", [1])]
        dtype = np.dtype(io.get(tensor.name, {}).get("dtype", "float32"))
        if dtype.kind in "iu":
            feeds[tensor.name] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def lora_bases(build_dir: Path, submodels=LORA_SUBMODELS) -> dict[str, LoraBase]:
    """The pristine bases of the adaptable submodels, from the build's fp32 export."""
    from toonark.layout import BuildLayout
    layout = BuildLayout(build_dir)
    return {sub: LoraBase.from_onnx(layout.onnx_model("fp32", sub), sub) for sub in submodels}


def load_loras(folder: Path, bases: dict[str, LoraBase]) -> LoraSet:
    return LoraSet.from_folder(Path(folder), {sub: base.shapes for sub, base in bases.items()})


def with_siblings(modules, known) -> set[str]:
    """modules plus the Q/K/V siblings a packed engine weight also holds (kept in the served base file)."""
    out = set(modules)
    for module in modules:
        for group in _siblings(module, known):
            out.update(group)
    return out
