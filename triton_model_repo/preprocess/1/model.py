"""toonark preprocess: kid template, safety check, CLIP tokens (uncond first) and request defaults."""
import json

import triton_python_backend_utils as pb_utils

from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics

OPTIONAL = ("NEGATIVE_PROMPT", "SEED", "STEPS", "PRESET", "GUIDANCE", "WIDTH", "HEIGHT", "FORMAT", "NUM_IMAGES",
            "QUALITY")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_ids_name = config["output"][0]["name"]
        self.preparer = runtime.RequestPreparer(runtime.pipeline_dir(args), runtime.build_info(args),
                                                runtime.model_parameters(config))
        self.metrics = Metrics("preprocess")
        for reason in self.preparer.policy.reasons:   # every label value present from startup, at 0
            self.metrics.metric("toonark_prompt_refusals_total", reason=reason)

    def execute(self, requests):
        responses = []
        for request in requests:
            with self.metrics.timed():
                responses.append(self._one(request))
        return responses

    def _one(self, request):
        values = {}
        for name in ("PROMPT",) + OPTIONAL:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values[name] = None if tensor is None else tensor.as_numpy()
        try:
            resolved = self.preparer.prepare(values["PROMPT"], values["NEGATIVE_PROMPT"], values["SEED"],
                                             values["STEPS"], values["GUIDANCE"], values["WIDTH"],
                                             values["HEIGHT"], values["FORMAT"], values["PRESET"],
                                             num_images=values["NUM_IMAGES"], quality=values["QUALITY"])
        except runtime.RequestError as err:   # a bad request: HTTP 400 / gRPC INVALID_ARGUMENT
            if err.reason:
                self.metrics.count("toonark_prompt_refusals_total", reason=err.reason)
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, value) for name, value in resolved.tensors(self.input_ids_name).items()])
