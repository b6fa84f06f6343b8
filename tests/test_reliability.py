"""Bad requests and security defaults against the real session server (server_fixtures.py).

Every bad request must come back fast with one clear message (HTTP 400 / gRPC INVALID_ARGUMENT)
and leave the server serving the next request. Requests are sent with raw tritonclient tensors,
so wrong dtypes, shapes and missing inputs reach the server as a hostile client would send them.
"""
from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest
from server_fixtures import triton_repo, triton_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.server

SUBJECT = "a happy otter with a kite"
_WIRE = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
         np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}


def texts(*values) -> np.ndarray:
    return np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=object)


def good_inputs() -> dict:
    return {"PROMPT": texts(SUBJECT), "STEPS": np.array([1], np.int32), "WIDTH": np.array([64], np.int32),
            "HEIGHT": np.array([64], np.int32), "SEED": np.array([1], np.int64)}


def infer(server, protocol: str, inputs: dict):
    """Send raw tensors to the ensemble; returns the IMAGE array or raises InferenceServerException."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    client = module.InferenceServerClient(url)
    tensors = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), _WIRE[value.dtype])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    try:
        return client.infer("toonark", tensors).as_numpy("IMAGE")
    finally:
        client.close()


def status_of(err) -> str:
    return str(err.status())


# (case, changes to the good request (None: leave the input out), message the client must see)
BAD_REQUESTS = [
    ("empty prompt", {"PROMPT": texts("")}, 'subject is empty; describe what to draw'),
    ("whitespace prompt", {"PROMPT": texts("  \t ")}, 'subject is empty; describe what to draw'),
    ("prompt over the character cap", {"PROMPT": texts("otter " * 40)},
     "subject is 239 characters long; keep it to 200 or fewer"),
    # 196 characters, under the cap, but 65 CLIP tokens, 88 with the style words: refused rather than silently cut
    # (runtime.py). Real words: round 16's classifier reads a run of "zq" as drugs (0.65) and refuses it first.
    ("prompt over the token window", {"PROMPT": texts(", ".join(["kite"] * 33))}, "is too long: "),
    ("invalid UTF-8", {"PROMPT": texts(b"\xff\xfe otter")}, "PROMPT is not valid UTF-8 text"),
    ("width off the image step", {"WIDTH": np.array([65], np.int32)},
     "width 65 must be a multiple of 64 in 64..256 (the built engine profile)"),
    # above the profile's 256 is made in tiles (toonark.tiling), up to 4096
    ("height above the tiled maximum", {"HEIGHT": np.array([4160], np.int32)},
     "height 4160 must be a multiple of 64 in 64..4096"),
    ("width 0", {"WIDTH": np.array([0], np.int32)}, "width 0 must be a multiple of 64"),
    ("steps 0", {"STEPS": np.array([0], np.int32)}, "steps must be between 1 and 100, got 0"),
    ("steps huge", {"STEPS": np.array([10 ** 9], np.int32)}, "steps must be between 1 and 100, got 1000000000"),
    ("guidance NaN", {"GUIDANCE": np.array([np.nan], np.float32)}, "GUIDANCE nan is out of range; use 0..30"),
    ("guidance inf", {"GUIDANCE": np.array([np.inf], np.float32)}, "GUIDANCE inf is out of range; use 0..30"),
    ("guidance negative", {"GUIDANCE": np.array([-1], np.float32)}, "GUIDANCE -1.0 is out of range; use 0..30"),
    ("seed negative", {"SEED": np.array([-1], np.int64)}, "SEED -1 is out of range"),
    ("batch 0", {"PROMPT": np.zeros((0,), dtype=object)}, "PROMPT is empty: send one prompt per image"),
    ("batch over the build", {"PROMPT": texts("a cat", "a dog", "a cow")},
     "batch 3 is outside the built range 1..2"),
    ("SEED as FP32", {"SEED": np.array([1.0], np.float32)},
     "inference input 'SEED' data-type is 'FP32', but model 'toonark' expects 'INT64'"),
    ("SEED of two values", {"SEED": np.array([1, 2], np.int64)},
     "unexpected shape for input 'SEED' for model 'toonark'. Expected [1], got [2]"),
    ("PROMPT of rank 2", {"PROMPT": texts("a", "b").reshape(1, 2)},
     "unexpected shape for input 'PROMPT' for model 'toonark'. Expected [-1], got [1,2]"),
    ("unknown input", {"COLOR": np.array([1], np.int32)}, "unexpected inference input 'COLOR' for model 'toonark'"),
    ("unknown FORMAT", {"FORMAT": texts("gif")}, "FORMAT 'gif' is not supported; use one of png, webp, raw"),
    ("unknown preset", {"PRESET": texts("turbo"), "STEPS": None}, "unknown preset 'turbo'"),
    ("unsafe subject", {"PROMPT": texts("a kid with a gun")}, "prompt refused"),
]


@pytest.mark.parametrize("case, changes, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_clearly_and_the_server_goes_on(triton_server, case, changes, message):
    from tritonclient.utils import InferenceServerException
    inputs = {k: v for k, v in {**good_inputs(), **changes}.items() if v is not None}
    for protocol in ("http", "grpc"):
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            infer(triton_server, protocol, inputs)
        assert time.monotonic() - start < 2.0, f"{case}: refusal took {time.monotonic() - start:.1f} s"
        assert message in caught.value.message(), (case, caught.value.message())
        # A client error, not a server fault: clients must not retry it.
        assert status_of(caught.value) in ("400", "StatusCode.INVALID_ARGUMENT"), (case, caught.value.status())
    images = infer(triton_server, "grpc", good_inputs())      # the next good request is served
    assert images.shape == (1,) and bytes(images[0])[:4] == b"\x89PNG"


def test_missing_prompt_is_refused_and_the_server_goes_on(triton_server):
    """Triton 2.51 does not check an ensemble's required inputs (without PROMPT it would answer
    "unexpected deadlock"), so PROMPT is optional at the ensemble and preprocess refuses its absence."""
    from tritonclient.utils import InferenceServerException
    inputs = {k: v for k, v in good_inputs().items() if k != "PROMPT"}
    for protocol in ("http", "grpc"):
        with pytest.raises(InferenceServerException) as caught:
            infer(triton_server, protocol, inputs)
        text = caught.value.message()
        assert "PROMPT is missing: send one prompt per image (a BYTES tensor of shape [B])" in text, text
        assert status_of(caught.value) in ("400", "StatusCode.INVALID_ARGUMENT")
    assert infer(triton_server, "http", good_inputs()).shape == (1,)


def test_prompt_at_the_token_window_is_served(triton_server):
    """The refusal is exact: a subject that still fits the text encoder's window is drawn."""
    inputs = {**good_inputs(), "PROMPT": texts(", ".join(["kite"] * 20))}      # 62 tokens with the style words
    assert infer(triton_server, "http", inputs).shape == (1,)


