"""Load test of a running `toonark` server: N clients x M requests, HTTP and gRPC mixed, bounded in
count and in time, with throughput, latency percentiles and errors grouped by message.

    report = run_load(LoadConfig(http_url=api.DEFAULT_HTTP_URL, grpc_url=api.DEFAULT_GRPC_URL, clients=8,
                                 requests_per_client=200, steps=2, width=64, height=64))
    print(format_table(report)); write_report(Path("loadtest.json"), report)

Client i uses `protocols[i % len(protocols)]` (default: even clients HTTP, odd gRPC) over one connection, each request
goes through `client.generate` (the same path as `scripts/generate.py`, including its check that
the response carries image bytes and its bounded retry of transient failures, `retry`), and seeds differ
per request so no layer can serve a repeat. Several servers (http_url / grpc_url lists): client i's first
server is the (i // len(protocols)) mod n-th of its protocol's list, the others its failover order, so
clients spread over the servers and a retried request moves to the next server (where the client then stays).
Every client stops after its M requests or at the deadline (`max_seconds`), whichever comes first;
a request already sent at the deadline is waited for (at most `request_timeout_s`), so the run
stops by itself and the report's request count is exact: requests == ok + sum(errors).
"""
from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from toonark import api
from toonark.serving.client import (DEFAULT_RETRY, PROTOCOLS, Connections, GenerateOptions, RetryPolicy,
                                    ServerError, generate, one_line)

REPORT_KEYS = ("config", "planned", "requests", "ok", "errors", "error_rate", "errors_by_message", "seconds",
               "throughput_rps", "images_per_s", "latency_ms", "by_protocol", "by_server", "retried",
               "stopped_by")


