"""Faults heal and nothing is lost (issue 18; the failover bullet of issue 13).

- toonark's prompt-embedding cache (toonark.embedding_cache): bounded, keyed by everything that changes the
  embedding, never stores a failure or an unusable embedding;
- the client's retry policy: which failures it retries (the messages and statuses the real server sends);
- a real server: the text encoder's process killed, the prompt that failed then is served correctly after
  the recovery (Triton's response cache used to replay that failure until restart);
- every Python model process killed in turn under HTTP + gRPC load: zero failed client requests;
- two servers, one killed mid-run (once it served both protocols): zero lost requests (the client fails over).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from toonark.embedding_cache import PromptEmbeddingCache
from toonark.serving.client import (NO_RETRY, STUB_DIED, GenerateOptions, RetryPolicy, ServerError, generate,
                                    is_retryable)

SUBJECT = "a happy otter with a kite"
# What tritonserver 2.51 prints when it aborts because a killed Python stub held its shared-memory lock.
UPSTREAM_ABORT = "boost::interprocess::lock_exception"


# --- the prompt-embedding cache ---------------------------------------------------------------------------

def _ids(*rows):
    return np.array([[49406, *row, 49407] + [49407] * (6 - len(row)) for row in rows], dtype=np.int64)


def test_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used():
    emb = np.ones((2, 8, 16), np.float32)          # 1024 bytes + the key
    entry = emb.nbytes + len(_ids([1], [2]).tobytes()) + 64
    cache = PromptEmbeddingCache(max_bytes=3 * entry)
    keys = [cache.key(_ids([0], [i])) for i in range(4)]
    for key in keys[:3]:
        assert cache.put(key, emb * 2, rows=2)
    assert cache.get(keys[0]) is not None           # keys[0] is now the most recently used
    assert cache.put(keys[3], emb, rows=2)          # evicts keys[1], the least recently used
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[3]) is not None
    assert cache.stats.evictions == 1 and cache.stats.bytes <= cache.max_bytes and len(cache) == 3
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)
    hit = cache.get(keys[0])
    with pytest.raises(ValueError):                 # callers share the cached array: read-only
        hit[0, 0, 0] = 5
    assert not PromptEmbeddingCache(max_bytes=10).put(keys[0], emb, rows=2)   # larger than the cache: not kept


def test_cache_key_is_everything_that_changes_the_embedding():
    ids = _ids([320, 1929], [320, 2368])
    key = PromptEmbeddingCache.key
    assert key(ids) == key(ids.copy())
    assert key(ids) != key(_ids([320, 1929], [320, 2369]))           # another prompt or negative prompt row
    assert key(ids) != key(ids.astype(np.int32))                      # other input dtype
    assert key(ids) != key(ids, text_encoder_lora="kid-style:0.8")    # the text-encoder LoRA hook
    assert key(ids, text_encoder_lora="a:1") != key(ids, text_encoder_lora="a:0.5")
    assert key(ids[:1]) != key(ids)                                   # fewer rows


@pytest.mark.parametrize("bad, reason", [
    (np.zeros((0, 77, 32), np.float32), "empty"),
    (np.array([[[np.nan]]], np.float32).repeat(2, 0), "not finite"),
    (np.ones((4, 7, 32), np.float32), "4 rows for 2"),
    (np.ones((2, 7), np.float32), "is not (rows, tokens, width)"),
    (np.ones((2, 7, 3), np.int64), "not a float"),
])
def test_cache_never_stores_an_unusable_embedding(bad, reason):
    cache = PromptEmbeddingCache()
    key = cache.key(_ids([1], [2]))
    assert reason in PromptEmbeddingCache.check(bad, rows=2)
    assert not cache.put(key, bad, rows=2)
    with pytest.raises(RuntimeError, match="unusable embedding"):
        cache.get_or_compute(key, lambda: bad, rows=2)
    assert cache.get(key) is None and cache.stats.refused == 2 and len(cache) == 0


def test_cache_never_stores_a_failure():
    cache = PromptEmbeddingCache()
    key = cache.key(_ids([1], [2]))

    def dead_text_encoder():
        raise RuntimeError("Stub process 'text_encoder_0_0' is not healthy.")

    with pytest.raises(RuntimeError, match="not healthy"):
        cache.get_or_compute(key, dead_text_encoder, rows=2)
    assert len(cache) == 0
    good = np.full((2, 7, 4), 0.5, np.float32)
    assert cache.get_or_compute(key, lambda: good, rows=2)[1] is False   # computed after the recovery
    value, hit = cache.get_or_compute(key, dead_text_encoder, rows=2)     # then served without the encoder
    assert hit and np.array_equal(value, good)


# --- the client's retry policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, message, retry", [
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                               "Failed to connect to remote host: Connection refused", True),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", True),
    ("503", "Exceeds maximum queue size", True),
    ("500", "Failed to process the request(s) for model 'denoise_0_0', message: TritonModelException: "
            "Stub process 'unet_0_0' is not healthy.", True),
    ("StatusCode.INTERNAL", "Stub process 'text_encoder_0_0' is not healthy.", True),
    ("500", "in ensemble 'toonark', Model unet - Error when running inference: Failed for execute the inference "
            "request. Model 'unet' is not ready.", True),
    ("400", "Request for unknown model: 'toonark' has no available versions", True),
    ("400", "Request for unknown model: 'toonarc' is not found", False),
    ("400", "prompt refused (weapons): \"gun\" is not allowed in kids' pictures", False),
    ("StatusCode.INVALID_ARGUMENT", "width 65 must be a multiple of 64 in 64..256", False),
    ("500", "RuntimeError: something else broke", False),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", False),
])
def test_retry_only_what_a_retry_can_fix(status, message, retry):
    assert is_retryable(status, message) is retry


def test_retry_policy_is_bounded_and_jittered():
    import random
    policy = RetryPolicy(attempts=5, max_seconds=3, backoff_s=0.2, max_backoff_s=1.0)
    rng = random.Random(0)
    waits = [[policy.delay(i, rng) for _ in range(200)] for i in range(1, 6)]
    assert [max(w) <= bound for w, bound in zip(waits, (0.2, 0.4, 0.8, 1.0, 1.0))] == [True] * 5
    assert min(waits[3]) < 0.2 < max(waits[3])     # full jitter: spread over [0, cap]
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)


def test_connection_errors_are_retried_and_bounded(capsys):
    from toonark.serving.launcher import free_port
    dead = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=3, max_seconds=5, backoff_s=0.01, max_backoff_s=0.02)
    for protocol in ("http", "grpc"):
        with pytest.raises(ServerError) as info:
            generate(dead, GenerateOptions(SUBJECT), protocol, retry=policy, timeout_s=5)
        assert info.value.retryable and info.value.attempts == 3, (protocol, str(info.value))
        with pytest.raises(ServerError) as info:
            generate(dead, GenerateOptions(SUBJECT), protocol, retry=NO_RETRY, timeout_s=5)
        assert info.value.attempts == 1


# --- real servers --------------------------------------------------------------------------------------------

def _server(repo, tmp_path_factory, name):
    from toonark.serving.launcher import TritonServer
    log = tmp_path_factory.mktemp(name) / "tritonserver.log"
    return TritonServer(repo, log_path=log, exit_timeout_s=5)


@pytest.fixture(scope="module")
def recovery_repo(tiny_engines, tmp_path_factory):
    from toonark.serving.repository import write_repo
    return write_repo(tiny_engines, out=tmp_path_factory.mktemp("recovery") / "repo", intra_op_threads=1)


@pytest.fixture(scope="module")
def server(recovery_repo, tmp_path_factory):
    triton = _server(recovery_repo, tmp_path_factory, "recovery-log")
    try:
        triton.start()
        triton.wait_ready(300)
        triton.start_watchdog()
        yield triton
    finally:
        triton.stop()
        assert not triton.remove_shm()


def _metric(server, name: str) -> float:
    """The sum of a metric's series; name may end in its labels ('x{stage="text_encoder"}': that series)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    prefixes = (name + " ",) if name.endswith("}") else (name + " ", name + "{")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefixes))


