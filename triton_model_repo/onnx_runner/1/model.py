"""toonark engine runner: serves one built submodel (text_encoder, unet or vae_decoder) from <model>/1/
with ONNX Runtime. The generator copies this file into each engine model; names and dtypes come from
the config, which the generator wrote from the export spec. With TOONARK_IDLE_UNLOAD_S=N (make serve
IDLE_UNLOAD_S=N) the session is freed after N idle seconds and loaded again by the next request."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        params = runtime.model_parameters(config)
        self.engine = runtime.IdleEngine(lambda: runtime.load_runner(args, params), runtime.idle_unload_seconds(),
                                         log=pb_utils.Logger.log_info)
        self.input_names = [t.name for t in self.engine.engine.spec.inputs]
        self.metrics = Metrics(config["name"])   # stage = text_encoder | unet | vae_decoder

    def execute(self, requests):
        # A shape or dtype outside what the engine was built for is a ValueError: INVALID_ARG.
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        results = self.engine.run({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                                   for name in self.input_names})
        return [pb_utils.Tensor(name, np.ascontiguousarray(results[name], dtype=dtype)) for name, dtype in self.outputs]
