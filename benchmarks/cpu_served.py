"""CPU: the served path vs the same build in process vs optimum's ORTStableDiffusionPipeline, one run (issue 12).

    .venv/bin/python benchmarks/cpu_served.py --build build/tiny --model build/tiny-pipeline --rounds 5
    .venv/bin/python benchmarks/cpu_served.py ... --before     # also the old repository (queue policy on
                                                                # every model: the 500 ms BLS stalls)
    .venv/bin/python benchmarks/cpu_served.py ... --in-process-unet   # also the other unet_loop than the default
                                                                      # (bls since in_process is the default), to
                                                                      # compare them

Same work for every method: the kid template + default negative prompt, seed, 256x256, 20 DPM-Solver++
steps, CFG 7.5, one image, PNG-encoded at the server's settings (runtime.encode_images). Methods are
interleaved round by round (in process, served, [served-before], optimum), so load from other processes
on a shared machine hits them alike; compare the ratios, not the absolute times. The served image must be
byte-identical to the in-process one (checked). Per served request, Triton's statistics give the UNet's
queue time per BLS call: a 500 ms batcher stall shows there.

Prints a table and writes JSON (--json, default benchmarks/results/cpu-served-<date>.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SUBJECT = "a happy otter flying a kite"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(seconds: list[float]) -> dict:
    p50 = statistics.median(seconds)
    return {"n": len(seconds), "p50_s": round(p50, 4), "p95_s": round(percentile(seconds, 0.95), 4),
            "min_s": round(min(seconds), 4), "max_s": round(max(seconds), 4),
            "p95_over_p50": round(percentile(seconds, 0.95) / p50, 3)}


def model_detail(client) -> dict:
    out = {}
    for entry in client.get_inference_statistics()["model_stats"]:
        stats = entry["inference_stats"]
        out[entry["name"]] = {k: (int(stats[k]["count"]), int(stats[k]["ns"])) for k in ("success", "queue",
                                                                                          "compute_infer")}
    return out


def per_call_ms(before: dict, after: dict, model: str, key: str) -> float:
    calls = after[model]["success"][0] - before[model]["success"][0]
    return (after[model][key][1] - before[model][key][1]) / 1e6 / max(calls, 1)


def old_repository(repo: Path, target: Path) -> Path:
    """The repository as the generator wrote it before issue 12's fixes: the queue policy on every model,
    ORT's default (spinning) intra-op pools."""
    from toonark.serving.repository import ENSEMBLE, QueuePolicy
    shutil.copytree(repo, target)
    policy = QueuePolicy().config_text()
    for config in target.glob("*/config.pbtxt"):
        text = config.read_text()
        text = "".join(line + "\n" for line in text.splitlines() if '"intra_op_spinning"' not in line)
        if config.parent.name != ENSEMBLE and "dynamic_batching" not in text:
            text += policy
        config.write_text(text)
    return target


