"""Check a GPU install (`make setup GPU=1` runs it last; run it again any time):

    python scripts/gpu_check.py [--json FILE] [--driver-only]

1. an NVIDIA driver is there (libcuda.so.1 loads; `--driver-only` stops here: setup asks this before it
   installs anything),
2. onnxruntime is the GPU build and lists CUDAExecutionProvider (after `onnxruntime.preload_dlls()`, which
   loads the CUDA / cuDNN libraries of the nvidia-* wheels that torch brings),
3. a tiny session (MatMul + Add) runs on that provider with CPU fallback disabled, and its result matches numpy,
4. torch (when installed) is a CUDA build of the same CUDA major version as onnxruntime-gpu and sees the GPU.

Exit 0: all passed; 1: a check failed (the message names the fix); 2: no driver. Only the standard library is
imported at start, so the driver check runs before anything is installed (the Makefile calls this file with
the system python3).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

try:
    from toonark.scripts import _cli as cli
except ImportError:   # run as a file before `make setup` installed toonark: python put scripts/ first on sys.path
    import _cli as cli

NO_DRIVER = ("no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded: {error}). `make setup GPU=1` needs "
             "a CUDA GPU with its driver (nvidia-smi must work; in a container: --gpus all / the NVIDIA container "
             "toolkit). On a machine without a GPU use `make setup` (CPU build).")
NO_CUDA_PROVIDER = ("onnxruntime {version} ({path}) has no CUDAExecutionProvider (providers {providers}): the CPU "
                    "package `onnxruntime` is installed or shadows onnxruntime-gpu. Fix: `.venv/bin/python -m pip "
                    "uninstall -y onnxruntime onnxruntime-gpu && .venv/bin/python -m pip install -r "
                    "requirements-gpu.txt` (what `make setup GPU=1` does), or carry the onnxruntime-gpu wheel "
                    "(benchmarks/NOTES.md, offline GPU machines).")


class CheckFailed(RuntimeError):
    """A check that did not pass; its message names the fix."""


def check_driver() -> dict:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise CheckFailed(NO_DRIVER.format(error=err)) from None
    version = ctypes.c_int(0)
    # cuDriverGetVersion needs no cuInit: it reports what the driver supports (13000 = CUDA 13.0).
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        raise CheckFailed(NO_DRIVER.format(error="cuDriverGetVersion failed"))
    return {"driver_cuda": f"{version.value // 1000}.{version.value % 1000 // 10}"}


def ort_cuda_version(ort) -> str | None:
    """The CUDA version onnxruntime-gpu was built against (None for CPU builds / unknown)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    return getattr(info, "cuda_version", None) or None


def check_onnxruntime() -> dict:
    import onnxruntime as ort
    result = {"onnxruntime": ort.__version__, "onnxruntime_path": str(Path(ort.__file__).parent),
              "onnxruntime_cuda": ort_cuda_version(ort)}
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
            result["preload_dlls"] = "ok"
        except Exception as err:  # noqa: BLE001 - a missing library shows below as a missing provider
            result["preload_dlls"] = f"failed: {err}"
    providers = ort.get_available_providers()
    result["providers"] = providers
    if "CUDAExecutionProvider" not in providers:
        raise CheckFailed(NO_CUDA_PROVIDER.format(version=ort.__version__, path=result["onnxruntime_path"],
                                                  providers=providers))
    return result


def tiny_session() -> dict:
    """MatMul + Add on the CUDA EP; session.disable_cpu_ep_fallback makes a CPU placement an error, and
    get_providers() catches the silent fallback ORT does when the CUDA EP cannot load."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "gpu_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8   # readable by every onnxruntime this project meets (>= 1.15)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CUDAExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own Fail / RuntimeException types
        raise CheckFailed(f"a tiny ONNX Runtime session could not start on CUDA: {err}. Check the CUDA / cuDNN "
                          f"libraries onnxruntime-gpu needs (onnxruntime.preload_dlls() loads them from the "
                          f"nvidia-* wheels torch installs; or LD_LIBRARY_PATH).") from None
    used = session.get_providers()
    if used[0] != "CUDAExecutionProvider":
        raise CheckFailed(f"the tiny session fell back to {used}: the CUDA EP did not load (CUDA / cuDNN libraries)")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w + b
    rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    if not rel < 3e-3:   # TF32 may be on: ~3e-4
        raise CheckFailed(f"the tiny CUDA session computed a wrong result (rel L2 {rel:.2e} vs numpy)")
    return {"session_providers": used, "tiny_rel_l2": float(f"{rel:.3g}")}


def check_torch(ort_cuda: str | None) -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": None}
    result = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "torch_path": str(Path(torch.__file__).parent)}
    if torch.version.cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is a CPU build; the GPU setup needs a CUDA build (PyPI's Linux "
                          f"torch is one: `.venv/bin/python -m pip install --force-reinstall --no-deps -r "
                          f"requirements-gpu.txt`)")
    if ort_cuda and ort_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise CheckFailed(f"torch is built for CUDA {torch.version.cuda} but onnxruntime-gpu for CUDA {ort_cuda}: "
                          f"preload_dlls() would load torch's libraries of the wrong major version. Install the "
                          f"pair in requirements-gpu.txt")
    if not torch.cuda.is_available():
        raise CheckFailed(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: is the driver older "
                          f"than CUDA {torch.version.cuda} needs? (nvidia-smi prints the highest CUDA it supports)")
    result["device"] = torch.cuda.get_device_name(0)
    return result


def run_checks(report: dict, driver_only: bool = False) -> dict:
    """Fill `report` check by check (what passed stays in it when a later check raises CheckFailed)."""
    report.update({"python": sys.version.split()[0], "executable": sys.executable})
    report.update(check_driver())
    if driver_only:
        return report
    report.update(check_onnxruntime())
    report.update(tiny_session())
    report.update(check_torch(report.get("onnxruntime_cuda")))
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    parser.add_argument("--json", type=Path, help="write the report (and a failure's message) to this file")
    parser.add_argument("--driver-only", action="store_true", help="only check that an NVIDIA driver is there")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    report: dict = {}
    try:
        run_checks(report, args.driver_only)
        report["ok"] = True
        lines = [f"GPU check passed: {k} = {v}" for k, v in report.items() if k != "ok"]
        print("\n".join(lines) if not args.driver_only else f"NVIDIA driver found (CUDA {report['driver_cuda']})")
    except CheckFailed as err:   # the report says what failed; cli.main prints the message and exits 1
        report.update(ok=False, error=str(err))
        raise
    finally:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
