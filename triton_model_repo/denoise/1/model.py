"""toonark denoise: DPM-Solver++ 2M with classifier-free guidance, one BLS call to `unet` per step."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark import api
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
        # The build's model family's denoiser (SD: DPM-Solver++; Qwen-Image: flow matching, reads the ids too).
        self.denoiser = runtime.denoiser_for(runtime.pipeline_dir(args), runtime.build_info(args))
        self.ids_name = params.get("text_ids_name")
        self.logger = pb_utils.Logger
        self.metrics = Metrics("denoise")

    def _unet(self, feeds):
        # Every feed has the spec's shape, the timestep included ((1,): Triton has no 0-d tensors).
        response = pb_utils.InferenceRequest(
            model_name=self.unet_model, requested_output_names=[self.unet_output],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()]).exec()
        if response.has_error():   # passed on with unet's own code (INVALID_ARG, UNAVAILABLE, ...)
            error = response.error()
            raise runtime.UpstreamError(error.message(), error.code() if hasattr(error, "code") else None)
        return pb_utils.get_output_tensor_by_name(response, self.unet_output).as_numpy()

    def execute(self, requests):
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        def tensor(port):
            return pb_utils.get_input_tensor_by_name(request, port.name).as_numpy()

        def value(port):
            return api.one_value(tensor(port), port.name, None)
        text = pb_utils.get_input_tensor_by_name(request, self.text_name).as_numpy()
        # One seed (the batch's noise from one generator) or one per image (NUM_IMAGES requests).
        seeds = tensor(api.SEED).reshape(-1).tolist()
        extra = ({"input_ids": pb_utils.get_input_tensor_by_name(request, self.ids_name).as_numpy()}
                 if self.ids_name else {})
        latents = self.denoiser.run(text, seed=seeds, steps=int(value(api.STEPS)), guidance=float(value(api.GUIDANCE)),
                                    width=int(value(api.WIDTH)), height=int(value(api.HEIGHT)), unet=self._unet,
                                    float_dtype=self.float_dtype, **extra)
        calls = self.denoiser.last_unet_seconds
        self.metrics.count("toonark_steps_total", len(calls))
        self.logger.log_verbose(f"denoise: {len(calls)} unet calls, {1000 * sum(calls) / max(len(calls), 1):.1f} "
                                f"ms each")
        return [pb_utils.Tensor(self.latent_name, latents.astype(self.latent_dtype))]
