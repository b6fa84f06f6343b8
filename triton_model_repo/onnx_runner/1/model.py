"""toonark engine runner: serves one built submodel (text_encoder, unet or vae_decoder) from <model>/1/
with ONNX Runtime. The generator copies this file into each engine model; names and dtypes come from
the config, which the generator wrote from the export spec. With TOONARK_IDLE_UNLOAD_S=N (make serve
IDLE_UNLOAD_S=N) the session is freed after N idle seconds and loaded again by the next request."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark import api
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        params = runtime.model_parameters(config)
        self.engine = runtime.IdleEngine(lambda: runtime.load_runner(args, params), runtime.idle_unload_seconds(),
                                         log=pb_utils.Logger.log_info)
        self.input_names = [t.name for t in self.engine.spec.inputs]
        self.metrics = Metrics(config["name"])   # stage = text_encoder | unet | vae_decoder
        # LoRA repositories: the request names the style; the engine switches its weights under its lock.
        self.lora = any(i["name"] == api.LORA_NAME.name for i in config["input"])
        self.switches = (0, 0, 0.0)
        self.loads_counted = self.engine.loads

    def execute(self, requests):
        # A shape or dtype outside what the engine was built for is a ValueError: INVALID_ARG.
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
        if self.lora:
            name = api.text_value(pb_utils.get_input_tensor_by_name(request, api.LORA_NAME.name).as_numpy(), "lora", "")
            scale = float(api.one_value(pb_utils.get_input_tensor_by_name(request, api.LORA_WEIGHT.name).as_numpy(),
                                        "lora_scale", 1.0))
            results = self.engine.run(feeds, lora=name, scale=scale)
            self._count_switches()
        else:
            results = self.engine.run(feeds)
        return [pb_utils.Tensor(name, np.ascontiguousarray(results[name], dtype=dtype)) for name, dtype in self.outputs]

    def _count_switches(self):
        stats = self.engine.stats
        hits, misses, seconds = self.switches
        if self.engine.loads != self.loads_counted:   # loaded again after an idle unload: statistics from 0
            hits, misses, seconds = 0, 0, 0.0
            self.loads_counted = self.engine.loads
        self.metrics.count("toonark_lora_switches_total", stats.cache_hits - hits, stage=self.metrics.stage, cache="hit")
        self.metrics.count("toonark_lora_switches_total", stats.cache_misses - misses, stage=self.metrics.stage,
                           cache="miss")
        self.metrics.count("toonark_lora_switch_seconds_total", stats.seconds - seconds, stage=self.metrics.stage)
        self.switches = (stats.cache_hits, stats.cache_misses, stats.seconds)
