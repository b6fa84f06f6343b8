"""toonark denoise: the family's sampler (SD: DPM-Solver++ 2M with classifier-free guidance; Qwen-Image: flow
matching) over the UNet / transformer, in one of these loops (config parameter `unet_loop`, chosen by the
generator, serving/repository.py):
  in_process  this model owns the UNet engine and the VAE encoder's (python layout, plain SD; no BLS callee, so any
              process can be killed safely, issue 18): ort-cuda runs the device loop with CUDA
              graphs per size bucket, ort-cpu the host loop; no per-step hop at all. Edits and sizes above the
              profile run the host loop over the same engine (the device loop does text-to-image only)
  bls         one BLS call to the step model per step with host tensors (the host loop; LoRA tensors go along)
  bls_device  one BLS call per step with device tensors (DLPack) and the solver step on the device
With max_batch_size > 0 (request batching, in_process on CUDA) Triton's dynamic batcher gives this model several
requests per execute (each with a leading request dimension of 1, which the ensemble adds and strips again);
runtime.Denoiser.run_batch runs them in shared device loops (edits and tiled sizes: one at a time in the host
loop). It is an ensemble step like the others: nothing calls it by BLS.
"""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.specs import SD
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = runtime.model_parameters(config)
        self.loop_kind = params.get("unet_loop", "bls")
        self.batched = int(config.get("max_batch_size", 0)) > 0   # request batching: several requests per execute
        self.unet_model = params["unet_model"]
        self.unet_output = params["unet_output"]
        self.text_name = params["text_hidden_name"]
        self.latent_name = params["latent_name"]
        self.float_dtype = pb_utils.triton_string_to_numpy(params["unet_float_type"])
        latent_config = pb_utils.get_output_config_by_name(config, self.latent_name)
        self.latent_dtype = pb_utils.triton_string_to_numpy(latent_config["data_type"])
        # The build's model family's denoiser (SD: DPM-Solver++, tiles above the profile; Qwen-Image: flow
        # matching, reads the ids too).
        self.denoiser = runtime.denoiser_for(runtime.pipeline_dir(args), runtime.build_info(args), params.get("tiling"))
        self.ids_name = params.get("text_ids_name")
        self.encoder_model = params.get("vae_encoder_model")   # absent: the build serves no VAE encoder
        self.encoder_dtype = pb_utils.triton_string_to_numpy(params.get("vae_encoder_float_type", "TYPE_FP32"))
        self.encoder_engine = None
        if self.encoder_model == "in_process":   # this model owns the VAE encoder (<denoise>/1/vae_encoder/)
            own = {k: v for k, v in params.items() if k not in ("cuda_graph_sizes", "lora_cache_size")}
            self.encoder_engine = runtime.load_runner(args, own, name="vae_encoder")
        self.logger = pb_utils.Logger
        self.metrics = Metrics("denoise")
        # LoRA repositories: the request's style goes with every unet call (bls), or switches the UNet engine this
        # model owns (in_process on ort-cpu; its switches reported under stage="unet")
        self.lora = any(i["name"] == api.LORA_NAME.name for i in config["input"])
        self.lora_tensors = []
        self.switches = runtime.LoraSwitchCounter(self.metrics, "unet")
        self.device_id = int(args.get("model_instance_device_id", 0) or 0)
        self.loops = (runtime.unet_loops(args, params, log=pb_utils.Logger.log_info)
                      if self.loop_kind == "in_process" else None)
        # request batching on CUDA graphs: 3 images run as B=2 + B=1 (pad_batches 1: padded into the B=4 graph)
        self.pad_batches = params.get("pad_batches", 0) != 0 and bool(self.loops and self.loops.on_cuda)
        self.bls_loop = None
        if self.loop_kind == "bls_device":
            self.bls_loop = runtime.BlsDeviceLoop(self._unet_dlpack, self.denoiser.info.dims, self.denoiser.family,
                                                  on_cuda=params.get("unet_device", "cpu") == "cuda",
                                                  device_id=self.device_id, unet_dtype=self.float_dtype)

    def _exec(self, model, output, inputs, preferred=None):
        def call():
            request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[output], inputs=inputs,
                                                **({"preferred_memory": preferred} if preferred is not None else {}))
            return request.exec()

        response = runtime.call_with_retry(call, self._unavailable)
        if response.has_error():   # passed on with the called model's own code (INVALID_ARG, UNAVAILABLE, ...)
            error = response.error()
            raise runtime.UpstreamError(error.message(), error.code() if hasattr(error, "code") else None)
        return pb_utils.get_output_tensor_by_name(response, output)

    @staticmethod
    def _tensors(feeds):
        # Every feed has the spec's shape, the timestep included ((1,): Triton has no 0-d tensors).
        return [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()]

    def _unet(self, feeds):
        # The request's LoRA goes with every call (the unet model's runner switches styles per request).
        return self._exec(self.unet_model, self.unet_output, self._tensors(feeds) + self.lora_tensors).as_numpy()

    def _unet_dlpack(self, feeds):
        # Device buffers go by DLPack (no copy in this process); the output comes back on the same device.
        inputs = [pb_utils.Tensor(name, value) if isinstance(value, np.ndarray)
                  else pb_utils.Tensor.from_dlpack(name, value) for name, value in feeds.items()]
        on_cuda = self.bls_loop is not None and self.bls_loop.on_cuda
        memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU if on_cuda else
                                          pb_utils.TRITONSERVER_MEMORY_CPU, self.device_id)
        return self._exec(self.unet_model, self.unet_output, inputs, memory).to_dlpack()

    def _vae_encoder(self, image):
        # The engine tiles pictures above the profile itself (runtime.TiledRunner), here or in the vae_encoder model.
        feeds = {SD.image: np.ascontiguousarray(image.astype(self.encoder_dtype))}
        if self.encoder_engine is not None:
            return self.encoder_engine.run(feeds)[SD.latent_parameters]
        return self._exec(self.encoder_model, SD.latent_parameters, self._tensors(feeds)).as_numpy()

    def execute(self, requests):
        if self.loops is not None:   # the UNet this model owns: held for the execute (idle unload waits)
            with self.loops.busy():
                return self._batch(requests) if self.batched else runtime.respond_each(
                    requests, self._one, pb_utils, self.metrics)
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _inputs(self, request, squeeze: bool = False) -> runtime.DenoiseRequest:
        """One request's values (squeeze: drop the leading request dimension of a batching denoise)."""
        def tensor(name):
            value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            return value[0] if squeeze else value

        def value(port):
            return api.one_value(tensor(port.name), port.name, None)
        # One seed (the batch's noise from one generator) or one per image (NUM_IMAGES requests).
        edit = {}
        if self.encoder_model:   # families that edit pictures: the resolved edit (0 rows when none was sent)
            edit = dict(image=tensor(api.IMAGE.name), mask=tensor(api.MASK.name), strength=float(value(api.STRENGTH)))
        return runtime.DenoiseRequest(tensor(self.text_name), tensor(api.SEED.name).reshape(-1).tolist(),
                                      int(value(api.STEPS)), float(value(api.GUIDANCE)), int(value(api.WIDTH)),
                                      int(value(api.HEIGHT)), **edit)

    def _host(self, item: runtime.DenoiseRequest, unet, **extra):
        """The host loop (edits, tiles, every family): `unet` a BLS call or the engine this model owns."""
        edit = dict(item.edit_options(), vae_encoder=self._vae_encoder) if item.edits else {}
        return self.denoiser.run(item.text_embeddings, unet=unet, float_dtype=self.float_dtype, **item.options(),
                                 **edit, **extra)

    def _batch(self, requests):
        """Request batching: every request of this execute in shared device loops, one response each, in order;
        a request the device loop does not take (an edit, a size above the profile) runs alone in the host loop
        over the same engine."""
        start = time.perf_counter()
        outputs, items, batched = [], [], []
        for index, request in enumerate(requests):
            try:
                item = self._inputs(request, squeeze=True)
                if self.denoiser.device_loop_takes(item):
                    items.append(item)
                    batched.append(index)
                    outputs.append(None)
                else:
                    outputs.append(self._host(item, self.loops.unet_call()))
            except Exception as err:   # noqa: BLE001 - answered below
                outputs.append(err)
        for index, result in zip(batched, self.denoiser.run_batch(items, self.loops.loop_for, self.loops.buckets,
                                                                             pad=self.pad_batches)):
            outputs[index] = result
        self.metrics.metric("toonark_stage_duration_seconds", stage="unet").observe(time.perf_counter() - start)

        def respond(index):
            result = outputs[index]
            if isinstance(result, Exception):
                raise result
            self.metrics.count("toonark_steps_total", int(api.one_value(pb_utils.get_input_tensor_by_name(
                requests[index], api.STEPS.name).as_numpy(), api.STEPS.name, 0)))
            return [pb_utils.Tensor(self.latent_name, result[None].astype(self.latent_dtype))]
        return runtime.respond_each(range(len(requests)), respond, pb_utils)

    def _lora_options(self) -> dict:
        """The request's style as the LoRA runner takes it (from the resolved lora / lora_scale tensors)."""
        name, scale = (t.as_numpy() for t in self.lora_tensors)
        return {"lora": api.text_value(name, "lora", ""), "scale": float(api.one_value(scale, "lora_scale", 1.0))}

    @staticmethod
    def _unavailable(response):
        error = response.error() if response.has_error() else None
        return error is not None and getattr(error, "code", lambda: None)() == pb_utils.TritonError.UNAVAILABLE

    def _one(self, request):
        item = self._inputs(request)
        # Requests run one at a time in this instance, so the LoRA of the request being served goes with each call.
        self.lora_tensors = [pb_utils.Tensor(port.name, pb_utils.get_input_tensor_by_name(request, port.name)
                                             .as_numpy()) for port in api.LORA_RESOLVED] if self.lora else []
        text, kwargs = item.text_embeddings, item.options()
        start = time.perf_counter()
        if self.ids_name:   # families whose denoise reads the token ids (Qwen-Image: which rows are padding)
            ids = pb_utils.get_input_tensor_by_name(request, self.ids_name).as_numpy()
            latents = self._host(item, self._unet, input_ids=ids)
        elif self.loops is not None and self.loops.on_cuda and self.denoiser.device_loop_takes(item):
            loop = self.loops.loop_for(text.shape[0] // 2, item.height, item.width)
            latents = self.denoiser.run_loop(text, loop=loop, **kwargs)
        elif self.loops is not None:   # ort-cpu, or an edit / tiled size on ort-cuda: the owned engine, host loop
            latents = self._host(item, self.loops.unet_call(self._lora_options() if self.lora else None))
            if self.lora:
                self.switches.report(self.loops.engine.stats)
        elif self.bls_loop is not None and self.denoiser.device_loop_takes(item):
            latents = self.denoiser.run_loop(text, loop=self.bls_loop, **kwargs)
        else:
            latents = self._host(item, self._unet)
        calls = self.denoiser.last_unet_seconds
        self.metrics.count("toonark_steps_total", len(calls))
        if self.loops is not None:
            # the UNet this model owns reports under the unet stage (its loop, all steps)
            self.metrics.metric("toonark_stage_duration_seconds", stage="unet").observe(time.perf_counter() - start)
        self.logger.log_verbose(f"denoise ({self.loop_kind}): {len(calls)} steps, "
                                f"{1000 * sum(calls) / max(len(calls), 1):.1f} ms each")
        return [pb_utils.Tensor(self.latent_name, latents.astype(self.latent_dtype))]
