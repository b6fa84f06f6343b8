"""toonark postprocess: VAE output in [-1, 1] -> one PNG / WebP per image (IMAGE), or the uint8 pixels (PIXELS,
FORMAT=raw)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoded_name = config["input"][0]["name"]
        self.image_name, self.pixels_name = api.IMAGE_OUTPUT.name, api.PIXELS_OUTPUT.name
        self.metrics = Metrics("postprocess")

    def execute(self, requests):
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        decoded = pb_utils.get_input_tensor_by_name(request, self.decoded_name).as_numpy()
        # Both always come from preprocess, which applied the defaults.
        fmt = api.text_value(pb_utils.get_input_tensor_by_name(request, api.FORMAT.name).as_numpy(), api.FORMAT.name,
                             None)
        quality = int(api.one_value(pb_utils.get_input_tensor_by_name(request, api.QUALITY.name).as_numpy(),
                                    api.QUALITY.name, None))
        images, pixels = runtime.postprocess_outputs(decoded, fmt, quality)
        self.metrics.count("toonark_images_total", len(images), format=fmt)
        return [pb_utils.Tensor(self.image_name, np.array(images, dtype=np.object_)),
                pb_utils.Tensor(self.pixels_name, pixels)]