def load_comparison(args, offline, prompt: str, negative: str, guidance: float, server) -> dict:
    """The issue's load test (8 clients x 40 requests, 2 steps) through Triton against what the 2 cores do in
    process: the same requests back to back in one pipeline (ORT's intra-op threads on every core), same run."""
    from toonark.serving.loadtest import LoadConfig, run_load
    from toonark.triton_model_repo.runtime import encode_images
    count = args.load_clients * args.load_requests
    start = time.perf_counter()
    for i in range(count):
        result = offline(prompt, negative, seed=i, steps=args.load_steps, guidance=guidance, width=args.size,
                         height=args.size)
        encode_images(result.decoded, "png")
    in_process_ips = count / (time.perf_counter() - start)
    report = run_load(LoadConfig(http_url=server.http_url, grpc_url=server.grpc_url, clients=args.load_clients,
                                 requests_per_client=args.load_requests, steps=args.load_steps, width=args.size,
                                 height=args.size, prompt=SUBJECT))
    served_ips = report["images_per_s"]
    return {"clients": args.load_clients, "requests_per_client": args.load_requests, "steps": args.load_steps,
            "in_process_images_per_s": round(in_process_ips, 3), "served_images_per_s": served_ips,
            "served_p50_ms": report["latency_ms"].get("p50"), "served_p99_ms": report["latency_ms"].get("p99"),
            "errors": report["errors"], "in_process_over_served": round(in_process_ips / max(served_ips, 1e-9), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("build/tiny"), help="build folder (make engine done)")
    parser.add_argument("--model", type=Path, default=Path("build/tiny-pipeline"),
                        help="the diffusers folder the build came from (optimum exports it); '' skips optimum")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="requests per method per round")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="ORT threads of the served engines (make repo's default 0: ORT picks) and in process")
    parser.add_argument("--before", action="store_true", help="also serve the pre-fix repository")
    parser.add_argument("--in-process-unet", action="store_true",
                        help="also serve the other unet_loop than the default (bls; in_process when bls is it)")
    parser.add_argument("--load-clients", type=int, default=8,
                        help="the load-test comparison: this many clients through Triton (0: skip)")
    parser.add_argument("--load-requests", type=int, default=40, help="requests per load-test client")
    parser.add_argument("--load-steps", type=int, default=2, help="steps of the load-test requests")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    from toonark.engines.pipeline import load_pipeline
    from toonark.prompts import PromptPolicy
    from toonark.serving.client import GenerateOptions, connect, generate
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    from toonark.triton_model_repo.runtime import encode_images, encode_png

    seed, guidance = 3, 7.5
    prompt, negative = PromptPolicy.load().compose(SUBJECT)
    work = Path(tempfile.mkdtemp(prefix="cpu-served-"))
    results: dict = {"what": "CPU served vs in process vs optimum (issue 12)", "subject": SUBJECT, "size": args.size,
                     "steps": args.steps, "guidance": guidance, "rounds": args.rounds, "reps": args.reps,
                     "intra_op_threads": args.intra_op_threads, "machine": platform.node(),
                     "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "note": "shared machine: other processes ran at the same time; methods are interleaved"}
    times: dict[str, list[float]] = {"in_process": [], "served": []}
    unet_queue: dict[str, list[float]] = {"served": []}
    unet_compute: dict[str, list[float]] = {"served": []}

    threads = args.intra_op_threads or None
    # The served ort-cpu engines' settings: idle ORT workers sleep (serving.repository, issue 12).
    offline = load_pipeline(args.build, backend="ort-cpu", precision="fp32", threads=threads, spinning=False)

    def in_process() -> bytes:
        result = offline(prompt, negative, seed=seed, steps=args.steps, guidance=guidance, width=args.size,
                         height=args.size)
        return encode_images(result.decoded, "png")[0]

    optimum = None
    if str(args.model) not in ("", "."):   # Path("") is "."
        import torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline
        optimum = ORTStableDiffusionPipeline.from_pretrained(str(args.model), export=True)
        optimum.set_progress_bar_config(disable=True)
        times["optimum"] = []

    def run_optimum() -> None:
        import io
        image = optimum(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=guidance,
                        height=args.size, width=args.size, generator=torch.Generator().manual_seed(seed)).images[0]
        encode_png(np.asarray(image))   # the server's PNG encoder: the same work

    repos = {"served": write_repo(args.build, out=work / "repo", intra_op_threads=args.intra_op_threads)}
    if args.in_process_unet:   # the other loop than the default repository's (in_process since issue 18: bls)
        from toonark.serving.repository import default_unet_loop
        other = "bls" if default_unet_loop("ort-cpu", "python") == "in_process" else "in_process"
        repos[f"served_unet_{other}"] = write_repo(args.build, out=work / f"repo-{other}",
                                                   intra_op_threads=args.intra_op_threads, unet_loop=other)
        for table in (times, unet_queue, unet_compute):
            table[f"served_unet_{other}"] = []
    if args.before:
        repos["served_before"] = old_repository(repos["served"], work / "repo-before")
        for table in (times, unet_queue, unet_compute):
            table["served_before"] = []
    servers = {}
    try:
        for name, repo in repos.items():
            servers[name] = TritonServer(repo, log_path=work / f"{name}.log").start()
        for server in servers.values():
            server.wait_ready(300)
        clients = {name: connect(server.http_url) for name, server in servers.items()}
        options = GenerateOptions(SUBJECT, seed=seed, steps=args.steps, guidance=guidance, width=args.size,
                                  height=args.size)
        # Warm-up, and the served bytes must be the in-process bytes.
        expected = in_process()
        for name, server in servers.items():
            served = generate(server.http_url, options, client=clients[name]).images[0]
            if served != expected:
                raise SystemExit(f"{name}: the served PNG differs from the in-process one")
        if optimum is not None:
            run_optimum()
        for round_ in range(args.rounds):
            for _ in range(args.reps):
                start = time.perf_counter()
                in_process()
                times["in_process"].append(time.perf_counter() - start)
            for name, server in servers.items():
                for _ in range(args.reps):
                    before = model_detail(clients[name])
                    result = generate(server.http_url, options, client=clients[name])
                    times[name].append(result.seconds)
                    time.sleep(0.05)   # statistics of the last step land after the response
                    after = model_detail(clients[name])
                    if "unet" in after:   # an in_process denoise has no unet model
                        unet_queue[name].append(per_call_ms(before, after, "unet", "queue"))
                        unet_compute[name].append(per_call_ms(before, after, "unet", "compute_infer"))
            if optimum is not None:
                for _ in range(args.reps):
                    start = time.perf_counter()
                    run_optimum()
                    times["optimum"].append(time.perf_counter() - start)
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{k} {statistics.median(v[-args.reps:]):.3f}s" for k, v in times.items()), flush=True)
        if args.load_clients:
            results["load"] = load_comparison(args, offline, prompt, negative, guidance, servers["served"])
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    results["methods"] = {name: summary(values) for name, values in times.items()}
    results["seconds"] = {name: [round(v, 4) for v in values] for name, values in times.items()}
    for name in [n for n in unet_queue if unet_queue[n]]:
        results["methods"][name]["unet_queue_ms_per_call_p50"] = round(statistics.median(unet_queue[name]), 2)
        results["methods"][name]["unet_queue_ms_per_call_max"] = round(max(unet_queue[name]), 2)
        results["methods"][name]["unet_compute_ms_per_call_p50"] = round(statistics.median(unet_compute[name]), 2)
    base = results["methods"]["in_process"]["p50_s"]
    results["ratios"] = {f"{name}/in_process": round(row["p50_s"] / base, 3) for name, row in results["methods"].items()
                         if name != "in_process"}
    if optimum is not None:
        results["ratios"]["served/optimum"] = round(results["methods"]["served"]["p50_s"]
                                                    / results["methods"]["optimum"]["p50_s"], 3)
    served = results["methods"]["served"]
    results["targets"] = {"served_p50_le_1.15x_in_process": served["p50_s"] <= 1.15 * base,
                          "served_p95_le_1.3x_p50": served["p95_over_p50"] <= 1.3}
    if "load" in results:
        results["targets"]["load_test_within_1.3x_of_in_process"] = results["load"]["in_process_over_served"] <= 1.3
    if optimum is not None:
        results["targets"]["served_p50_le_optimum_p50"] = served["p50_s"] <= results["methods"]["optimum"]["p50_s"]

    print(f"\n{'method':<16}{'n':>4}{'p50 s':>9}{'p95 s':>9}{'min s':>9}{'max s':>9}{'p95/p50':>9}"
          f"{'unet queue ms':>15}{'unet compute ms':>17}")
    for name, row in results["methods"].items():
        queue = row.get("unet_queue_ms_per_call_p50")
        compute = row.get("unet_compute_ms_per_call_p50")
        print(f"{name:<16}{row['n']:>4}{row['p50_s']:>9.3f}{row['p95_s']:>9.3f}{row['min_s']:>9.3f}{row['max_s']:>9.3f}"
              f"{row['p95_over_p50']:>9.2f}{'' if queue is None else f'{queue:.1f}':>15}"
              f"{'' if compute is None else f'{compute:.1f}':>17}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in results["ratios"].items()))
    if "load" in results:
        load = results["load"]
        print(f"load test ({load['clients']} clients x {load['requests_per_client']}, {args.size} px, "
              f"{load['steps']} steps): served {load['served_images_per_s']} images/s (p50 {load['served_p50_ms']} ms, "
              f"p99 {load['served_p99_ms']} ms, errors {load['errors']}), in process back to back "
              f"{load['in_process_images_per_s']} images/s: {load['in_process_over_served']}x")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in results["targets"].items()))
    out = args.json or Path("benchmarks/results") / f"cpu-served-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
