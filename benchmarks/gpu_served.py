"""The served path at engine speed (issue 12), one script: in-process device loop vs Triton end to end (HTTP and
gRPC) in the same run, per-stage Triton statistics, a concurrency sweep, FORMAT=raw, and the image encoders.

    # GPU (H200): the SD-1.5-shaped ort-cuda fp16 build of `bash benchmarks/triton_gpu.sh prepare` (BUILD=/tmp/tkbuild)
    python benchmarks/gpu_served.py --build /tmp/tkbuild --out $OUT
    # CPU check of the same code path (< 60 s on 2 idle cores): the tiny build of `make tiny export engine`
    python benchmarks/gpu_served.py --tiny --build build/tiny --out /tmp/served

What it measures, in this order (one process; the in-process pipeline is freed before the server starts):
  in_process   load_pipeline(build) with the device loop + CUDA graphs at B=1 (ort-cuda) or the host loop
               (ort-cpu): median of --reps images after warm-up (512x512, 20 steps, CFG 7.5, batch 1)
  triton       `write_repo` python layout (denoise owns the UNet: unet_loop=in_process, CUDA graphs per
               bucket), tritonserver from nvidia-pytriton: --reps requests per protocol, end to end at the
               client, plus Triton's per-model statistics (queue / compute input / infer / output per request)
  raw          the same request with FORMAT=raw (uint8 pixels, no encoding)
  sweep        1, 2, 4, 8 concurrent clients (own connection each, HTTP and gRPC alternating), images/s and
               p50 / p95 latency; repeated for every --configs entry: "batched" (the default repository:
               denoise's dynamic batcher hands it concurrent requests, run in one device loop over the
               B=1/2/4 CUDA graphs; until 2026-12-02 through a BLS front and a `denoise_loop` model), "single" (one request per loop), "single2" (2 instances)
  encoding     benchmarks/encode_candidates.py's encoders on the served image's pixels and on noise
Writes OUT/gpu_served.json and prints a table. Targets (issue 12): Triton <= in-process + 15 ms and
<= 0.18 s on the H200; >= 9 images/s at 4 clients.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

SUBJECT = "a friendly cartoon cat reading a book"
# Triton statistics per model (success, queue, compute_*), read the same way as the H100 Triton run.
from toonark.benchmarks.triton_gpu import KEYS, full_stats  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2), "p95_ms": round(percentile(ms, 0.95), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


def stage_table(before: dict, after: dict, requests: int) -> dict:
    """Per model: calls per request and ms per request of each Triton statistic (deltas over the timed requests)."""
    table = {}
    for model, now in after.items():
        then = before.get(model, {})
        calls = now["success"][0] - then.get("success", (0, 0))[0]
        if calls:
            table[model] = {"calls_per_request": round(calls / requests, 2),
                            **{f"{key}_ms": round((now[key][1] - then.get(key, (0, 0))[1]) / 1e6 / requests, 3)
                               for key in KEYS}}
    return table


def locate_triton() -> None:
    """`import pytriton` needs zmq, absent on the GPU image: find the bundled tritonserver without running the
    package's __init__ (as benchmarks/triton_gpu.py does)."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        import importlib.util
        from toonark.serving import launcher
        bundle = Path(list(importlib.util.find_spec("pytriton").submodule_search_locations)[0]) / "tritonserver"
        launcher.triton_bundle = lambda: bundle


def in_process(build: Path, backend: str, precision: str, size: int, steps: int, reps: int, warmup: int) -> dict:
    from toonark.engines.pipeline import load_pipeline
    from toonark.prompts import PromptPolicy
    prompt, negative = PromptPolicy.load().compose(SUBJECT)
    options = dict(cuda_graph=True, graph_sizes={"B": 1, "H": size, "W": size}) if backend == "ort-cuda" else {}
    t0 = time.perf_counter()
    pipe = load_pipeline(build, backend, precision, verify=False, **options)
    load_s = time.perf_counter() - t0
    for _ in range(warmup):
        pipe(prompt, negative, seed=1, steps=steps, width=size, height=size)
    seconds, last = [], None
    for i in range(reps):
        start = time.perf_counter()
        last = pipe(prompt, negative, seed=1 + i, steps=steps, width=size, height=size)
        seconds.append(time.perf_counter() - start)
    timings = {k: round(v, 2) for k, v in last.timings.items() if isinstance(v, float)}
    del pipe
    gc.collect()
    return {**summary_ms(seconds), "load_s": round(load_s, 1), "device_loop": bool(last.timings.get("device_loop")),
            "last_timings_ms": timings}


