"""toonark preprocess: kid template, safety check, CLIP tokens (uncond first), request defaults. The token ids go
on to the `text_encoder` ensemble step, which owns the prompt-embedding cache (python layout: no BLS call here,
so no model of the default repositories is a BLS callee, issue 18). Native layouts (text_encoder served by
another backend, no Python process to own a cache): the cache is here and a miss calls text_encoder by BLS (the
config names it: text_encoder_model); families whose denoise reads the token ids too (Qwen-Image) get them as an
output there."""
import json

import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = runtime.model_parameters(config)
        self.ids_name = params["text_encoder_input"]
        self.ids_dtype = pb_utils.triton_string_to_numpy(params["text_encoder_input_type"])
        self.lora = any(o["name"] == api.LORA_NAME.name for o in config["output"])   # a LoRA repository
        self.preparer = runtime.RequestPreparer(runtime.pipeline_dir(args), runtime.build_info(args), params)
        self.metrics = Metrics("preprocess")
        for reason, layer in self.preparer.policy.refusal_labels:   # every label pair present from startup, at 0
            self.metrics.metric("toonark_prompt_refusals_total", reason=reason, layer=layer)
        self.encoder_model = params.get("text_encoder_model")   # native layouts: the BLS callee on a cache miss
        self.outputs = {o["name"] for o in config["output"]}
        if self.encoder_model:
            self.hidden_name = params["text_hidden_name"]
            hidden_config = pb_utils.get_output_config_by_name(config, self.hidden_name)
            self.hidden_dtype = pb_utils.triton_string_to_numpy(hidden_config["data_type"])
            self.encoder = runtime.PromptEncoder(params["prompt_cache_bytes"], self.metrics,
                                                 args.get("model_instance_name", "preprocess"))

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
        ids = input_ids.astype(self.ids_dtype, copy=False)
        tensors = {**resolved.tensors(), **(resolved.lora_tensors() if self.lora else {})}
        if self.ids_name in self.outputs:
            tensors[self.ids_name] = ids
        if self.encoder_model:   # a failed text encoder call raises: nothing cached
            embeddings = self.encoder(ids, lambda: runtime.call_model(pb_utils, self.encoder_model, {self.ids_name: ids},
                                                                      self.hidden_name))
            tensors[self.hidden_name] = embeddings.astype(self.hidden_dtype, copy=False)
        return [pb_utils.Tensor(name, value) for name, value in tensors.items()]
