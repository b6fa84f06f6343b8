"""toonark safety_checker: diffusers' StableDiffusionSafetyChecker (exported by export/safety_checker.py)
on the decoded images; flagged images are replaced by white ones and NSFW[i] says which.

Thresholds come from the config parameters (written by the generator from the checkpoint's weights;
edit config.pbtxt or load the model with a config override to tune them)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from toonark.export.safety_checker import SafetyChecker, Thresholds
from toonark.triton_model_repo import runtime
from toonark.triton_model_repo.metrics import Metrics


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = runtime.model_parameters(config)
        self.input_name = config["input"][0]["name"]
        self.checked_name, self.checked_dtype = next(
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
            if o["data_type"] != "TYPE_BOOL")
        self.flag_name = next(o["name"] for o in config["output"] if o["data_type"] == "TYPE_BOOL")
        thresholds = Thresholds(Thresholds.parse(params["special_care_thresholds"]),
                                Thresholds.parse(params["concept_thresholds"]),
                                float(params.get("safety_adjustment", 0.0)))
        self.checker = SafetyChecker(runtime.version_dir(args), thresholds,
                                     threads=params.get("intra_op_threads") or None)
        self.metrics = Metrics("safety_checker")
        self.metrics.metric("toonark_nsfw_images_total")   # present from startup, at 0

    def execute(self, requests):
        return runtime.respond_each(requests, self._one, pb_utils, self.metrics)

    def _one(self, request):
        images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        checked, flags = self.checker(images.astype(np.float32))   # ValueError (bad shape): INVALID_ARG
        self.metrics.count("toonark_nsfw_images_total", int(flags.sum()))
        return [pb_utils.Tensor(self.checked_name, np.ascontiguousarray(checked, dtype=self.checked_dtype)),
                pb_utils.Tensor(self.flag_name, np.ascontiguousarray(flags, dtype=np.bool_))]
