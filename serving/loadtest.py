"""Load test of a running `toonark` server: N clients x M requests, HTTP and gRPC mixed, bounded in
count and in time, with throughput, latency percentiles and errors grouped by message.

    report = run_load(LoadConfig(http_url=api.DEFAULT_HTTP_URL, grpc_url=api.DEFAULT_GRPC_URL, clients=8,
                                 requests_per_client=200, steps=2, width=64, height=64))
    print(format_table(report)); write_report(Path("loadtest.json"), report)

Client i uses `protocols[i % len(protocols)]` (default: even clients HTTP, odd gRPC) over one connection, each request
goes through `client.generate` (the same path as `scripts/generate.py`, including its check that
the response carries image bytes), and seeds differ per request so no layer can serve a repeat.
Every client stops after its M requests or at the deadline (`max_seconds`), whichever comes first;
a request already sent at the deadline is waited for (at most `request_timeout_s`), so the run
stops by itself and the report's request count is exact: requests == ok + sum(errors).
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from toonark import api
from toonark.serving.client import PROTOCOLS, GenerateOptions, ServerError, connect, generate, one_line

REPORT_KEYS = ("config", "planned", "requests", "ok", "errors", "error_rate", "errors_by_message", "seconds",
               "throughput_rps", "images_per_s", "latency_ms", "by_protocol", "stopped_by")


@dataclass
class LoadConfig:
    http_url: str | None = None
    grpc_url: str | None = None
    clients: int = 8
    requests_per_client: int = 200
    max_seconds: float = 600.0
    protocols: tuple[str, ...] = PROTOCOLS
    prompt: str = "a happy otter with a kite"
    steps: int = 2
    width: int = 64
    height: int = 64
    format: str = api.DEFAULT_FORMAT
    request_timeout_s: float = 120.0
    seed_base: int = 0

    def __post_init__(self):
        self.protocols = tuple(self.protocols)
        if not self.protocols:
            given = [f"--{p}-url" for p in PROTOCOLS if self.url(p)]
            raise ValueError("no protocol to test: the protocol list is empty"
                             + (f" (only {', '.join(given)} was given)" if given else "")
                             + f"; give --http-url and/or --grpc-url for the protocols to use")
        if self.clients < 1 or self.requests_per_client < 1:
            raise ValueError(f"need at least 1 client and 1 request each, got {self.clients} x "
                             f"{self.requests_per_client}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
            if not self.url(protocol):
                raise ValueError(f"protocol {protocol} is used but no --{protocol}-url was given")

    def url(self, protocol: str) -> str | None:
        return self.http_url if protocol == "http" else self.grpc_url


@dataclass
class _Sample:
    protocol: str
    seconds: float
    error: str | None = None


@dataclass
class _Shared:
    samples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_REQUEST_ID = re.compile(r"\[request id: [^\]]*\]\s*")


def error_key(message: str) -> str:
    """The message errors are grouped by: one line, without request ids."""
    return one_line(_REQUEST_ID.sub("", str(message)))


def _client(index: int, config: LoadConfig, deadline: float, shared: _Shared) -> None:
    protocol = config.protocols[index % len(config.protocols)]
    url = config.url(protocol)
    client = None   # one connection per load-test client, reused by all its requests
    try:
        for n in range(config.requests_per_client):
            if time.monotonic() >= deadline:
                return
            client = client or _connect(url, protocol, config)
            _request(index, n, config, shared, protocol, url, client)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _connect(url: str, protocol: str, config: LoadConfig):
    try:
        return connect(url, protocol, config.request_timeout_s)
    except Exception:   # noqa: BLE001 - counted by the request, which then opens its own connection
        return None


def _request(index: int, n: int, config: LoadConfig, shared: _Shared, protocol: str, url: str, client) -> None:
    options = GenerateOptions(config.prompt, seed=config.seed_base + index * config.requests_per_client + n,
                              steps=config.steps, width=config.width, height=config.height,
                              format=config.format)
    start = time.perf_counter()
    error = None
    try:
        result = generate(url, options, protocol, timeout_s=config.request_timeout_s, client=client)
        if len(result.images) != 1:
            error = f"expected 1 image, got {len(result.images)}"
    except ServerError as err:
        error = error_key(str(err))
    except Exception as err:   # noqa: BLE001 - a load test counts every failure, it never dies of one
        error = error_key(f"{type(err).__name__}: {err}")
    sample = _Sample(protocol, time.perf_counter() - start, error)
    with shared.lock:
        shared.samples.append(sample)


def _latency(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ms = np.asarray(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1), "mean": round(float(ms.mean()), 1),
            "max": round(float(ms.max()), 1)}


def run_load(config: LoadConfig) -> dict:
    """Run the load test; return the report (REPORT_KEYS). Latencies are of successful requests."""
    shared = _Shared()
    started = time.monotonic()
    deadline = started + config.max_seconds
    threads = [threading.Thread(target=_client, args=(i, config, deadline, shared), name=f"loadtest-{i}",
                                daemon=True) for i in range(config.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:   # each ends by count or deadline; an in-flight request ends by its timeout
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + config.request_timeout_s + 5)
    seconds = time.monotonic() - started
    with shared.lock:
        samples = list(shared.samples)
    planned = config.clients * config.requests_per_client
    ok = [s for s in samples if s.error is None]
    errors = Counter(s.error for s in samples if s.error is not None)
    by_protocol = {}
    for protocol in config.protocols:
        mine = [s for s in samples if s.protocol == protocol]
        by_protocol[protocol] = {"requests": len(mine), "ok": sum(s.error is None for s in mine),
                                 "latency_ms": _latency([s.seconds for s in mine if s.error is None])}
    return {
        "config": asdict(config),
        "planned": planned,
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / len(samples), 4) if samples else 0.0,
        "errors_by_message": dict(errors.most_common()),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ok) / seconds, 3) if seconds > 0 else 0.0,
        "images_per_s": round(len(ok) / seconds, 3) if seconds > 0 else 0.0,
        "latency_ms": _latency([s.seconds for s in ok]),
        "by_protocol": by_protocol,
        "stopped_by": "count" if len(samples) == planned else "time",
    }


def format_table(report: dict) -> str:
    c = report["config"]
    lines = [f"{c['clients']} clients x {c['requests_per_client']} requests ({'/'.join(c['protocols'])} "
             f"alternating), {c['width']}x{c['height']} px, {c['steps']} steps, {c['format']}; "
             f"stopped by {report['stopped_by']} after {report['seconds']:.1f} s",
             f"{'protocol':<9}{'requests':>9}{'ok':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"]
    rows = [(name, row["requests"], row["ok"], row["latency_ms"]) for name, row in report["by_protocol"].items()]
    rows.append(("all", report["requests"], report["ok"], report["latency_ms"]))

    def ms(value):
        return "-" if value is None else f"{value:.0f}"

    for name, requests, ok, lat in rows:
        lines.append(f"{name:<9}{requests:>9}{ok:>7}{ms(lat['p50']):>9}{ms(lat['p95']):>9}{ms(lat['p99']):>9}")
    lines.append(f"throughput {report['throughput_rps']:.2f} req/s; errors {report['errors']} "
                 f"({100 * report['error_rate']:.1f} %)")
    for message, count in report["errors_by_message"].items():
        lines.append(f"  {count:>6} x {message}")
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    """Atomic JSON write (a reader never sees half a report)."""
    from toonark.files import write_json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), report)
