"""Does an ORT CPU engine graph saved on one CPU family run on another? (README "Engines"; the record is
benchmarks/results/2026-12-04-ort-cpu-engine-portability.json.)

Prepare on the building host, in FOLDER: unet_all.onnx (a UNet engine saved at ORT level "all", what toonark
saved before 2026-12-04), unet_extended.onnx (the same source saved at "extended", what it saves now) and
unet_source.onnx (the exported ONNX). Then on the other host:

    python benchmarks/ort_cpu_portability.py FOLDER [--also-ort PATH] --out result.json

Each graph runs in its own process (a SIGFPE kills only that one) on fixed tiny-UNet inputs, and its output is
compared with the source loaded at level "all" on that host. --also-ort PATH repeats every run with the
onnxruntime installed under PATH (pip install --target PATH onnxruntime==X), to tell the CPU from the version.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN_ONE = r'''
import sys, numpy as np, onnxruntime as ort
path, level, npy = sys.argv[1:4]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.graph_optimization_level = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32), "timestep": np.array([500.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
np.save(npy, session.run(None, feeds)[0])
print(ort.__version__)
'''
# (graph, level at load): the old engine as toonark loaded it, the new one both ways, and the reference.
CASES = (("unet_all.onnx", "disable_all"), ("unet_extended.onnx", "disable_all"), ("unet_extended.onnx", "all"),
         ("unet_source.onnx", "all"))


def main(argv=None) -> None:
    import numpy as np
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--also-ort", default=None, help="a folder with another onnxruntime (pip --target)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ort_path in (None, args.also_ort):
            env = dict(os.environ, PYTHONPATH=ort_path) if ort_path else dict(os.environ)
            for graph, level in CASES:
                key = f"{'ort ' + ort_path if ort_path else 'installed ort'} {graph} load={level}"
                npy = Path(tmp) / f"{len(results)}.npy"
                run = subprocess.run([sys.executable, "-c", RUN_ONE, str(args.folder / graph), level, str(npy)],
                                     env=env, capture_output=True, text=True)
                results[key] = {"rc": run.returncode, "onnxruntime": run.stdout.strip(), "error": run.stderr.strip()[-300:]}
                if run.returncode == 0:
                    results[key]["output"] = np.load(npy)
            if args.also_ort is None:
                break
        for prefix in {key.split(" unet")[0] for key in results}:
            reference = results[f"{prefix} unet_source.onnx load=all"].get("output")
            for key, row in results.items():
                if key.startswith(prefix) and "output" in row and reference is not None:
                    row["max_abs_diff_vs_source_at_all"] = float(np.abs(row.pop("output") - reference).max())
    for key, row in results.items():
        row.pop("output", None)
        print(f"{key:55s} rc {row['rc']:>3}  {row.get('max_abs_diff_vs_source_at_all', row['error'][-70:])}")
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