def _wait_healed(server, pid: int, model: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stubs = server.stub_processes()
        if pid not in stubs and model in stubs.values() and not server.dead_models() and server.model_ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"{model} not recovered in {timeout} s; log:\n{server.log_tail()}")


@pytest.mark.server
def test_killed_text_encoder_does_not_poison_its_prompt(server, tiny_engines):
    """Issue 18's first fault: the text encoder's process dies while a prompt is being encoded; that prompt
    must be served correctly (the same pixels as the offline pipeline) once the process is back."""
    from PIL import Image
    from toonark.engines.pipeline import load_pipeline
    from toonark.prompts import PromptPolicy
    subject = f"a happy otter number {uuid.uuid4().hex[:6]}"   # never seen: a cache hit cannot hide the fault
    options = GenerateOptions(subject, seed=5, steps=2, width=64, height=64)
    pid = next(p for p, name in server.stub_processes().items() if name == "text_encoder")
    os.kill(pid, signal.SIGKILL)
    failures = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:   # no retry: the prompt's requests reach the dead text encoder
        try:
            generate(server.http_url, options, retry=NO_RETRY, timeout_s=30)
            break
        except ServerError as err:
            failures.append(str(err))
    print(f"\n{len(failures)} requests failed while text_encoder was down: {failures[:1]}")
    assert failures and any(STUB_DIED.search(f) or "not ready" in f or "unavailable" in f.lower() for f in failures)
    _wait_healed(server, pid, "text_encoder")
    prompt, negative = PromptPolicy.load().compose(subject)
    expected = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")(
        prompt, negative, seed=5, steps=2, guidance=7.5, width=64, height=64).images[0]
    misses = _metric(server, "toonark_prompt_cache_misses_total")
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)) * 2:
        image = generate(url, options, protocol, retry=NO_RETRY).images[0]
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(np.int16)
        assert np.abs(pixels - expected.astype(np.int16)).max() <= 1, protocol
    assert _metric(server, "toonark_prompt_cache_misses_total") - misses <= 1   # encoded at most once, then cached
    assert _metric(server, "toonark_prompt_cache_refused_total") == 0


