"""The device-resident denoising loop over ONNX Runtime engines (ort-cuda; also runs on ort-cpu).

    loop = DeviceLoop({"text_encoder": te, "unet": unet, "vae_decoder": vae}, dims)   # OrtEngines
    decoded = loop.image(input_ids, latents, scheduler.schedule(20), guidance=7.5)

Every tensor of a request stays on the engines' device from the token ids to the decoded image:
ORT I/O binding to OrtValue buffers allocated once per request shape; the UNet writes its noise
prediction into a fixed buffer; a 20-node ONNX graph (`step_model`) does classifier-free guidance
plus the DPM-Solver++(2M) update on the device and writes the next UNet input in place. Per step
the host sends the timestep (4 bytes) and six coefficients (24 bytes) computed from
toonark.scheduler's schedule (`step_coefficients`, beside the host update it is tested against), so
the math is the one sampler's. The last step folds in the family's vae_input_scale (1 / scaling factor)
and writes the VAE decoder's input buffer directly.

Engines loaded with `cuda_graph=True` own their bound buffers (a CUDA-graph replay reuses the
addresses it captured): the loop then reads and writes those buffers instead of its own, so the
VAE always reads the same `latent_sample` buffer and the UNet the same `sample` buffer.
Text2ImagePipeline (toonark.pipeline) uses this loop for ort-cuda builds and toonark.benchmarks.bench times it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from toonark.ort_session import ort_session
from toonark.specs import SD
from toonark.family import FAMILIES, ModelFamily, StableDiffusion
# The sampler's linear form lives with the sampler; re-exported for the bench and older callers.
from toonark.scheduler import step_coefficients  # noqa: F401

STEP_OPSET = 18


def check_scheduler(scheduler) -> None:
    """The step graph runs DPM-Solver++ of order 1 or 2 for epsilon and v_prediction models: the linear
    form toonark.scheduler.step_coefficients gives."""
    config = scheduler.config
    # getattr: other families' samplers (flow matching) have neither key and get the same refusal.
    prediction_type, solver_order = getattr(config, "prediction_type", None), getattr(config, "solver_order", None)
    if prediction_type not in ("epsilon", "v_prediction") or solver_order not in (1, 2):
        raise ValueError(f"the device loop implements DPM-Solver++ of order 1-2 for epsilon / v_prediction; this "
                         f"scheduler has prediction_type={prediction_type!r}, solver_order={solver_order}: "
                         f"use the host loop (device_loop=False)")


def step_model_proto(unet_dtype=np.float32):
    """ONNX graph: (noise_pred[2B], x[B], m_prev[B], coef[6]) -> (x_next, m0, unet_sample[2B]); float32, except
    noise_pred and unet_sample in `unet_dtype` (float16: a UNet served with fp16 I/O, e.g. a TensorRT plan,
    read and written through casts; the solver state stays float32)."""
    import onnx
    from onnx import TensorProto, helper

    half = np.dtype(unet_dtype) == np.float16
    unet_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["noise_pred"], ["noise_f32"], to=TensorProto.FLOAT)] if half else []
    nodes += [helper.make_node("Constant", [], [f"idx{i}"], value=helper.make_tensor(f"i{i}", TensorProto.INT64, [], [i]))
             for i in range(6)]
    nodes += [helper.make_node("Gather", ["coef", f"idx{i}"], [f"k{i}"], axis=0) for i in range(6)]
    nodes += [
        helper.make_node("Split", ["noise_f32" if half else "noise_pred"], ["uncond", "cond"], axis=0, num_outputs=2),
        helper.make_node("Sub", ["cond", "uncond"], ["diff"]),
        helper.make_node("Mul", ["diff", "k0"], ["gdiff"]),
        helper.make_node("Add", ["uncond", "gdiff"], ["eps"]),
        helper.make_node("Mul", ["x", "k1"], ["xs"]),
        helper.make_node("Mul", ["eps", "k2"], ["es"]),
        helper.make_node("Sub", ["xs", "es"], ["m0"]),
        helper.make_node("Mul", ["x", "k3"], ["ax"]),
        helper.make_node("Mul", ["m0", "k4"], ["bm"]),
        helper.make_node("Mul", ["m_prev", "k5"], ["cm"]),
        helper.make_node("Add", ["ax", "bm"], ["t0"]),
        helper.make_node("Add", ["t0", "cm"], ["x_next"]),
        helper.make_node("Concat", ["x_next", "x_next"], ["unet_sample_f32" if half else "unet_sample"], axis=0),
    ]
    if half:
        nodes.append(helper.make_node("Cast", ["unet_sample_f32"], ["unet_sample"], to=TensorProto.FLOAT16))
    lat = ["B", "C", "h", "w"]
    graph = helper.make_graph(
        nodes, "dpm_step",
        [helper.make_tensor_value_info("noise_pred", unet_type, ["2B", "C", "h", "w"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, lat),
         helper.make_tensor_value_info("m_prev", TensorProto.FLOAT, lat),
         helper.make_tensor_value_info("coef", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, lat),
         helper.make_tensor_value_info("m0", TensorProto.FLOAT, lat),
         helper.make_tensor_value_info("unet_sample", unet_type, ["2B", "C", "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", STEP_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def step_session(on_cuda: bool, device_id: int = 0, unet_dtype=np.float32):
    """An ORT session of the step graph on the CUDA EP (on_cuda) or the CPU."""
    if on_cuda:
        from toonark.engines.ort import cuda_provider_options
        providers = [("CUDAExecutionProvider", cuda_provider_options(device_id)), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort_session(step_model_proto(unet_dtype).SerializeToString(), providers=providers, threads=1)


def step_model(path: Path) -> Path:
    """`step_model_proto()` saved to `path` (returned)."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(step_model_proto(), str(path))
    return path


