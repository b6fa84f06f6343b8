"""Soak and kill-under-load runs of a toonark server (issue 18): steady load while Python model processes are
killed, bounded in time, with what an operator needs to trust the service for hours.

    with TritonServer(repo) as server:
        server.wait_ready(300); server.start_watchdog()
        report = run_soak(server, SoakConfig(seconds=1800, kill_every_s=180))
    print(format_report(report))

What it records:
  * every request (loadtest.LoadRun: N clients, HTTP and gRPC alternating, the client's bounded retry);
    per minute: requests, errors, retried requests, p50 / p99 latency (of the caller's wait, retries included);
  * every kill: which model's process (SIGKILL), when, the recovery time (kill -> a new process serving and
    the ensemble ready again, as the launcher's watchdog reloads it) and the p99 of the requests sent in
    that window (the latency cost of a kill), next to the p99 of the requests outside any window;
  * every `sample_every_s`: each process's RSS and open file descriptors (tritonserver and each stub).
Every second request of a client has a subject of its own (a prompt-cache miss, so the text encoder
runs and its kill is felt; the cache fills to its byte bound and evicts), the others repeat one prompt.
It fails (report["ok"] False, with the reasons) on any lost request (a request that failed after its
retries), on a kill that did not recover, and on memory growth beyond the bound after warm-up: the RSS of
tritonserver plus all stubs at the end may exceed its value at the end of warm-up by at most
`max_growth_mb` (default 256 MiB), and tritonserver's open fds by at most `max_fd_growth` (default 64).

Kill schedule: `kill_every_s` seconds apart (the first after warm-up), a random model each time
(`seed`), or each model of `models` once in turn (`kill_each`: the per-model recovery table).
"""
from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toonark.serving.loadtest import LoadConfig, LoadRun, _latency

REPORT_KEYS = ("config", "ok", "failures", "requests", "errors", "errors_by_message", "minutes", "kills",
               "recovery", "memory", "fds", "load")


@dataclass
class SoakConfig:
    seconds: float = 1800.0              # total load time (the run's bound)
    clients: int = 8
    requests_per_client: int = 10 ** 9   # or a count (8 x 200): the run ends at whichever comes first
    kill_every_s: float = 180.0
    warmup_s: float = 60.0               # no kill and no memory baseline before this
    models: tuple[str, ...] = ()         # whose processes may be killed (default: every Python model)
    kill_each: bool = False              # each of `models` once, in order, instead of random ones
    seed: int = 0
    steps: int = 2
    width: int = 64
    height: int = 64
    sample_every_s: float = 5.0
    minute_s: float = 60.0               # the per-minute table's bucket (shorter in tests)
    recovery_timeout_s: float = 120.0
    max_growth_mb: float = 256.0
    max_fd_growth: int = 64
    protocols: tuple[str, ...] = ("http", "grpc")
    unique_every: int = 2                # every 2nd request a new subject: half the requests run the text encoder

    def __post_init__(self):
        if not (self.seconds > 0 and self.kill_every_s > 0 and self.sample_every_s > 0 and self.minute_s > 0):
            raise ValueError("soak seconds, kill_every_s, sample_every_s and minute_s must be > 0")
        if self.warmup_s < 0 or self.warmup_s >= self.seconds:
            raise ValueError(f"warm-up ({self.warmup_s} s) must be >= 0 and shorter than the run ({self.seconds} s)")


@dataclass
class _Kill:
    model: str
    pid: int
    at: float                      # seconds after the load's start
    wall: float = 0.0              # time.time() of the kill
    recovered_at: float | None = None
    watchdog_s: float | None = None
    new_pids: list = field(default_factory=list)


def process_table(server) -> dict[int, dict]:
    """{pid: {"name": "tritonserver" | <model>, "rss_mb", "fds"}} of the server and its stubs now."""
    procs = {server.process.pid: "tritonserver", **server.stub_processes()}
    out = {}
    for pid, name in procs.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            continue   # exited between the listing and the read
        out[pid] = {"name": name, "rss_mb": round(rss_kb / 1024, 1), "fds": fds}
    return out


