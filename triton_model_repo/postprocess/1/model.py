"""toonark postprocess: VAE output in [-1, 1] -> one PNG / WebP per image (Pillow)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoded_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.metrics = Metrics("postprocess")

    def execute(self, requests):
        responses = []
        for request in requests:
            decoded = pb_utils.get_input_tensor_by_name(request, self.decoded_name).as_numpy()
            fmt = pb_utils.get_input_tensor_by_name(request, "format").as_numpy().reshape(-1)[0]
            fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
            quality = pb_utils.get_input_tensor_by_name(request, "quality")
            quality = 90 if quality is None else int(quality.as_numpy().reshape(-1)[0])
            try:
                with self.metrics.timed():
                    images = runtime.encode_images(decoded, fmt, quality)
            except runtime.RequestError as err:   # a bad request: HTTP 400 / gRPC INVALID_ARGUMENT
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)))
                continue
            self.metrics.count("toonark_images_total", len(images), format=fmt)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, np.array(images, dtype=np.object_))]))
        return responses
