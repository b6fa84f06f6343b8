"""toonark preprocess: kid template, safety check, CLIP tokens (uncond first), request defaults, and the
prompt embeddings: from toonark's prompt-embedding cache, or a BLS call to the text encoder on a miss (with
the request's LoRA in a LoRA repository; the cache key holds it). Families whose denoise reads the token ids
too (Qwen-Image) get them as an output."""
import json

import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = runtime.model_parameters(config)
        self.hidden_name = params["text_hidden_name"]
        hidden_config = pb_utils.get_output_config_by_name(config, self.hidden_name)
        self.hidden_dtype = pb_utils.triton_string_to_numpy(hidden_config["data_type"])
        self.ids_name = params.get("text_ids_name")   # set where denoise reads the token ids (Qwen-Image)
        self.lora = any(o["name"] == api.LORA_NAME.name for o in config["output"])   # a LoRA repository
        self.preparer = runtime.RequestPreparer(runtime.pipeline_dir(args), runtime.build_info(args), params)
        self.metrics = Metrics("preprocess")
        for reason, layer in self.preparer.policy.refusal_labels:   # every label pair present from startup, at 0
            self.metrics.metric("toonark_prompt_refusals_total", reason=reason, layer=layer)
        encoder, encoder_input = params["text_encoder_model"], params["text_encoder_input"]
        self.ids_dtype = pb_utils.triton_string_to_numpy(params["text_encoder_input_type"])
        self.encoder = runtime.PromptEncoder(
            lambda ids, extra: runtime.call_model(
                pb_utils, encoder, {encoder_input: ids.astype(self.ids_dtype, copy=False), **extra}, self.hidden_name),
            params["prompt_cache_bytes"], self.metrics, args.get("model_instance_name", "preprocess"), lora=self.lora)

    def execute(self, requests):
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        # Every ensemble input, PROMPT included, is optional here, so that a missing one gets prepare's message.
        values = {}
        for port in api.ENSEMBLE_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, port.name)
            values[port.name.lower()] = None if tensor is None else tensor.as_numpy()
        try:
            resolved, input_ids = self.preparer.prepare(**values)
        except api.RequestError as err:   # a bad request: HTTP 400 / gRPC INVALID_ARGUMENT
            if err.reason:
                self.metrics.count("toonark_prompt_refusals_total", reason=err.reason, layer=err.layer)
            raise
        embeddings = self.encoder(resolved, input_ids)   # a failed text encoder call raises: nothing cached
        tensors = {self.hidden_name: embeddings.astype(self.hidden_dtype, copy=False), **resolved.tensors(),
                   **(resolved.lora_tensors() if self.lora else {}),
                   **({self.ids_name: input_ids.astype(self.ids_dtype, copy=False)} if self.ids_name else {})}
        return [pb_utils.Tensor(name, value) for name, value in tensors.items()]