def _kill(server, model: str, t: float) -> _Kill:
    pids = [pid for pid, name in server.stub_processes().items() if name == model]
    if not pids:
        raise RuntimeError(f"no live process of model {model!r} to kill")
    pid = random.Random(t).choice(pids)
    wall = time.time()
    os.kill(pid, signal.SIGKILL)
    return _Kill(model, pid, t, wall)


def _recovery(server, kill: _Kill) -> dict | None:
    """The watchdog's successful reload of the killed model after the kill (its record), once it is done:
    new processes started and serving, the ensemble ready."""
    for record in list(server.recoveries):
        if kill.model in record["models"] and record.get("ok") and record.get("done_at", 0) > kill.wall:
            stubs = server.stub_processes()
            if kill.pid in stubs or not server.model_ready():
                return None
            kill.new_pids = sorted(pid for pid, name in stubs.items() if name == kill.model)
            return record
    return None


def run_soak(server, config: SoakConfig, progress=None, standby=None) -> dict:
    """Load `server` (a started TritonServer with its watchdog on) for config.seconds with kills; the report
    (REPORT_KEYS). progress: a callable given one line per minute/kill (print). standby: a second started
    server the clients fail over to (half of them start there): tritonserver 2.51 itself can abort when a
    stub dies (upstream server#8882, README "Operating"), and then only another server keeps every request;
    kills stop when the killed server is gone, and its unhealed kill is reported, not failed."""
    models = tuple(config.models) or tuple(server.python_models)
    unknown = set(models) - set(server.python_models)
    if unknown:
        raise ValueError(f"cannot kill {sorted(unknown)}: not Python models of {server.repo} "
                         f"({', '.join(server.python_models)})")
    rng = random.Random(config.seed)
    servers = [server] + ([standby] if standby is not None else [])
    load = LoadRun(LoadConfig(http_url=[s.http_url for s in servers], grpc_url=[s.grpc_url for s in servers],
                              clients=config.clients,
                              requests_per_client=config.requests_per_client, max_seconds=config.seconds,
                              protocols=config.protocols, steps=config.steps, width=config.width,
                              height=config.height, seed_base=config.seed * 10 ** 7,
                              unique_every=config.unique_every,
                              # with a standby, clients return to the first server 3 s after failing over, so
                              # every kill is felt (a client that stayed on the standby would not see it)
                              fail_back_s=3.0 if standby is not None else 0.0)).start()
    t0 = load.t0
    kills: list[_Kill] = []
    samples: list[dict] = []
    next_kill = config.warmup_s
    next_sample = 0.0
    queue = list(models)
    pending: _Kill | None = None
    reported_minute = 0
    aborted_at = None
    while load.running():
        now = time.monotonic() - t0
        if standby is not None and aborted_at is None and server.process.poll() is not None:
            aborted_at = now   # the killed server itself is gone: the standby serves; no more kills
            server.reap_stubs()   # what it left must not hold the clients' connections open
            queue, next_kill, pending = [], float("inf"), None
            if progress:
                progress(f"  {now:7.1f} s  tritonserver exited ({server.process.returncode}): the clients fail over "
                         "to the standby")
        if now >= next_sample:
            samples.append({"t": round(now, 1), "procs": process_table(server)})
            next_sample = now + config.sample_every_s
        if pending is not None:
            record = _recovery(server, pending)
            if record is not None:
                pending.recovered_at = pending.at + (record["done_at"] - pending.wall)
                pending.watchdog_s = record.get("seconds")
                if progress:
                    progress(f"  {now:7.1f} s  {pending.model} back after {pending.recovered_at - pending.at:.2f} s "
                             f"(watchdog reload {pending.watchdog_s} s)")
                pending = None
            elif now - pending.at > config.recovery_timeout_s:
                if progress:
                    progress(f"  {now:7.1f} s  {pending.model} NOT recovered after {config.recovery_timeout_s:.0f} s")
                pending = None
        elif now >= next_kill and (not config.kill_each or queue) and now < config.seconds - 1:
            model = queue.pop(0) if config.kill_each else rng.choice(models)
            pending = _kill(server, model, now)
            kills.append(pending)
            if progress:
                progress(f"  {now:7.1f} s  kill -9 {model} (pid {pending.pid})")
            next_kill = now + config.kill_every_s
        minute = int(now // config.minute_s)
        if progress and minute > reported_minute:
            rows = _minutes(load.samples(), config.minute_s)
            # No request finished in that minute yet (all waiting on a stalled server): nothing to show.
            row = rows[reported_minute] if reported_minute < len(rows) else {"requests": 0, "errors": 0,
                                                                              "p50_ms": None, "p99_ms": None}
            progress(f"  minute {reported_minute + 1}: {row['requests']} requests, {row['errors']} errors, "
                     f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")
            reported_minute = minute
        time.sleep(0.05 if pending is not None else 0.2)
    load_report = load.wait()
    samples.append({"t": round(time.monotonic() - t0, 1), "procs": process_table(server)})
    report = _report(config, models, load, load_report, kills, samples, aborted_at)
    if standby is not None:
        report["standby"] = {"http_url": standby.http_url, "grpc_url": standby.grpc_url,
                             "server_aborted_at_s": None if aborted_at is None else round(aborted_at, 2),
                             "by_server": load_report["by_server"]}
    return report


def _minutes(samples, minute_s: float) -> list[dict]:
    if not samples:
        return []
    ends = [s.started + s.seconds for s in samples]
    count = int(max(ends) // minute_s) + 1
    rows = []
    for m in range(count):
        mine = [s for s, end in zip(samples, ends) if m * minute_s <= end < (m + 1) * minute_s]
        ok = [s.seconds for s in mine if s.error is None]
        lat = _latency(ok)
        rows.append({"minute": m + 1, "requests": len(mine), "errors": sum(s.error is not None for s in mine),
                     "retried": sum(s.attempts > 1 for s in mine), "p50_ms": lat["p50"], "p99_ms": lat["p99"]})
    return rows


def _report(config, models, load, load_report, kills, samples, aborted_at: float | None = None) -> dict:
    done = load.samples()
    windows = [(k.at, k.recovered_at if k.recovered_at is not None else k.at + config.recovery_timeout_s)
               for k in kills]

    def in_window(s, window):
        return window[0] <= s.started <= window[1] or s.started <= window[0] <= s.started + s.seconds

    outside = [s.seconds for s in done if s.error is None and not any(in_window(s, w) for w in windows)]
    kill_rows = []
    for kill, window in zip(kills, windows):
        hit = [s for s in done if in_window(s, window)]
        lat = _latency([s.seconds for s in hit if s.error is None])
        kill_rows.append({"model": kill.model, "pid": kill.pid, "at_s": round(kill.at, 2),
                          "recovery_s": None if kill.recovered_at is None else round(kill.recovered_at - kill.at, 2),
                          "watchdog_reload_s": kill.watchdog_s, "requests_in_window": len(hit),
                          "retried_in_window": sum(s.attempts > 1 for s in hit),
                          "errors_in_window": sum(s.error is not None for s in hit),
                          "p50_ms": lat["p50"], "p99_ms": lat["p99"], "max_ms": lat["max"]})
    by_model = {}
    for row in kill_rows:
        by_model.setdefault(row["model"], []).append(row)
    recovery = {model: {"kills": len(rows),
                        "recovery_s": [r["recovery_s"] for r in rows],
                        "p99_ms_in_window": max((r["p99_ms"] or 0) for r in rows)} for model, rows in by_model.items()}
    recovery["_outside_windows"] = {"p50_ms": _latency(outside)["p50"], "p99_ms": _latency(outside)["p99"]}

    def total(sample, key):
        return round(sum(p[key] for p in sample["procs"].values()), 1)

    def server_value(sample, key):
        return next((p[key] for p in sample["procs"].values() if p["name"] == "tritonserver"), None)

    after_warmup = next((s for s in samples if s["t"] >= config.warmup_s), samples[-1])
    last = samples[-1]
    memory = {"bound_mb": config.max_growth_mb,
              "total_rss_mb_start": total(samples[0], "rss_mb"),
              "total_rss_mb_after_warmup": total(after_warmup, "rss_mb"),
              "total_rss_mb_end": total(last, "rss_mb"),
              "total_rss_mb_max": max(total(s, "rss_mb") for s in samples),
              "tritonserver_rss_mb_after_warmup": server_value(after_warmup, "rss_mb"),
              "tritonserver_rss_mb_end": server_value(last, "rss_mb"),
              "by_process_end": {f"{p['name']}:{pid}": p["rss_mb"] for pid, p in sorted(last["procs"].items())}}
    memory["growth_mb"] = round(memory["total_rss_mb_end"] - memory["total_rss_mb_after_warmup"], 1)
    fds = {"bound": config.max_fd_growth,
           "tritonserver_after_warmup": server_value(after_warmup, "fds"), "tritonserver_end": server_value(last, "fds"),
           "total_end": total(last, "fds")}
    fds["growth"] = (fds["tritonserver_end"] or 0) - (fds["tritonserver_after_warmup"] or 0)
    failures = []
    if load_report["errors"]:
        failures.append(f"{load_report['errors']} lost requests: {load_report['errors_by_message']}")
    if load_report["ok"] == 0:
        failures.append("no request succeeded")
    for row in kill_rows:
        if row["recovery_s"] is None and aborted_at is None:   # after an abort the standby serves (run_soak)
            failures.append(f"{row['model']} killed at {row['at_s']} s did not recover")
    if memory["growth_mb"] > config.max_growth_mb:
        failures.append(f"memory grew {memory['growth_mb']} MiB after warm-up (bound {config.max_growth_mb} MiB)")
    if fds["growth"] > config.max_fd_growth:
        failures.append(f"tritonserver's open fds grew by {fds['growth']} after warm-up (bound {config.max_fd_growth})")
    return {"config": {**asdict(config), "models": list(models)}, "ok": not failures, "failures": failures,
            "requests": load_report["requests"], "errors": load_report["errors"],
            "errors_by_message": load_report["errors_by_message"],
            "minutes": _minutes(done, config.minute_s), "kills": kill_rows, "recovery": recovery,
            "memory": memory, "fds": fds,
            "load": {k: load_report[k] for k in ("seconds", "throughput_rps", "latency_ms", "by_protocol", "retried",
                                                  "stopped_by")},
            "samples": [{"t": s["t"], "total_rss_mb": total(s, "rss_mb"), "total_fds": total(s, "fds"),
                         "tritonserver_rss_mb": server_value(s, "rss_mb"), "tritonserver_fds": server_value(s, "fds")}
                        for s in samples]}


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [f"soak: {c['clients']} clients, {c['seconds']:.0f} s, {c['width']}x{c['height']} px, {c['steps']} steps; "
             f"{report['requests']} requests, {report['errors']} lost, "
             f"{report['load']['retried']['requests']} retried; {'PASS' if report['ok'] else 'FAIL'}",
             f"{'minute':>6}{'requests':>9}{'errors':>7}{'retried':>8}{'p50 ms':>8}{'p99 ms':>8}"]
    for row in report["minutes"]:
        lines.append(f"{row['minute']:>6}{row['requests']:>9}{row['errors']:>7}{row['retried']:>8}"
                     f"{row['p50_ms'] or '-':>8}{row['p99_ms'] or '-':>8}")
    lines.append(f"{'kill':<14}{'at s':>7}{'recovery s':>11}{'in window':>10}{'retried':>8}{'p99 ms':>8}")
    for row in report["kills"]:
        lines.append(f"{row['model']:<14}{row['at_s']:>7.1f}{row['recovery_s'] or '-':>11}{row['requests_in_window']:>10}"
                     f"{row['retried_in_window']:>8}{row['p99_ms'] or '-':>8}")
    outside = report["recovery"]["_outside_windows"]
    lines.append(f"outside kill windows: p50 {outside['p50_ms']} ms, p99 {outside['p99_ms']} ms")
    m, f = report["memory"], report["fds"]
    lines.append(f"RSS (server + stubs): {m['total_rss_mb_after_warmup']} MiB after warm-up -> {m['total_rss_mb_end']} "
                 f"MiB at the end (growth {m['growth_mb']}, bound {m['bound_mb']}); max {m['total_rss_mb_max']}")
    lines.append(f"tritonserver fds: {f['tritonserver_after_warmup']} -> {f['tritonserver_end']} (bound +{f['bound']})")
    for failure in report["failures"]:
        lines.append(f"FAIL: {failure}")
    return "\n".join(lines)

