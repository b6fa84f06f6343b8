"""Time the toonark Triton ensemble on a GPU (benchmarks/triton_gpu.sh runs it in the numpy-1.26 venv):
20-step 512x512 requests, batch 1 with CFG, end to end over HTTP and gRPC (median after warm-up) and per
stage from Triton's statistics API (deltas of success / queue / compute_infer over the timed requests).

    python benchmarks/triton_gpu.py REPO [--reps 7] [--warmup 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def full_stats(client, protocol: str) -> dict:
    stats = client.get_inference_statistics(**({"as_json": True} if protocol == "grpc" else {}))
    out = {}
    for entry in stats.get("model_stats", []):
        inference = entry.get("inference_stats", {})
        out[entry["name"]] = {k: (int(inference.get(k, {}).get("count", 0)), int(inference.get(k, {}).get("ns", 0)))
                              for k in KEYS}
    return out


def stage_table(before: dict, after: dict, requests: int) -> dict:
    table = {}
    for model, now in after.items():
        then = before.get(model, {})
        row = {}
        calls = now["success"][0] - then.get("success", (0, 0))[0]
        if not calls:
            continue
        row["calls"] = calls
        row["calls_per_request"] = round(calls / requests, 2)
        for key in KEYS:
            ns = now[key][1] - then.get(key, (0, 0))[1]
            row[f"{key}_ms_per_call"] = round(ns / 1e6 / calls, 3)
            row[f"{key}_ms_per_request"] = round(ns / 1e6 / requests, 2)
        table[model] = row
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", type=Path)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps {args.reps} must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup} must be >= 0")
    from toonark.serving import launcher as server_module
    from toonark.serving.client import GenerateOptions, connect, generate
    from toonark.serving.launcher import TritonServer
    try:
        import pytriton  # noqa: F401
    except ImportError as err:
        # pytriton's own Python API needs packages the GPU image lacks (its tritonserver does not): locate the
        # bundle without running the package's __init__.
        import importlib.util
        print(f"import pytriton failed ({err}); locating its tritonserver by find_spec", flush=True)
        bundle = Path(list(importlib.util.find_spec("pytriton").submodule_search_locations)[0]) / "tritonserver"
        server_module.triton_bundle = lambda: bundle
    options = GenerateOptions(prompt="a friendly cartoon cat reading a book", seed=1, steps=20, width=512,
                              height=512, guidance=7.5, format="png")
    result: dict = {"settings": {"steps": 20, "size": 512, "batch": 1, "guidance": 7.5, "format": "png",
                                 "reps": args.reps, "warmup": args.warmup}}
    args.out.mkdir(parents=True, exist_ok=True)
    server = TritonServer(args.repo, log_path=args.out / "triton.log")
    t0 = time.perf_counter()
    server.start()
    try:
        result["ready_s"] = round(server.wait_ready(600), 1)
        print(f"ready after {result['ready_s']} s", flush=True)
        for i in range(args.warmup):
            r = generate(server.http_url, options, "http")
            print(f"warm-up {i}: {r.seconds * 1e3:.1f} ms", flush=True)
        for protocol in ("http", "grpc"):
            url = server.http_url if protocol == "http" else server.grpc_url
            client = connect(url, protocol)
            before = full_stats(client, protocol)
            samples = []
            for _ in range(args.reps):
                r = generate(url, options, protocol)
                samples.append(r.seconds * 1e3)
                result.setdefault("image_png_bytes", len(r.images[0]))   # the first timed request's image
            after = full_stats(client, protocol)
            client.close()
            result[protocol] = {"median_ms": round(statistics.median(samples), 2), "min_ms": round(min(samples), 2),
                                "max_ms": round(max(samples), 2), "samples_ms": [round(s, 2) for s in samples],
                                "stages": stage_table(before, after, args.reps)}
            print(protocol, json.dumps(result[protocol]), flush=True)
    finally:
        server.stop()
        result["server_s"] = round(time.perf_counter() - t0, 1)
        (args.out / "triton.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