# --- security defaults ----------------------------------------------------------------------------

def test_server_binds_loopback_with_explicit_model_control(triton_server):
    with open(f"/proc/{triton_server.process.pid}/cmdline", "rb") as handle:
        argv = [a.decode() for a in handle.read().split(b"\0") if a]
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--model-control-mode=explicit"):
        assert flag in argv, flag
    assert not any("poll" in a for a in argv if a.startswith("--model-control-mode"))
    assert not any(a.startswith("--repository-poll-secs") for a in argv)
    assert any(a.startswith("--http-restricted-api=model-repository,") for a in argv)
    assert any(a.startswith("--grpc-restricted-protocol=model-repository,") for a in argv)


def _other_local_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))   # TEST-NET-1: no packet is sent for UDP connect
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_ports_are_not_reachable_on_another_address(triton_server):
    address = _other_local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to probe")
    for port in (triton_server.http_port, triton_server.grpc_port, triton_server.metrics_port):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, f"port {port} answers on {address}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) == 0


def test_clients_cannot_change_the_repository(triton_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
    http = httpclient.InferenceServerClient(triton_server.http_url)
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    for call in (lambda: http.load_model("evil"), lambda: http.unload_model("toonark"),
                 lambda: http.get_model_repository_index(),
                 lambda: http.register_system_shared_memory("x", "/x", 16)):
        with pytest.raises(InferenceServerException, match="This API is restricted, expecting header 'toonark-admin'"):
            call()
    for call in (lambda: grpc.load_model("evil"), lambda: grpc.unload_model("toonark")):
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            call()
    # Even with the launcher's key, explicit mode loads only what the repository holds.
    with pytest.raises(InferenceServerException, match="evil"):
        http.load_model("evil", headers={"toonark-admin": triton_server.admin_key})
    # Health, metadata and inference stay open.
    assert http.is_server_ready() and grpc.is_model_ready("toonark")
    assert http.get_model_metadata("toonark")["name"] == "toonark"


def test_oversized_requests_are_refused_by_the_caps_and_the_server_goes_on(triton_server):
    """The bundled 2.51 has no request-size flags (later releases do), so the request-size limits are the prompt
    policy's character caps and the build's max batch, checked in preprocess before any engine runs: a 256 KiB
    subject, a 256 KiB negative prompt and 64 prompts are refused at once and the next request is served."""
    from tritonclient.utils import InferenceServerException
    big = "otter " * (1 << 16)
    cases = [({"PROMPT": texts(big)}, f"subject is {len(big.strip())} characters long; keep it to 200 or fewer"),
             ({"NEGATIVE_PROMPT": texts(big)}, f"negative is {len(big.strip())} characters long; keep it to 200"),
             ({"PROMPT": texts(*["a cat"] * 64)}, "batch 64 is outside the built range 1..2")]
    for changes, message in cases:
        for protocol in ("http", "grpc"):
            start = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                infer(triton_server, protocol, {**good_inputs(), **changes})
            assert time.monotonic() - start < 2.0, (message, time.monotonic() - start)
            assert message in caught.value.message(), caught.value.message()
            assert status_of(caught.value) in ("400", "StatusCode.INVALID_ARGUMENT")
    assert infer(triton_server, "http", good_inputs()).shape == (1,)


def test_pickle_checkpoints_are_refused_by_the_export_cli(tiny_model, tmp_path, capsys):
    import shutil
    from toonark.scripts.export import main
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read: pickles can run code")
    assert main(["--model", str(model), "--out", str(tmp_path / "out"), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin is a pickle checkpoint; only safetensors weights are read" in err
    assert not (tmp_path / "out" / "onnx").exists()


# --- the launcher's own failure paths (no tritonserver needed) ------------------------------------------

def _tiny_repo(root):
    from toonark.serving.repository import model_config
    for name, kind in (("denoise", {"backend": "python"}), ("toonark", {"platform": "ensemble"})):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(model_config(name, [], [], **kind))
    return root


def test_watchdog_backs_off_and_gives_up_on_failing_reloads(tmp_path, monkeypatch):
    from toonark.serving import launcher
    server = launcher.TritonServer(_tiny_repo(tmp_path / "repo"))
    assert server.python_models == ["denoise"]
    server._log_file = open(tmp_path / "server.log", "w", encoding="utf-8")
    server.process = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(server, "stub_processes", lambda: {})
        attempts = []

        def failing_reload(models):
            attempts.append(list(models))
            raise RuntimeError("load failed:\n  no such model")

        monkeypatch.setattr(server, "reload_models", failing_reload)
        monkeypatch.setattr(server, "WATCHDOG_BACKOFF_S", 0.05)
        assert server.dead_models() == ["denoise"]
        assert server.check_and_recover() == ["denoise"]
        assert server.check_and_recover() == []   # backing off: no reload right away
        deadline = time.monotonic() + 10
        while len(attempts) < server.WATCHDOG_MAX_ATTEMPTS and time.monotonic() < deadline:
            server.check_and_recover()
            time.sleep(0.01)
        for _ in range(20):   # given up: no more reloads, no more records
            server.check_and_recover()
        assert len(attempts) == len(server.recoveries) == server.WATCHDOG_MAX_ATTEMPTS
        assert all(not r["ok"] and r["error"] == "load failed: no such model" for r in server.recoveries)
        server._log_file.flush()
        log = (tmp_path / "server.log").read_text()
        assert "toonark watchdog: stub of denoise died" in log and "giving up" in log
        monkeypatch.setattr(server, "stub_processes", lambda: {123: "denoise"})   # alive again: counter reset
        assert server.check_and_recover() == [] and server._failed_attempts == 0
    finally:
        server.process.kill()
        server.process.wait()
        server._log_file.close()


def test_a_failed_start_leaves_no_log_file_or_workdir(tmp_path, monkeypatch):
    from toonark.serving import launcher
    monkeypatch.setattr(launcher, "check_environment", lambda: None)
    monkeypatch.setattr(launcher, "triton_bundle", lambda: tmp_path)
    monkeypatch.setattr(launcher, "install_python_stub", lambda bundle: None)

    def no_popen(*args, **kwargs):
        raise OSError("exec format error")

    monkeypatch.setattr(launcher.subprocess, "Popen", no_popen)
    server = launcher.TritonServer(_tiny_repo(tmp_path / "repo"), log_path=tmp_path / "logs" / "server.log")
    with pytest.raises(OSError, match="exec format error"):
        server.start()
    assert server._log_file is None and server.workdir is not None and not server.workdir.exists()


def test_wait_ready_stops_when_cancelled(tmp_path, monkeypatch):
    import threading

    from toonark.serving import launcher
    server = launcher.TritonServer(_tiny_repo(tmp_path / "repo"))
    server.process = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(server, "is_ready", lambda: False)
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        start = time.monotonic()
        with pytest.raises(InterruptedError):
            server.wait_ready(60, cancel=cancel)
        assert time.monotonic() - start < 5
    finally:
        server.process.kill()
        server.process.wait()


def test_serve_forever_restores_signal_handlers_when_the_server_cannot_be_built(tmp_path):
    import signal

    from toonark.serving.launcher import ServerOptions, serve_forever
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(FileNotFoundError):
        serve_forever(ServerOptions(repo=tmp_path / "missing"))
    assert {sig: signal.getsignal(sig) for sig in before} == before
