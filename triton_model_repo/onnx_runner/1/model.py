"""toonark engine runner: serves one built submodel (text_encoder, unet or vae_decoder) from <model>/1/
with ONNX Runtime. The generator copies this file into each engine model; names and dtypes come from
the config, which the generator wrote from the export spec. The text encoder (config parameter
prompt_cache_bytes) answers from toonark's prompt-embedding cache and runs its engine on a miss only
(runtime.PromptEncoder: never stores a failure; the cache key holds the request's LoRA). With TOONARK_IDLE_UNLOAD_S=N (make serve
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
        self.switches = runtime.LoraSwitchCounter(self.metrics, self.metrics.stage)
        self.loads_counted = self.engine.loads
        self.prompt_cache = None
        if "prompt_cache_bytes" in params:   # text_encoder: the engine runs on a cache miss only
            self.prompt_cache = runtime.PromptEncoder(params["prompt_cache_bytes"], self.metrics,
                                                      args.get("model_instance_name", config["name"]))

    def execute(self, requests):
        # A shape or dtype outside what the engine was built for is a ValueError: INVALID_ARG.
        # With the prompt cache, the stage duration times the engine runs (cache misses) only.
        return runtime.respond_each(requests, self._one, pb_utils, None if self.prompt_cache else self.metrics)

    def _one(self, request):
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
        options = {}
        if self.lora:
            options = dict(lora=api.text_value(pb_utils.get_input_tensor_by_name(request, api.LORA_NAME.name)
                                               .as_numpy(), "lora", ""),
                           scale=float(api.one_value(pb_utils.get_input_tensor_by_name(request, api.LORA_WEIGHT.name)
                                                     .as_numpy(), "lora_scale", 1.0)))
        if self.prompt_cache is not None:   # one input (the token ids), one output (the embeddings)
            (name, dtype), = self.outputs
            ids = feeds[self.input_names[0]]

            def encode():
                with self.metrics.timed():
                    return np.ascontiguousarray(self._run(feeds, options)[name], dtype=dtype)

            lora_id = runtime.PromptEncoder.lora_id(options["lora"], options["scale"]) if self.lora else None
            return [pb_utils.Tensor(name, self.prompt_cache(ids, encode, lora_id))]
        results = self._run(feeds, options)
        return [pb_utils.Tensor(name, np.ascontiguousarray(results[name], dtype=dtype)) for name, dtype in self.outputs]

    def _run(self, feeds, options):
        results = self.engine.run(feeds, **options)
        if self.lora:
            self._count_switches()
        return results

    def _count_switches(self):
        restarted = self.engine.loads != self.loads_counted   # loaded again after an idle unload
        self.loads_counted = self.engine.loads
        self.switches.report(self.engine.stats, restarted)
