"""toonark preprocess: kid template, safety check, CLIP tokens (uncond first) and request defaults."""
import json

import triton_python_backend_utils as pb_utils

from toonark.triton_model_repo import runtime

OPTIONAL = ("NEGATIVE_PROMPT", "SEED", "STEPS", "PRESET", "GUIDANCE", "WIDTH", "HEIGHT", "FORMAT")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_ids_name = config["output"][0]["name"]
        self.preparer = runtime.RequestPreparer(runtime.pipeline_dir(args), runtime.build_info(args),
                                                runtime.model_parameters(config))

    def execute(self, requests):
        responses = []
        for request in requests:
            values = {}
            for name in ("PROMPT",) + OPTIONAL:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                values[name] = None if tensor is None else tensor.as_numpy()
            try:
                resolved = self.preparer.prepare(values["PROMPT"], values["NEGATIVE_PROMPT"], values["SEED"],
                                                 values["STEPS"], values["GUIDANCE"], values["WIDTH"],
                                                 values["HEIGHT"], values["FORMAT"], values["PRESET"])
            except runtime.RequestError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, value) for name, value in resolved.tensors(self.input_ids_name).items()]))
        return responses