@dataclass
class LoadConfig:
    http_url: str | list[str] | None = None   # one HOST:PORT or several servers'
    grpc_url: str | list[str] | None = None
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
    retry: RetryPolicy | None = DEFAULT_RETRY   # None: every failure counts at once
    # 0: every request sends `prompt` (after the first, the prompt cache answers); k: every k-th request of a
    # client sends a subject of its own (a cache miss: the text encoder runs, so killing it is felt).
    unique_every: int = 0
    # After failing over, a client goes back to its own server after this many seconds (0: it stays where it
    # was answered). The soak's standby sets it, so that every kill of the first server is felt.
    fail_back_s: float = 0.0

    def __post_init__(self):
        self.protocols = tuple(self.protocols)
        for name in ("http_url", "grpc_url"):   # "a,b" or a list: several servers
            value = getattr(self, name)
            if isinstance(value, str) and "," in value:
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)):
                value = list(value) if len(value) > 1 else (value[0] if value else None)
            setattr(self, name, value)
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

    def url(self, protocol: str):
        return self.http_url if protocol == "http" else self.grpc_url

    def urls(self, protocol: str) -> list[str]:
        value = self.url(protocol)
        return [] if not value else ([value] if isinstance(value, str) else list(value))

    def client_urls(self, index: int) -> list[str]:
        """Client `index`'s servers in the order it tries them (its own first)."""
        urls = self.urls(self.protocols[index % len(self.protocols)])
        first = (index // len(self.protocols)) % len(urls)
        return urls[first:] + urls[:first]


@dataclass
class _Sample:
    protocol: str
    seconds: float
    error: str | None = None
    started: float = 0.0       # seconds after the run's start
    attempts: int = 1
    url: str | None = None


@dataclass
class _Shared:
    samples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_REQUEST_ID = re.compile(r"\[request id: [^\]]*\]\s*")


def error_key(message: str) -> str:
    """The message errors are grouped by: one line, without request ids."""
    return one_line(_REQUEST_ID.sub("", str(message)))


def _client(index: int, config: LoadConfig, deadline: float, shared: _Shared, t0: float,
            stop: threading.Event | None = None) -> None:
    protocol = config.protocols[index % len(config.protocols)]
    home = urls = config.client_urls(index)
    failed_over_at = None
    # One connection per server for this load-test client, reused by all its requests.
    with Connections(protocol, config.request_timeout_s) as connections:
        for n in range(config.requests_per_client):
            now = time.monotonic()
            if now >= deadline or (stop is not None and stop.is_set()):
                return
            if failed_over_at is not None and config.fail_back_s > 0 and now - failed_over_at >= config.fail_back_s:
                urls, failed_over_at = home, None   # back to its own server
            served_by = _request(index, n, config, shared, protocol, urls, connections, t0)
            if served_by in urls[1:]:   # failed over: keep sending to the server that answered
                urls = urls[urls.index(served_by):] + urls[:urls.index(served_by)]
                failed_over_at = time.monotonic()


# A unique subject spells its number in syllables: digits would be refused by the kid-safety rules when they
# form a hate code ("number 1488" was, in a kill-each run).
_SYLLABLES = ("ba", "ko", "mi", "nu", "pe", "ru", "si", "to", "vu", "zo")


def pet_name(number: int) -> str:
    """1488 -> "kopevuvu": a made-up, kid-safe name for a number (one syllable a digit)."""
    return "".join(_SYLLABLES[int(d)] for d in str(abs(int(number))))


def _request(index: int, n: int, config: LoadConfig, shared: _Shared, protocol: str, urls: list[str],
             connections: Connections, t0: float) -> str | None:
    seed = config.seed_base + index * config.requests_per_client + n
    prompt = config.prompt
    if config.unique_every and n % config.unique_every == 0:
        prompt = f"{config.prompt} named {pet_name(seed)}"
    options = GenerateOptions(prompt, seed=seed,
                              steps=config.steps, width=config.width, height=config.height,
                              format=config.format)
    started = time.monotonic()
    start = time.perf_counter()
    error, attempts, url = None, 1, urls[0]
    try:
        result = generate(urls, options, protocol, timeout_s=config.request_timeout_s, connections=connections,
                          retry=config.retry)
        attempts, url = result.attempts, result.url
        if len(result.images) != 1:
            error = f"expected 1 image, got {len(result.images)}"
    except ServerError as err:
        error, attempts = error_key(str(err)), err.attempts
    except Exception as err:   # noqa: BLE001 - a load test counts every failure, it never dies of one
        error = error_key(f"{type(err).__name__}: {err}")
    sample = _Sample(protocol, time.perf_counter() - start, error, started - t0, attempts, url)
    with shared.lock:
        shared.samples.append(sample)
    return url if error is None else None


def _latency(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ms = np.asarray(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1), "mean": round(float(ms.mean()), 1),
            "max": round(float(ms.max()), 1)}


class LoadRun:
    """A load test running in background threads: start(), then `samples()` at any time, `wait()` for the end
    (soak.py reads the samples while it runs). stop() ends it early (requests in flight finish)."""

    def __init__(self, config: LoadConfig):
        self.config = config
        self.shared = _Shared()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = 0.0
        self.deadline = 0.0

    def start(self) -> "LoadRun":
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.config.max_seconds
        self.threads = [threading.Thread(target=_client, args=(i, self.config, self.deadline, self.shared, self.t0,
                                                               self.stopping), name=f"loadtest-{i}", daemon=True)
                        for i in range(self.config.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def samples(self) -> list[_Sample]:
        with self.shared.lock:
            return list(self.shared.samples)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        self.stopping.set()

    def wait(self) -> dict:
        retry = self.config.retry or RetryPolicy(attempts=1)
        slack = self.config.request_timeout_s * retry.attempts + retry.max_seconds + 5
        for thread in self.threads:   # each ends by count or deadline; an in-flight request ends by its timeout
            thread.join(timeout=max(0.0, self.deadline - time.monotonic()) + slack)
        return report(self.config, self.samples(), time.monotonic() - self.t0)


def run_load(config: LoadConfig) -> dict:
    """Run the load test; return the report (REPORT_KEYS). Latencies are of successful requests (retries
    included: the time the caller waited)."""
    return LoadRun(config).start().wait()


def report(config: LoadConfig, samples: list[_Sample], seconds: float) -> dict:
    planned = config.clients * config.requests_per_client
    ok = [s for s in samples if s.error is None]
    errors = Counter(s.error for s in samples if s.error is not None)
    by_protocol = {}
    for protocol in config.protocols:
        mine = [s for s in samples if s.protocol == protocol]
        by_protocol[protocol] = {"requests": len(mine), "ok": sum(s.error is None for s in mine),
                                 "latency_ms": _latency([s.seconds for s in mine if s.error is None])}
    by_server = {url: {"requests": sum(s.url == url for s in samples),
                       "ok": sum(s.url == url and s.error is None for s in samples)}
                 for url in sorted({s.url for s in samples if s.url})}
    return {
        "config": {**asdict(config), "retry": asdict(config.retry) if config.retry else None},
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
        "by_server": by_server,
        "retried": {"requests": sum(s.attempts > 1 for s in samples),
                    "extra_attempts": sum(s.attempts - 1 for s in samples)},
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
                 f"({100 * report['error_rate']:.1f} %); retried {report['retried']['requests']} requests "
                 f"({report['retried']['extra_attempts']} extra tries)")
    if len(report["by_server"]) > 1:
        lines.append("by server: " + ", ".join(f"{url} {row['ok']}/{row['requests']}"
                                              for url, row in report["by_server"].items()))
    for message, count in report["errors_by_message"].items():
        lines.append(f"  {count:>6} x {message}")
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    """Atomic JSON write (a reader never sees half a report)."""
    from toonark.files import write_json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), report)