@pytest.mark.server
def test_prompt_cache_hits_skip_the_text_encoder(server):
    """The cache lives in the text_encoder ensemble step: every request passes through it, a hit answers without
    running the engine (the text_encoder stage duration times engine runs only)."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)

    def encoder_requests():
        stats = client.get_inference_statistics("text_encoder")["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"])

    def engine_runs():
        return _metric(server, 'toonark_stage_duration_seconds_count{stage="text_encoder"}')

    hits, misses = (_metric(server, "toonark_prompt_cache_hits_total"), _metric(server, "toonark_prompt_cache_misses_total"))
    requests, runs = encoder_requests(), engine_runs()
    subject = f"a friendly fox {uuid.uuid4().hex[:6]}"
    first = generate(server.http_url, GenerateOptions(subject, seed=1, steps=1, width=64, height=64)).images[0]
    again = generate(server.grpc_url, GenerateOptions(subject, seed=1, steps=1, width=64, height=64), "grpc").images[0]
    generate(server.http_url, GenerateOptions(subject, seed=2, steps=1, width=64, height=64))            # hit
    generate(server.http_url, GenerateOptions(subject, seed=1, steps=1, width=64, height=64,
                                              negative_prompt="rain"))                                  # miss
    assert first == again
    assert _metric(server, "toonark_prompt_cache_hits_total") - hits == 2
    assert _metric(server, "toonark_prompt_cache_misses_total") - misses == 2
    assert encoder_requests() - requests == 4, "every request is a text_encoder ensemble step"
    assert engine_runs() - runs == 2, "a hit must not run the text encoder's engine"
    assert _metric(server, "toonark_prompt_cache_bytes") > 0
    configs = [client.get_model_config(m) for m in server.models]
    assert not [c["name"] for c in configs if c.get("response_cache", {}).get("enable")], "no Triton response cache"
    ensemble = client.get_model_config("toonark")["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in ensemble][:3] == ["preprocess", "text_encoder", "denoise"]


@pytest.mark.server
def test_any_killed_model_process_loses_no_request_under_load(recovery_repo, tmp_path, capsys):
    """`scripts/soak.py --short --kill-each --standby`: every Python model process of the default repository
    killed in turn under 4 clients (HTTP and gRPC), ~40 s, with a standby server the clients fail over to: zero
    failed requests, every kill healed, memory within the bound. The default repository has no BLS callee
    (text_encoder is an ensemble step, denoise owns the UNet); even so tritonserver 2.51 itself aborts in about
    1 of 4 such runs when a stub dies holding its message queue's lock (upstream server#8882, README
    "Operating"), and then only the other server keeps the requests: that case must lose nothing either."""
    import json
    from toonark.scripts.soak import main
    from toonark.serving.launcher import python_models, repo_models
    killed = python_models(recovery_repo)
    assert set(killed) == {"preprocess", "text_encoder", "denoise", "vae_decoder", "postprocess"}, killed
    assert "unet" not in repo_models(recovery_repo)
    log = tmp_path / "tritonserver.log"
    code = main(["--start", str(recovery_repo), "--short", "--kill-each", "--standby",
                 "--json", str(tmp_path / "soak.json"), "--log", str(log)])
    out = capsys.readouterr().out
    print(out)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["errors"] == 0, report["errors_by_message"]
    assert report["load"]["retried"]["requests"] > 0, "the kills were never felt: the test proves nothing"
    assert set(report["load"]["by_protocol"]) == {"http", "grpc"}
    assert all(row["ok"] > 0 for row in report["load"]["by_protocol"].values())
    standby = report["standby"]
    if standby["server_aborted_at_s"] is None:
        assert sorted(k["model"] for k in report["kills"]) == sorted(killed), report["kills"]
        assert all(k["recovery_s"] is not None for k in report["kills"])
        # the clients whose server is the killed one went back to it after failing over (fail_back_s): it kept
        # serving a share, so the later kills were felt too. Half the clients start on it and spend each kill's
        # recovery plus 3 s on the standby, so with fail-back it serves ~20-26 % of a 40 s run (measured
        # 2026-12-02; the bound was 25 % and failed 3 runs in 4); without fail-back only what came before the
        # first kill, ~5 % (an estimate from the kill schedule). 12 % tells the two apart.
        first = sum(row["ok"] for url, row in standby["by_server"].items()
                    if url not in (standby["http_url"], standby["grpc_url"]))
        assert first > 0.12 * report["requests"], standby["by_server"]
    else:   # the upstream abort: the log names it, and the standby served the rest
        assert UPSTREAM_ABORT in log.read_text(), f"tritonserver exited without the known abort: {log.read_text()[-2000:]}"
        assert sum(standby["by_server"].get(url, {}).get("ok", 0) for url in (standby["http_url"], standby["grpc_url"]))
    assert report["ok"] and code == 0 and "PASS" in out, report["failures"]


@pytest.mark.server
def test_failover_to_the_other_server_loses_no_request(recovery_repo, tmp_path_factory):
    """Issue 13: the load tester spread over two servers; one is killed (SIGKILL, whole process group)
    mid-run; the client's bounded retry moves those requests to the other server."""
    from toonark.serving.loadtest import LoadConfig, LoadRun
    a, b = (_server(recovery_repo, tmp_path_factory, f"failover-{n}") for n in "ab")
    try:
        a.start(), b.start()
        a.wait_ready(300), b.wait_ready(300)
        run = LoadRun(LoadConfig(http_url=[a.http_url, b.http_url], grpc_url=[a.grpc_url, b.grpc_url], clients=4,
                                 requests_per_client=100, max_seconds=120, steps=1)).start()
        deadline = time.monotonic() + 120
        while len(run.samples()) < 12 or not {a.http_url, a.grpc_url} <= {s.url for s in run.samples()}:
            assert time.monotonic() < deadline, "server a served no request over one of its protocols"
            time.sleep(0.05)
        os.killpg(a.process.pid, signal.SIGKILL)
        killed_at = time.monotonic() - run.t0
        report = run.wait()
    finally:
        a.stop(), b.stop()
    print(f"\nfailover: {report['requests']} requests, {report['errors']} errors, by server {report['by_server']}, "
          f"retried {report['retried']}")
    assert report["errors"] == 0, report["errors_by_message"]
    # 400 requests: at engine speed (issue 12) 100 finished within a second of the kill, none left to fail over
    assert report["requests"] == 400 and report["ok"] == 400
    assert report["by_server"][a.http_url]["ok"] > 0 and report["by_server"][a.grpc_url]["ok"] > 0
    after = [s for s in run.samples() if s.started > killed_at + 1]
    assert after and all(s.url in (b.http_url, b.grpc_url) for s in after)


