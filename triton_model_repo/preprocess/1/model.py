"""toonark preprocess: kid template, safety check, CLIP tokens (uncond first) and request defaults."""
import json

import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_ids_name = config["output"][0]["name"]
        self.lora = any(o["name"] == api.LORA_NAME.name for o in config["output"])   # a LoRA repository
        self.preparer = runtime.RequestPreparer(runtime.pipeline_dir(args), runtime.build_info(args),
                                                runtime.model_parameters(config))
        self.metrics = Metrics("preprocess")
        for reason in self.preparer.policy.reasons:   # every label value present from startup, at 0
            self.metrics.metric("toonark_prompt_refusals_total", reason=reason)

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
                self.metrics.count("toonark_prompt_refusals_total", reason=err.reason)
            raise
        tensors = {self.input_ids_name: input_ids, **resolved.tensors(), **(resolved.lora_tensors() if self.lora else {})}
        return [pb_utils.Tensor(name, value) for name, value in tensors.items()]
