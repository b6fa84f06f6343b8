"""toonark denoise: DPM-Solver++ 2M with classifier-free guidance, one BLS call to `unet` per step."""
import json

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
        self.logger = pb_utils.Logger
        self.metrics = Metrics("denoise")
        self.lora = any(i["name"] == api.LORA_NAME.name for i in config["input"])   # passed on to every unet call
        self.lora_tensors = []

    def _call(self, model, output, feeds, extra=()):
        # Every feed has the spec's shape, the timestep included ((1,): Triton has no 0-d tensors).
        response = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=[output],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()]
            + list(extra)).exec()
        if response.has_error():   # passed on with the called model's own code (INVALID_ARG, UNAVAILABLE, ...)
            error = response.error()
            raise runtime.UpstreamError(error.message(), error.code() if hasattr(error, "code") else None)
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    def _unet(self, feeds):
        return self._call(self.unet_model, self.unet_output, feeds, self.lora_tensors)

    def _vae_encoder(self, image):
        # vae_encoder tiles pictures above the profile itself (runtime.TiledRunner).
        return self._call(self.encoder_model, SD.latent_parameters, {SD.image: image.astype(self.encoder_dtype)})

    def execute(self, requests):
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        def tensor(port):
            return pb_utils.get_input_tensor_by_name(request, port.name).as_numpy()

        def value(port):
            return api.one_value(tensor(port), port.name, None)
        text = pb_utils.get_input_tensor_by_name(request, self.text_name).as_numpy()
        # Requests run one at a time in this instance, so the LoRA of the request being served goes with each call.
        self.lora_tensors = [pb_utils.Tensor(port.name, tensor(port)) for port in api.LORA_RESOLVED] if self.lora else []
        # One seed (the batch's noise from one generator) or one per image (NUM_IMAGES requests).
        seeds = tensor(api.SEED).reshape(-1).tolist()
        extra = {}
        if self.ids_name:   # families whose denoise reads the token ids (Qwen-Image: which rows are padding)
            extra["input_ids"] = pb_utils.get_input_tensor_by_name(request, self.ids_name).as_numpy()
        if self.encoder_model:   # families that edit pictures: the resolved edit (0 rows when none was sent)
            extra.update(image=tensor(api.IMAGE), mask=tensor(api.MASK), strength=float(value(api.STRENGTH)),
                         vae_encoder=self._vae_encoder)
        latents = self.denoiser.run(text, seed=seeds, steps=int(value(api.STEPS)), guidance=float(value(api.GUIDANCE)),
                                    width=int(value(api.WIDTH)), height=int(value(api.HEIGHT)), unet=self._unet,
                                    float_dtype=self.float_dtype, **extra)
        calls = self.denoiser.last_unet_seconds
        self.metrics.count("toonark_steps_total", len(calls))
        self.logger.log_verbose(f"denoise: {len(calls)} unet calls, {1000 * sum(calls) / max(len(calls), 1):.1f} "
                                f"ms each")
        return [pb_utils.Tensor(self.latent_name, latents.astype(self.latent_dtype))]