@pytest.mark.server
def test_a_dead_server_leaves_no_stub_behind(recovery_repo, tmp_path_factory):
    """When tritonserver dies, the watchdog kills what it left in its process group. A stub started by a reload
    inherits the server's open client connections; one that outlives the server keeps them open, and a request in
    flight there waits its whole timeout instead of failing over at once (a soak run lost one that way). A
    stopped stub stands in for one that never notices its server died (as one still starting up need not)."""
    triton, stuck = _server(recovery_repo, tmp_path_factory, "reap"), None
    try:
        triton.start()
        triton.wait_ready(300)
        triton.start_watchdog()
        stuck = next(pid for pid, model in triton.stub_processes().items() if model == "denoise")
        os.kill(stuck, signal.SIGSTOP)
        triton.process.send_signal(signal.SIGABRT)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{stuck}").exists() and _state(stuck) != "Z" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{stuck}").exists() or _state(stuck) == "Z", \
            f"the stub {stuck} outlived its server by 10 s"
    finally:
        if stuck is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGKILL)
        triton.stop()


def _state(pid: int) -> str:
    """A process's state letter from /proc (Z: exited, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


@pytest.mark.server
@pytest.mark.parametrize("layout", ["bls", "in_process"])
def test_idle_unload_frees_the_engines_and_the_next_request_is_served(layout, tiny_engines, request,
                                                                       tmp_path_factory):
    """make serve IDLE_UNLOAD_S=N: after N idle seconds the engine models free their sessions (the ensemble
    stays ready); the next request loads them again and is served, not refused. bls: a `unet` engine model;
    in_process (the default): the UNet that denoise owns (on a GPU its sessions and CUDA graphs) is freed by
    denoise itself."""
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    folder = tmp_path_factory.mktemp("idle")
    repo = (write_repo(tiny_engines, out=folder / "repo", intra_op_threads=1, unet_loop="bls") if layout == "bls"
            else request.getfixturevalue("recovery_repo"))
    log = folder / "tritonserver.log"
    triton = TritonServer(repo, log_path=log, exit_timeout_s=5, idle_unload_s=1.5)
    options = GenerateOptions(SUBJECT, seed=3, steps=1, width=64, height=64)
    try:
        triton.start()
        triton.wait_ready(300)
        warm = generate(triton.http_url, options, retry=NO_RETRY)
        warm_done = time.monotonic()
        freed = log.read_text().count("session freed")
        loads_before = log.read_text().count("loaded again in")
        deadline = time.monotonic() + 60
        # unet and vae_decoder (text_encoder too); and every engine the warm request used is idle by then (a
        # count alone can be met by an engine it never used, e.g. vae_encoder, while unet is still loaded)
        while (log.read_text().count("session freed") < freed + 2
               or time.monotonic() < warm_done + 2 * triton.idle_unload_s + 0.5):
            assert time.monotonic() < deadline, triton.log_tail()
            time.sleep(0.2)
        assert triton.model_ready()
        cold = generate(triton.http_url, options, retry=NO_RETRY)   # no retry: served at the first try
        assert cold.images == warm.images
        deadline = time.monotonic() + 10   # the stubs' log lines reach the log file a little after the reply
        while log.read_text().count("loaded again in") < loads_before + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        loads = [line for line in log.read_text().splitlines() if "loaded again in" in line][loads_before:]
        print(f"\nidle unload: warm request {warm.seconds:.2f} s, after unload {cold.seconds:.2f} s; "
              + "; ".join(line.split("idle unload: ")[-1].strip('"') for line in loads))
        assert len(loads) >= 2   # unet and vae_decoder (the prompt cache spares text_encoder)
    finally:
        triton.stop()
