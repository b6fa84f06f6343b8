"""toonark postprocess: VAE output in [-1, 1] -> one PNG / WebP per image (Pillow)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark.triton_model_repo import runtime


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoded_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            decoded = pb_utils.get_input_tensor_by_name(request, self.decoded_name).as_numpy()
            fmt = pb_utils.get_input_tensor_by_name(request, "format").as_numpy().reshape(-1)[0]
            try:
                images = runtime.encode_images(decoded, fmt.decode() if isinstance(fmt, bytes) else str(fmt))
            except runtime.RequestError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, np.array(images, dtype=np.object_))]))
        return responses