def onnx_io(path: Path) -> dict:
    """{"inputs"|"outputs": {name: {"dtype", "shape"}}} read from an ONNX file's graph (no weights loaded),
    in the format of engine.json's "io"; symbolic dims stay names."""
    import onnx
    from onnx import helper
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for v in values:
            dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
            out[v.name] = {"dtype": dtype, "shape": dims}
        return out
    initializers = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in initializers]),
            "outputs": describe(model.graph.output)}


class DeviceLoop:
    """Text encoder -> N x (UNet + step graph) -> VAE decoder with every tensor on the engines' device.

    engines: {"text_encoder", "unet", "vae_decoder": toonark.engines.ort.OrtEngine}, all ort-cuda (or all
    ort-cpu: the same loop on the host, used by the CPU tests). Float I/O is float32 (keep_io_types builds).
    """

    ROLES = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, engines: dict, dims, family: ModelFamily | None = None):
        import onnxruntime as ort
        if "unet" not in engines:
            raise ValueError(f"the device loop needs engines {list(self.ROLES)} (the UNet at least)")
        unknown = [name for name in engines if name not in self.ROLES]
        if unknown:
            raise ValueError(f"unknown engines {unknown}; the device loop runs {list(self.ROLES)}")
        self.ort, self.engines, self.dims = ort, dict(engines), dims
        self.family = family or FAMILIES[StableDiffusion.name]
        unet = engines["unet"]
        self.on_cuda = bool(getattr(unet, "on_cuda", False))
        if any(bool(getattr(e, "on_cuda", False)) != self.on_cuda for e in engines.values()):
            raise ValueError("the device loop needs all three engines on the same device (all ort-cuda or all ort-cpu)")
        if getattr(engines.get("text_encoder"), "graph_values", None) is not None:
            raise ValueError("load the text encoder without cuda_graph: its output is written into the UNet's buffer")
        self.device_id = int(getattr(unet, "device_id", 0))
        self.dev = "cuda" if self.on_cuda else "cpu"
        for name, engine in engines.items():
            io = engine.metadata["io"]
            for group in ("inputs", "outputs"):
                for tensor, info in io[group].items():
                    if info["dtype"] not in ("float32", "int64"):
                        raise ValueError(f"the device loop needs float32 I/O (keep_io_types builds); {name} "
                                         f"{tensor} is {info['dtype']}")
        self.step = step_session(self.on_cuda, self.device_id)
        timestep = engines["unet"].metadata["io"]["inputs"][SD.timestep]["shape"]
        self.timestep_shape = tuple(1 for _ in timestep)
        self._buffers: dict = {}
        self._coef = np.zeros(6, np.float32)
        self._coef_value = ort.OrtValue.ortvalue_from_numpy(self._coef)   # host; ORT copies 24 bytes a step

    # -- buffers ---------------------------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.dev, self.device_id)

    def zeros(self, shape, dtype=np.float32):
        return self.value(np.zeros(shape, dtype))

    def value(self, array: np.ndarray):
        """A device buffer holding a copy of `array` (a CPU OrtValue made from numpy would alias it)."""
        array = np.ascontiguousarray(array)
        value = self.empty(array.shape, array.dtype)
        value.update_inplace(array)
        return value

    def _owned(self, engine_name: str, tensor: str, shape, dtype=np.float32):
        """The engine's own bound buffer (CUDA-graph engines), checked against `shape`; else a new buffer."""
        values = getattr(self.engines.get(engine_name), "graph_values", None)
        if values is None:
            return self.empty(shape, dtype)
        value = values[tensor]
        if tuple(value.shape()) != tuple(shape):
            raise ValueError(f"{engine_name} was loaded as a CUDA graph for {tensor} shape {list(value.shape())}; "
                             f"this request needs {list(shape)} (load it with other graph_sizes, or without "
                             f"cuda_graph)")
        return value

    def buffers(self, batch: int, height: int, width: int | None = None) -> dict:
        """Buffers for one request shape, allocated once and reused."""
        width = height if width is None else width
        key = (batch, height, width)
        if key not in self._buffers:
            # Every shape from the declarations (toonark.specs via the family) at this request's sizes.
            specs = self.family.specs(self.dims)
            sizes = {"B": batch, "H": height, "W": width}
            te, unet, vae = (specs[name].shapes(sizes) for name in ("text_encoder", "unet", "vae_decoder"))
            lat = vae[SD.latent_sample]
            self._buffers[key] = {
                "ids": self.value(np.zeros(te[SD.input_ids], np.int64)),
                "text": self._owned("unet", SD.encoder_hidden_states, unet[SD.encoder_hidden_states]),
                "sample": self._owned("unet", SD.sample, unet[SD.sample]),
                "timestep": self._owned("unet", SD.timestep, self.timestep_shape),
                "noise": self._owned("unet", SD.noise_pred, unet[SD.noise_pred]),
                # zero-filled: the first step multiplies m_prev by c = 0, and 0 * (uninitialized NaN) is NaN
                "x": [self.zeros(lat), self.zeros(lat)], "m": [self.zeros(lat), self.zeros(lat)],
                # the last step's output, already scaled for the VAE: the VAE's one input buffer
                "final": self._owned("vae_decoder", SD.latent_sample, lat),
                "image": self._owned("vae_decoder", SD.image, vae[SD.image]),
            }
        return self._buffers[key]

    # -- stages ----------------------------------------------------------------------------
    @staticmethod
    def run(session, inputs: dict, outputs: dict):
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        session.run_with_iobinding(binding)

    def _run_engine(self, name: str, inputs: dict, outputs: dict):
        engine = self.engines[name]
        if getattr(engine, "graph_values", None) is not None:
            engine.run_bound()   # its own binding over the buffers `buffers` handed out
        else:
            self.run(engine.session, inputs, outputs)

    def text(self, buf):
        self._run_engine("text_encoder", {SD.input_ids: buf["ids"]}, {SD.text_embeddings: buf["text"]})

    def unet(self, buf):
        self._run_engine("unet", {SD.sample: buf["sample"], SD.timestep: buf["timestep"],
                                  SD.encoder_hidden_states: buf["text"]}, {SD.noise_pred: buf["noise"]})

    def vae(self, buf):
        # Always the same input buffer: a captured CUDA graph replays with the addresses it was captured with.
        self._run_engine("vae_decoder", {SD.latent_sample: buf["final"]}, {SD.image: buf["image"]})

    def denoise(self, buf, schedule, guidance: float, solver_order: int = 2, prediction_type: str = "epsilon") -> None:
        """The scheduler loop on the device: from buf["x"][0] / buf["sample"] to buf["final"]."""
        cur, steps = 0, len(schedule)
        for i in range(steps):
            buf["timestep"].update_inplace(np.full(self.timestep_shape, schedule.timesteps[i], np.float32))
            self.unet(buf)
            last = i == steps - 1
            self._coef[:] = step_coefficients(schedule, i, guidance, solver_order=solver_order,
                                              prediction_type=prediction_type,
                                              out_scale=self.family.vae_input_scale(self.dims) if last else 1.0)
            # Reads x[cur], m[cur] (previous data prediction); writes x[1-cur], m[1-cur] and the next UNet input.
            self.run(self.step, {"noise_pred": buf["noise"], "x": buf["x"][cur], "m_prev": buf["m"][cur],
                                 "coef": self._coef_value},
                     {"x_next": buf["final"] if last else buf["x"][1 - cur], "m0": buf["m"][1 - cur],
                      "unet_sample": buf["sample"]})
            cur = 1 - cur

    def latents_for_vae(self, text_embeddings: np.ndarray, latents: np.ndarray, schedule, guidance: float,
                        solver_order: int = 2, prediction_type: str = "epsilon") -> np.ndarray:
        """The served `denoise` step on the device: text embeddings (2B, L, D) from the text encoder model
        and the initial latents (host) go up once, the VAE decoder's input (already scaled) comes back once;
        per step only the timestep and the six solver coefficients cross."""
        batch, height, width = latents.shape[0], latents.shape[2] * self.dims.vae_scale, \
            latents.shape[3] * self.dims.vae_scale
        if text_embeddings.shape[0] != 2 * batch:
            raise ValueError(f"{text_embeddings.shape[0]} text embedding rows for {batch} latents; classifier-free "
                             f"guidance needs 2B")
        buf = self.buffers(batch, height, width)
        if tuple(buf["text"].shape()) != tuple(text_embeddings.shape):
            raise ValueError(f"text embeddings of shape {list(text_embeddings.shape)}; the UNet reads "
                             f"{list(buf['text'].shape())}")
        buf["text"].update_inplace(np.ascontiguousarray(text_embeddings, np.float32))
        latents = np.ascontiguousarray(latents, np.float32)
        buf["x"][0].update_inplace(latents)
        buf["sample"].update_inplace(np.concatenate([latents, latents]))
        self.denoise(buf, schedule, guidance, solver_order, prediction_type)
        return np.array(buf["final"].numpy(), copy=True)

    def image(self, ids: np.ndarray, latents: np.ndarray, schedule, guidance: float, solver_order: int = 2,
              timings: dict | None = None, prediction_type: str = "epsilon") -> np.ndarray:
        """Token ids (2B, L) [uncond x B, cond x B] + initial latents (host) -> decoded images
        (host, float32 NCHW in about [-1, 1]). `timings` (optional) gets text_encoder_ms, denoise_ms,
        vae_decoder_ms (host clock; on CUDA each stage ends with ORT's stream synchronization)."""
        import time
        batch, height, width = latents.shape[0], latents.shape[2] * self.dims.vae_scale, \
            latents.shape[3] * self.dims.vae_scale
        if ids.shape[0] != 2 * batch:
            raise ValueError(f"{ids.shape[0]} token rows for {batch} latents; classifier-free guidance needs 2B")
        buf = self.buffers(batch, height, width)
        start = time.perf_counter()
        buf["ids"].update_inplace(np.ascontiguousarray(ids, np.int64))
        latents = np.ascontiguousarray(latents, np.float32)
        buf["x"][0].update_inplace(latents)
        buf["sample"].update_inplace(np.concatenate([latents, latents]))
        self.text(buf)
        encoded = time.perf_counter()
        self.denoise(buf, schedule, guidance, solver_order, prediction_type)
        denoised = time.perf_counter()
        self.vae(buf)
        out = np.array(buf["image"].numpy(), copy=True)
        if timings is not None:
            timings.update(text_encoder_ms=(encoded - start) * 1e3, denoise_ms=(denoised - encoded) * 1e3,
                           vae_decoder_ms=(time.perf_counter() - denoised) * 1e3)
        return out
