"""`make perf`: Triton's perf_analyzer against the `toonark` ensemble, concurrency sweep, one table + JSON.

perf_analyzer is not in the current tritonclient wheels; the 2.51.0 manylinux wheel carries
`bin/perf_analyzer` (recipe section 5, gotcha 11). It links libb64.so.0d (Debian libb64-0d) and
libcudart.so.12 even on a CPU machine; the Makefile installs both into their own venv (.venv-perf:
tritonclient 2.51.0 pins numpy/grpc versions the main venv must not get) and this module puts the
CUDA runtime wheel's lib/ on LD_LIBRARY_PATH.

The request is one realistic image (PROMPT, SEED, STEPS, WIDTH, HEIGHT) from a generated input-data
JSON; optional inputs left out of it are not sent, so the server's defaults apply, as for a client.

Stable numbers for slow requests: perf_analyzer's default time windows (5 s) hold only a few
0.5-3 s requests, so it never sees three windows agree ("Failed to obtain stable measurement").
Count windows (`--measurement-mode count_windows`) with enough requests per window, a percentile
for the stability check and a looser stability band give stable p50/p95/p99 at concurrency 1-4.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

from toonark.serving.repository import ENSEMBLE

PROMPTS = ("a happy otter flying a kite", "a sleepy panda in a tree", "a small dragon reading a book",
           "a fox hunting for berries")


def input_data(size: int, steps: int, seeds: int = 4) -> dict:
    """perf_analyzer --input-data JSON: `seeds` requests (prompt i, seed i) cycled through; the same prompts
    come back, so the text encoder's response cache answers after the first round (as in production)."""
    from toonark.serving.client import GenerateOptions   # the client's inputs: the API's names and types
    rows = []
    for i in range(seeds):
        tensors = GenerateOptions(PROMPTS[i % len(PROMPTS)], seed=i, steps=steps, width=size, height=size).inputs()
        rows.append({name: {"content": [v.decode() if isinstance(v, bytes) else v.item() for v in value.reshape(-1)],
                            "shape": list(value.shape)} for name, value in tensors.items()})
    return {"data": rows}


def find_perf_analyzer(venv: Path) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary of the perf venv and the environment it needs (libcudart.so.12)."""
    binary = venv / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing; `make perf` installs it (pip install "
                                f"'tritonclient[all]==2.51.0' into {venv})")
    libs = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    if not libs:
        raise FileNotFoundError(f"no libcudart.so.12 in {venv}; pip install nvidia-cuda-runtime-cu12 there")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(libs[0]) + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return binary, env


def run_level(binary: Path, env: dict, url: str, protocol: str, data: Path, concurrency: int, requests: int,
              csv_path: Path, timeout_s: float, stability: int = 30) -> dict:
    cmd = [str(binary), "-m", ENSEMBLE, "-u", url, "-i", protocol, "--input-data", str(data),
           "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-mode", "count_windows", "--measurement-request-count", str(requests),
           "--percentile", "95", "--stability-percentage", str(stability), "--max-trials", "10",
           "-f", str(csv_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not csv_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"perf_analyzer failed at concurrency {concurrency} (rc {proc.returncode}):\n{tail}")
    with open(csv_path, newline="") as handle:
        row = next(csv.DictReader(handle))
    ms = lambda key: round(int(row[key]) / 1e3, 1)   # microseconds in the CSV
    return {"concurrency": concurrency, "throughput_per_s": round(float(row["Inferences/Second"]), 3),
            "p50_ms": ms("p50 latency"), "p90_ms": ms("p90 latency"), "p95_ms": ms("p95 latency"),
            "p99_ms": ms("p99 latency"), "avg_ms": round(sum(int(row[k]) for k in row if k in (
                "Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                "Server Compute Infer", "Server Compute Output", "Client Recv")) / 1e3, 1),
            "server_queue_ms": ms("Server Queue"), "server_compute_infer_ms": ms("Server Compute Infer")}


def sweep(url: str, venv: Path, *, protocol: str = "http", concurrency=(1, 2, 3, 4), size: int = 256,
          steps: int = 20, requests: int = 20, stability: int = 30, timeout_s: float = 900.0) -> dict:
    binary, env = find_perf_analyzer(venv)
    with tempfile.TemporaryDirectory(prefix="toonark-perf-") as tmp:
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps(input_data(size, steps)))
        levels = []
        for level in concurrency:
            row = run_level(binary, env, url, protocol, data, level, max(requests, 3 * level), Path(tmp) / f"c{level}.csv",
                            timeout_s, stability)
            print(f"concurrency {level}: {row['throughput_per_s']:.2f}/s p50 {row['p50_ms']:.0f} ms "
                  f"p95 {row['p95_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms", flush=True)
            levels.append(row)
    return {"tool": "perf_analyzer (tritonclient 2.51.0)", "model": ENSEMBLE, "protocol": protocol, "size": size,
            "steps": steps, "requests_per_window": requests, "stability_percentage": stability, "levels": levels,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def table(result: dict) -> str:
    lines = [f"{'conc':>4}{'img/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'p95/p50':>9}"]
    for row in result["levels"]:
        lines.append(f"{row['concurrency']:>4}{row['throughput_per_s']:>8.2f}{row['p50_ms']:>9.0f}{row['p90_ms']:>9.0f}"
                     f"{row['p95_ms']:>9.0f}{row['p99_ms']:>9.0f}{row['p95_ms'] / row['p50_ms']:>9.2f}")
    return "\n".join(lines)


def measure(out: Path, *, url: str | None = None, protocol: str = "http", perf_venv: Path = Path(".venv-perf"),
            concurrency=(1, 2, 3, 4), size: int = 256, steps: int = 20, requests: int = 20, stability: int = 30,
            json_path: Path | None = None) -> dict:
    """The sweep against `url`, or against a server started from OUT/triton_model_repo for the run; writes the
    JSON (default OUT/perf.json, temp file then rename) and returns it."""
    server = None
    try:
        if url is None:
            from toonark.layout import BuildLayout
            from toonark.serving.launcher import TritonServer
            server = TritonServer(BuildLayout(out).triton_repo, log_path=Path(out) / "perf-tritonserver.log")
            server.start()
            server.wait_ready(300)
            url = server.http_url if protocol == "http" else server.grpc_url
            print(f"started tritonserver for {server.repo} at {url}", flush=True)
        try:
            result = sweep(url, perf_venv, protocol=protocol, concurrency=concurrency, size=size, steps=steps,
                           requests=requests, stability=stability)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"perf_analyzer did not finish in {err.timeout} s") from None
    finally:
        if server is not None:
            server.stop()
    target = Path(json_path) if json_path else Path(out) / "perf.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(target)
    result["json"] = str(target)
    return result