def timed_requests(server, options, reps: int) -> dict:
    from toonark.serving.client import connect, generate
    out = {}
    for protocol in ("http", "grpc"):
        url = server.http_url if protocol == "http" else server.grpc_url
        client = connect(url, protocol)
        before = full_stats(client, protocol)
        seconds = []
        for _ in range(reps):
            seconds.append(generate(url, options, protocol, client=client).seconds)
        time.sleep(0.2)   # the last step's statistics land after the response
        after = full_stats(client, protocol)
        client.close()
        out[protocol] = {**summary_ms(seconds), "stages": stage_table(before, after, reps)}
        print(f"  {protocol}: median {out[protocol]['median_ms']:.1f} ms", flush=True)
    return out


def sweep(server, options, levels: list[int], requests_per_level: int) -> list[dict]:
    """Closed loop: `c` clients, each with its own connection, each sending its share of the level's requests
    back to back (seeds differ, the prompt repeats: the text encoder's cache answers, as for a popular subject)."""
    from dataclasses import replace
    from toonark.serving.client import connect, generate
    rows = []
    for level in levels:
        per_client = max(2, -(-requests_per_level // level))
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(level)

        def client_loop(index: int) -> None:
            protocol = "http" if index % 2 == 0 else "grpc"
            url = server.http_url if protocol == "http" else server.grpc_url
            client = connect(url, protocol)
            barrier.wait()
            for i in range(per_client):
                try:
                    result = generate(url, replace(options, seed=1000 * index + i), protocol, client=client)
                    with lock:
                        latencies.append(result.seconds)
                except Exception as err:   # noqa: BLE001 - counted, the sweep goes on
                    with lock:
                        errors.append(str(err)[:200])
            client.close()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(level)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        row = {"clients": level, "requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 2),
               "images_per_s": round(len(latencies) / wall, 2), **(summary_ms(latencies) if latencies else {}),
               **({"first_error": errors[0]} if errors else {})}
        print(f"  {level} clients: {row['images_per_s']:.2f} img/s, p50 {row.get('median_ms', 0):.0f} ms, "
              f"p95 {row.get('p95_ms', 0):.0f} ms, errors {len(errors)}", flush=True)
        rows.append(row)
    return rows


# name: (batch_requests, denoise (loop) instances, extra parameters of the loop model)
CONFIGS = {"batched": (True, 1, {}), "batched_pad": (True, 1, {"pad_batches": "1"}),
           "batched_2loops": (True, 2, {}), "single": (False, 1, {}), "single2": (False, 2, {})}


def ceiling(build: Path, size: int, steps: int, reps: int = 3) -> dict:
    """What the device loop can do without Triton: runtime.Denoiser.run_batch over UnetLoops (the code the
    batched loop model runs) with 1-4 requests of one image, 3 requests both padded into the B=4 graph and
    split into B=2 + B=1; ms per loop and images/s (the served throughput's upper bound, VAE excluded)."""
    from toonark.family import family_for_folder
    from toonark.layout import BuildLayout
    from toonark.specs import BuildInfo
    from toonark.triton_model_repo.runtime import DenoiseRequest, Denoiser, UnetLoops
    layout, info = BuildLayout(build), BuildInfo.read(build)
    folder = layout.engine_dir("ort-cuda", "fp16") / "unet"
    metadata = json.loads((folder / "engine.json").read_text())
    loops = UnetLoops(folder / "model.onnx", info.specs["unet"], metadata, info.dims, family_for_folder(layout.pipeline),
                      graph_sizes=[{"B": b, "H": size, "W": size} for b in (1, 2, 4)])
    denoiser = Denoiser(layout.pipeline, info)
    rng = np.random.default_rng(0)
    items = [DenoiseRequest(rng.standard_normal((2, info.dims.text_length, info.dims.text_hidden)).astype(np.float32),
                            [i], steps, 7.5, size, size) for i in range(4)]
    rows = []
    for count, pad in ((1, True), (2, True), (3, False), (3, True), (4, True)):
        run = lambda: denoiser.run_batch(items[:count], loops.loop_for, loops.buckets, pad=pad)
        run()   # capture
        seconds = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        ms = statistics.median(seconds) * 1e3
        rows.append({"requests": count, "graphs": "B=4 (padded)" if count == 3 and pad else
                     ("B=2 + B=1" if count == 3 else f"B={count}"), "loop_ms": round(ms, 1),
                     "step_ms": round(ms / steps, 2), "images_per_s": round(count / ms * 1e3, 2)})
        print(f"  ceiling: {count} requests ({rows[-1]['graphs']}): {ms:.1f} ms, {rows[-1]['images_per_s']} img/s",
              flush=True)
    del loops, denoiser
    gc.collect()
    return {"rows": rows}


def idle_unload(build: Path, backend: str, precision: str, size: int, steps: int, work: Path, idle_s: float = 3.0) -> dict:
    """make serve IDLE_UNLOAD_S=N on the default (batched) repository: a warm request, the wait until the UNet
    (sessions + CUDA graphs) and the engine models are freed, then the next request (loads and captures again)."""
    from toonark.serving.client import GenerateOptions, generate
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    repo = write_repo(build, backend, precision, layout="python", out=work / "repo-idle", verify_engines=False)
    log = work / "tritonserver-idle.log"
    options = GenerateOptions(prompt=SUBJECT, seed=1, steps=steps, width=size, height=size, guidance=7.5, format="png")
    server = TritonServer(repo, log_path=log, idle_unload_s=idle_s)
    server.start()
    try:
        server.wait_ready(600)
        first = generate(server.http_url, options, "http").seconds
        warm = [generate(server.http_url, options, "http").seconds for _ in range(3)]
        deadline = time.monotonic() + 60
        while "UNet session freed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2 * idle_s)   # the engine models' watchers too
        freed = [line.split("idle unload: ")[-1].strip('"') for line in log.read_text().splitlines() if "freed" in line]
        cold = generate(server.http_url, options, "http").seconds
        again = generate(server.http_url, options, "http").seconds
        time.sleep(1)
        loads = [line.split("idle unload: ")[-1].strip('"') for line in log.read_text().splitlines()
                 if "loaded again in" in line]
        gpu = None
        try:
            import subprocess
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:   # noqa: BLE001 - informational
            pass
    finally:
        server.stop()
    out = {"idle_unload_s": idle_s, "first_request_s": round(first, 2), "warm_ms": round(statistics.median(warm) * 1e3, 1),
           "after_unload_s": round(cold, 2), "next_ms": round(again * 1e3, 1), "freed": freed, "loads": loads,
           "gpu_memory_at_end": gpu}
    print(f"idle unload: warm {out['warm_ms']} ms, first after unload {out['after_unload_s']} s; {loads}", flush=True)
    return out


def served(build: Path, backend: str, precision: str, size: int, steps: int, reps: int, warmup: int,
           config: str, levels: list[int], sweep_requests: int, work: Path) -> dict:
    from dataclasses import replace
    from toonark.serving.client import GenerateOptions, connect, generate
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    batch_requests, instances, loop_params = CONFIGS[config]
    repo = write_repo(build, backend, precision, layout="python", out=work / f"repo-{config}", verify_engines=False,
                      unet_loop="in_process", batch_requests=batch_requests, denoise_instances=instances)
    for key, value in loop_params.items():   # a variant of the loop model's parameters (benchmark only)
        loop_config = repo / "denoise" / "config.pbtxt"
        loop_config.write_text(loop_config.read_text()
                               + f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n')
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    options = GenerateOptions(prompt=SUBJECT, seed=1, steps=steps, width=size, height=size, guidance=7.5, format="png")
    server = TritonServer(repo, log_path=work / f"tritonserver-{config}.log")
    loop_model = "denoise"   # the batching ensemble step itself (issue 18: no BLS front)
    out: dict = {"config": config, "batch_requests": batch_requests, "denoise_instances": instances, **loop_params,
                 "models": sorted(configs),
                 "loop_config": [line for line in configs[loop_model].splitlines()
                                 if any(k in line for k in ("parameters", "instance_group", "batch"))]}
    t0 = time.perf_counter()
    server.start()
    try:
        out["ready_s"] = round(server.wait_ready(600), 1)
        first = time.perf_counter()
        generate(server.http_url, options, "http")
        out["first_request_s"] = round(time.perf_counter() - first, 2)   # cuDNN search + graph capture
        for _ in range(warmup):
            generate(server.http_url, options, "http")
            generate(server.grpc_url, options, "grpc")
        if batch_requests:   # capture the B=2 and B=4 graphs (and their cuDNN search) before anything is timed
            burst = time.perf_counter()
            sweep(server, options, [4, 2], 4)
            out["batch_warmup_s"] = round(time.perf_counter() - burst, 1)
        print(f"triton ({config}): ready {out['ready_s']} s, first request {out['first_request_s']} s", flush=True)
        out.update(timed_requests(server, options, reps))
        raw = [generate(server.http_url, replace(options, format="raw"), "http") for _ in range(max(3, reps // 2))]
        out["raw_http"] = summary_ms([r.seconds for r in raw])
        out["png_bytes"] = len(generate(server.http_url, options, "http").images[0])
        out["pixels"] = raw[-1].pixels[0]   # for the encoders (not written to the JSON)
        out["sweep"] = sweep(server, options, levels, sweep_requests)
        client = connect(server.http_url)
        stats = {m["name"]: m for m in client.get_inference_statistics()["model_stats"]}
        client.close()
        out["loop_model_counts"] = {k: int(stats[loop_model][k]) for k in ("inference_count", "execution_count")}
    finally:
        server.stop()
        out["server_s"] = round(time.perf_counter() - t0, 1)
    return out


def encoding(pixels: np.ndarray | None, reps: int) -> dict:
    """The encode_candidates encoders on the served picture's pixels and on uniform noise (the worst case)."""
    from toonark.benchmarks import encode_candidates as ec
    size = pixels.shape[0] if pixels is not None else 512
    pictures = {"noise": ec.images(size)["noise"], "cartoon": ec.images(size)["cartoon"]}
    if pixels is not None:
        pictures["served"] = np.ascontiguousarray(pixels)
    encoders, skipped = ec.candidates()
    from toonark.triton_model_repo.runtime import encode_png
    encoders = {"toonark encode_png (served)": ("png", encode_png), **encoders}
    rows = []
    for name, (kind, encode) in encoders.items():
        row = {"encoder": name, "kind": kind}
        for label, image in pictures.items():
            encode(image)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                data = encode(image)
                times.append((time.perf_counter() - start) * 1e3)
            psnr = ec.check(kind, data, image)
            row[label] = {"ms": round(statistics.median(times), 2), "kb": round(len(data) / 1024, 1),
                          **({"psnr_db": round(psnr, 1)} if psnr is not None else {})}
        rows.append(row)
    return {"size": size, "reps": reps, "rows": rows, "skipped": skipped}


def table(result: dict) -> str:
    lines = []
    ip = result["in_process"]
    lines.append(f"in process ({'device loop' if ip['device_loop'] else 'host loop'}): median {ip['median_ms']:.1f} ms "
                 f"(p95 {ip['p95_ms']:.1f})")
    for row in result.get("ceiling", {}).get("rows", []):
        lines.append(f"ceiling (in process, run_batch): {row['requests']} requests as {row['graphs']}: "
                     f"{row['loop_ms']:.1f} ms ({row['step_ms']:.2f} ms/step), {row['images_per_s']:.2f} img/s")
    for run in result["triton"]:
        lines.append(f"triton, {run['config']} (loop executions/inferences {run['loop_model_counts']['execution_count']}/"
                     f"{run['loop_model_counts']['inference_count']}): HTTP {run['http']['median_ms']:.1f} ms, "
                     f"gRPC {run['grpc']['median_ms']:.1f} ms, raw {run['raw_http']['median_ms']:.1f} ms "
                     f"(in-process + {run['http']['median_ms'] - ip['median_ms']:.1f} / "
                     f"{run['grpc']['median_ms'] - ip['median_ms']:.1f} ms)")
        lines.append(f"  {'model':<14}{'calls':>6}{'queue':>9}{'c.input':>9}{'c.infer':>9}{'c.output':>9}  ms/request")
        for model, row in run["http"]["stages"].items():
            lines.append(f"  {model:<14}{row['calls_per_request']:>6}{row['queue_ms']:>9.2f}{row['compute_input_ms']:>9.2f}"
                         f"{row['compute_infer_ms']:>9.2f}{row['compute_output_ms']:>9.2f}")
        lines.append(f"  {'clients':>7}{'img/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
        for row in run["sweep"]:
            lines.append(f"  {row['clients']:>7}{row['images_per_s']:>8.2f}{row.get('median_ms', 0):>9.0f}"
                         f"{row.get('p95_ms', 0):>9.0f}{row['errors']:>8}")
    enc = result["encoding"]
    labels = [k for k in enc["rows"][0] if k not in ("encoder", "kind")]
    lines.append(f"encoders ({enc['size']}x{enc['size']}): " + "".join(f"{label + ' ms':>12}{'KB':>7}" for label in labels))
    for row in enc["rows"]:
        lines.append(f"  {row['encoder']:<38}" + "".join(f"{row[label]['ms']:>12.2f}{row[label]['kb']:>7.0f}"
                                                        for label in labels))
    lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="build folder with engines (see above)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--tiny", action="store_true", help="CPU check: ort-cpu fp32 engines, small sizes and counts")
    parser.add_argument("--size", type=int, help="image size (default 512; --tiny: the build's min)")
    parser.add_argument("--steps", type=int, help="default 20 (--tiny: 4)")
    parser.add_argument("--reps", type=int, help="timed requests per protocol and in process (default 9; --tiny 3)")
    parser.add_argument("--configs", help=f"repositories to serve, comma-separated, from {', '.join(CONFIGS)} "
                        f"(default batched,single; --tiny batched)")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels of the sweep")
    parser.add_argument("--sweep-requests", type=int, help="requests per sweep level (default 32; --tiny 4)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the in-process batch ceiling (GPU only)")
    parser.add_argument("--idle-unload", type=float, default=0.0,
                        help="also measure make serve IDLE_UNLOAD_S=N with this N (0: skip)")
    args = parser.parse_args(argv)
    from toonark.specs import BuildInfo
    info = BuildInfo.read(args.build)
    backend, precision = ("ort-cpu", "fp32") if args.tiny else ("ort-cuda", "fp16")
    size = args.size or (info.limits.min_image if args.tiny else 512)
    steps = args.steps or (4 if args.tiny else 20)
    reps = args.reps or (3 if args.tiny else 9)
    warmup = 1 if args.tiny else 3
    configs = [c.strip() for c in (args.configs or ("batched" if args.tiny else "batched,single")).split(",")
               if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    levels = [int(v) for v in args.clients.split(",") if v.strip()]
    sweep_requests = args.sweep_requests or (4 if args.tiny else 32)
    args.out.mkdir(parents=True, exist_ok=True)
    locate_triton()
    result: dict = {"what": "issue 12: served path vs in-process device loop", "backend": backend,
                    "precision": precision, "size": size, "steps": steps, "guidance": 7.5, "batch": 1, "reps": reps,
                    "machine": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    try:
        from toonark.engines.backends import backend_for
        result["device"] = backend_for(backend).device_name()
    except Exception as err:   # noqa: BLE001 - informational
        result["device"] = f"unknown ({err})"
    started = time.perf_counter()
    result["in_process"] = in_process(args.build, backend, precision, size, steps, reps, warmup)
    print(f"in process: median {result['in_process']['median_ms']:.1f} ms", flush=True)
    save = lambda: (args.out / "gpu_served.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    save()
    if backend == "ort-cuda" and not args.no_ceiling:
        result["ceiling"] = ceiling(args.build, size, steps)
        save()
    result["triton"], failed, pixels = [], {}, None
    for config in configs:   # one failing repository must not lose the others' numbers
        try:
            run = served(args.build, backend, precision, size, steps, reps, warmup, config, levels, sweep_requests,
                         args.out)
        except Exception as err:   # noqa: BLE001 - recorded, the next config runs
            import traceback
            traceback.print_exc()
            failed[config] = f"{type(err).__name__}: {err}"[:2000]
            continue
        pixels = run.pop("pixels", None) if pixels is None else pixels
        run.pop("pixels", None)
        result["triton"].append(run)
        save()
    if args.idle_unload > 0:
        try:
            result["idle_unload"] = idle_unload(args.build, backend, precision, size, steps, args.out, args.idle_unload)
        except Exception as err:   # noqa: BLE001 - recorded
            failed["idle_unload"] = f"{type(err).__name__}: {err}"[:2000]
        save()
    if failed:
        result["failed"] = failed
    if not result["triton"]:
        save()
        raise SystemExit(f"every served configuration failed: {failed} (server logs in {args.out})")
    result["encoding"] = encoding(pixels, 5 if args.tiny else 9)
    from toonark.triton_model_repo.runtime import png_encoder
    result["encoding"]["served_png_encoder"] = png_encoder()[0]
    best = min(result["triton"], key=lambda run: run["http"]["median_ms"])
    four = [row for run in result["triton"] for row in run["sweep"] if row["clients"] == 4]
    ip = result["in_process"]["median_ms"]
    result["targets"] = {
        "triton_http_within_15ms_of_in_process": best["http"]["median_ms"] <= ip + 15,
        "triton_grpc_within_15ms_of_in_process": best["grpc"]["median_ms"] <= ip + 15,
        "triton_le_180ms": max(best["http"]["median_ms"], best["grpc"]["median_ms"]) <= 180,
        "ge_9_images_per_s_at_4_clients": bool(four) and max(row["images_per_s"] for row in four) >= 9,
        "png_encode_le_10ms": next(r for r in result["encoding"]["rows"]
                                   if r["encoder"].startswith("toonark"))["noise"]["ms"] <= 10}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / "gpu_served.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out / 'gpu_served.json'} ({result['wall_s']} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
