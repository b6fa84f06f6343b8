"""Launch the tritonserver bundled in nvidia-pytriton on this machine (CPU, loopback by default).

Follows /work/shared/triton-cpu-recipe.md section 2: the Python-backend stub matching this
interpreter is copied into the bundle's backends/python, the venv's bin/ goes first on PATH
(so the stub runs this venv's python3 and site-packages, where toonark is installed),
LD_LIBRARY_PATH starts with this interpreter's LIBDIR (the matching libpython), and every
server gets its own shm-region prefix, removed again by `stop()`.

    with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002) as server:
        server.wait_ready(timeout=120)
        ...
"""
from __future__ import annotations

import collections
import contextlib
import filecmp
import glob
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from toonark import api
from toonark.serving.client import one_line
from toonark.api import ENSEMBLE

# APIs a client may not use without the launcher's per-server key: model load/unload/index, shared-memory
# registration (the server would read client-named memory), trace and log settings.
ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "toonark-admin"


def check_environment() -> None:
    """Fail early on what breaks the Python backend silently (recipe gotchas 4 and 5)."""
    import numpy
    major = int(numpy.__version__.split(".")[0])
    if major >= 2:
        raise RuntimeError(
            f"numpy {numpy.__version__} is installed in {sys.prefix}; the Triton Python backend returns empty "
            f"tensors with numpy >= 2 (recipe gotcha 4). Install numpy<2 (`pip install 'numpy<2'`, pinned by "
            f"`make setup`).")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise RuntimeError(f"{sys.executable} was built without --enable-shared; the Python backend stub needs "
                           f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so (pyenv: "
                           f"PYTHON_CONFIGURE_OPTS=--enable-shared)")


# A tritonserver install to use instead of pytriton's bundle: the NGC image's /opt/tritonserver (deploy/Dockerfile).
TRITONSERVER_ENV = "TOONARK_TRITONSERVER"


def triton_bundle() -> Path:
    """The tritonserver folder: $TOONARK_TRITONSERVER when set, else the one inside the nvidia-pytriton wheel."""
    home = os.environ.get(TRITONSERVER_ENV)
    if home:
        if not (Path(home) / "bin" / "tritonserver").is_file():
            raise RuntimeError(f"{TRITONSERVER_ENV}={home} has no bin/tritonserver; point it at a tritonserver install "
                               f"(NGC image: /opt/tritonserver) or unset it to use nvidia-pytriton's")
        return Path(home)
    # Located, not imported: importing pytriton needs pyzmq, which a GPU image may lack.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed; it bundles tritonserver. Run `make setup`.")
    bundle = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (bundle / "bin" / "tritonserver").is_file():
        raise RuntimeError(f"{bundle}/bin/tritonserver is missing; reinstall nvidia-pytriton==0.7.0 (`make setup`)")
    return bundle


def install_python_stub(bundle: Path) -> Path:
    """Copy python_backend_stubs/<X.Y>/triton_python_backend_stub for this interpreter into
    backends/python (recipe gotchas 1 and 2). Idempotent; returns the installed path."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    source = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = bundle / "backends" / "python" / "triton_python_backend_stub"
    if not source.is_file():
        if not (bundle / "python_backend_stubs").is_dir() and target.is_file():
            return target   # a tritonserver install (NGC image) whose stub is built for its own python3
        raise RuntimeError(f"the Triton bundle has no Python backend stub for Python {version} ({source}); "
                           f"use a Python the bundle supports (3.8-3.13)")
    if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
        tmp = target.with_name(f".stub.tmp-{os.getpid()}")
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def repo_models(repo: Path) -> list[str]:
    """Every model folder (one with a config.pbtxt) in a model repository."""
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def python_models(repo: Path) -> list[str]:
    """The model folders served by the Python backend (each runs in its own stub process)."""
    out = []
    for config in Path(repo).glob("*/config.pbtxt"):
        lines = (line.split("#", 1)[0].replace(" ", "") for line in config.read_text().splitlines())
        if 'backend:"python"' in lines:
            out.append(config.parent.name)
    return sorted(out)


def instance_count(repo: Path, model: str) -> int:
    """Instances (stub processes) a Python model runs: the sum of its instance_group counts (default 1)."""
    import re
    text = (Path(repo) / model / "config.pbtxt").read_text()
    groups = re.findall(r"instance_group\s*\[(.*?)\]", text, re.S)
    counts = [int(c) for group in groups for c in re.findall(r"count\s*:\s*(\d+)", group)]
    return sum(counts) if counts else 1


@dataclass
class ServerOptions:
    repo: Path
    host: str = api.DEFAULT_HOST
    http_port: int = api.DEFAULT_HTTP_PORT
    grpc_port: int = api.DEFAULT_GRPC_PORT
    metrics_port: int = api.DEFAULT_METRICS_PORT
    log_verbose: int = 0
    exit_timeout_s: int = 10
    extra_args: tuple[str, ...] = ()
    watchdog: bool = True
    idle_unload_s: float = 0.0


class TritonServer:
    """One tritonserver process. Use as a context manager, or call start()/stop()."""

    def __init__(self, repo: Path, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_path: Path | None = None,
                 log_verbose: int = 0, exit_timeout_s: int = 10, extra_args: tuple[str, ...] = (),
                 admin_key: str | None = None, idle_unload_s: float = 0.0):
        self.repo = Path(repo).resolve()
        if idle_unload_s < 0:
            raise ValueError(f"idle unload must be >= 0 seconds (0: never), got {idle_unload_s}")
        # Engine models free their sessions after this many idle seconds and load again on the next request
        # (runtime.IdleEngine, read by the stubs from the environment they inherit).
        self.idle_unload_s = idle_unload_s
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} does not exist; run `make repo OUT=<build>` first")
        self.models = repo_models(self.repo)
        self.python_models = python_models(self.repo)
        self.instances = {model: instance_count(self.repo, model) for model in self.python_models}
        if not self.models:
            raise ValueError(f"{self.repo} holds no model folder with a config.pbtxt; regenerate it with `make repo`")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.shm_prefix = f"toonark_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self._log_path = Path(log_path) if log_path else None
        self._log_file = None
        self._log_lock = threading.Lock()
        self._stopping = False      # stop() was called (guarded by _log_lock, as _reader_done)
        self._reader_done = False   # the reader saw the end of the server's output
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._reader: threading.Thread | None = None
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.started_at = 0.0
        self.ready_after_s: float | None = None
        # Model-repository (load/unload/index), shared-memory, trace and logging APIs need this header value
        # (tritonserver --http-restricted-api / --grpc-restricted-protocol); only this launcher knows it.
        self.admin_key = admin_key or secrets.token_urlsafe(18)
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self.recoveries: list[dict] = []
        # Failed reloads back off (WATCHDOG_BACKOFF_S, doubling) and stop after WATCHDOG_MAX_ATTEMPTS in a row.
        self._failed_attempts = 0
        self._next_attempt_at = 0.0

    # -- addresses -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    # -- process -----------------------------------------------------------------------------
    def command(self, bundle: Path) -> list[str]:
        args = [str(bundle / "bin" / "tritonserver"),
                f"--model-repository={self.repo}",
                f"--backend-directory={bundle / 'backends'}",
                # No --cache-config: no model uses Triton's response cache (it stores failures, recipe gotcha 6);
                # the prompt-embedding cache is toonark's own, in preprocess (toonark.embedding_cache).
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--model-control-mode=explicit",
                "--exit-on-error=true",
                "--strict-readiness=true",
                f"--exit-timeout-secs={self.exit_timeout_s}",
                f"--log-verbose={self.log_verbose}"]
        admin = f"{ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}"
        args += [f"--http-restricted-api={admin}", f"--grpc-restricted-protocol={admin}"]
        args += [f"--load-model={name}" for name in self.models]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)   # the venv's bin/, not the resolved interpreter's
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        from toonark.triton_model_repo.runtime import IDLE_UNLOAD_ENV
        env[IDLE_UNLOAD_ENV] = f"{self.idle_unload_s:g}"
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started; create a new one")
        check_environment()
        from toonark.serving.repository import check_repo_runtime
        check_repo_runtime(self.repo)   # plans from another TensorRT / GPU: refused here, with the fix
        bundle = triton_bundle()
        install_python_stub(bundle)
        try:
            if self._log_path:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log_file = open(self._log_path, "w", encoding="utf-8")
            self.started_at = time.monotonic()
            # An empty private cwd: the Python-backend stubs put their cwd first on sys.path, so a source
            # checkout's ./toonark, or the repository's own `toonark` ensemble folder, would shadow the package.
            self.workdir = Path(tempfile.mkdtemp(prefix="toonark-triton-"))
            self.process = subprocess.Popen(self.command(bundle), env=self.environment(), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                            errors="replace", start_new_session=True, cwd=self.workdir)
            self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
            self._reader.start()
        except BaseException:   # no log file, work folder or process left behind
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._log_line(line)
        with self._log_lock:
            self._reader_done = True
            if self._stopping:   # stop() came first and left the log file to this reader
                self._close_log_locked()

    def _close_log_locked(self) -> None:
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def _log_line(self, line: str) -> None:
        """One line to the tail and the log file (the server's output and the watchdog's messages)."""
        with self._log_lock:
            self._tail.append(line.rstrip("\n"))
            if self._log_file:
                self._log_file.write(line if line.endswith("\n") else line + "\n")
                self._log_file.flush()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._tail)[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def model_ready(self, model: str = ENSEMBLE) -> bool:
        """GET /v2/models/<model>/ready (the ensemble by default): whether requests can be served now."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _metrics_listening(self) -> bool:
        try:
            with socket.create_connection((self._client_host, self.metrics_port), timeout=1):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout: float = 120.0, cancel: threading.Event | None = None) -> float:
        """Poll /v2/health/ready; return seconds since start. Raises RuntimeError with the server's
        log tail when the process exits first, TimeoutError when it is not ready in time, and
        InterruptedError as soon as `cancel` is set (Ctrl-C while waiting)."""
        if self.process is None:
            raise RuntimeError("call start() before wait_ready()")
        cancel = cancel or threading.Event()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancel.is_set():
                raise InterruptedError("stopped while waiting for tritonserver to be ready")
            code = self.process.poll()
            if code is not None:
                if self._reader:
                    self._reader.join(timeout=2)
                raise RuntimeError(f"tritonserver exited with code {code} before it was ready "
                                   f"(repo {self.repo}); last log lines:\n{self.log_tail()}")
            # Triton answers /v2/health/ready a moment before its metrics port listens: a scrape right after
            # ready was refused once in a fresh clone's make test (test_serving_features).
            if self.is_ready() and self._metrics_listening():
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            cancel.wait(0.1)
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s (repo {self.repo}); "
                           f"last log lines:\n{self.log_tail()}")

    # -- watchdog: a Python-backend stub that died is not restarted by Triton 2.51 (recipe gotcha 8) ------
    def stub_processes(self) -> dict[int, str]:
        """{pid: model} of the live Python-backend stubs of this server (its children in /proc)."""
        if self.process is None:
            return {}
        stubs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[1]) != self.process.pid or fields[0] in ("Z", "X"):
                    continue
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 1:
                stubs[int(entry.name)] = Path(os.fsdecode(argv[1])).parent.parent.name   # <repo>/<model>/1/model.py
        return stubs

    def dead_models(self) -> list[str]:
        """Python-backend models of the repository with fewer live stubs than instances."""
        alive = collections.Counter(self.stub_processes().values())
        return [model for model in self.python_models if alive[model] < self.instances.get(model, 1)]

    def _admin_client(self):
        import tritonclient.http as httpclient
        return httpclient.InferenceServerClient(self.http_url, connection_timeout=120, network_timeout=120)

    def reload_models(self, models: list[str], timeout: float = 120.0) -> float:
        """Load `models` again with their config plus a new `reload_generation` parameter. A changed config
        makes Triton 2.51 start new instances (new stub processes) and swap them in when ready, while the
        ensemble stays loaded: requests in the gap fail fast with "Stub process ... is not healthy", which
        the client retries. (Unload + load, the first watchdog's way, also took the ensemble down: every
        request then failed with "Request for unknown model: 'toonark' has no available versions" for
        2-4 s.) Falls back to unload + load if the override load fails. Returns the seconds it took."""
        import json
        started = time.monotonic()
        headers = {ADMIN_HEADER: self.admin_key}
        client = self._admin_client()
        old_pids = [pid for pid, name in self.stub_processes().items() if name in models]
        try:
            for model in models:
                try:
                    config = client.get_model_config(model, headers=headers)
                    config.setdefault("parameters", {})["reload_generation"] = {"string_value": uuid.uuid4().hex}
                    client.load_model(model, headers=headers, config=json.dumps(config))
                except Exception as err:   # noqa: BLE001 - the old way still heals the model
                    self._log_line(f"toonark watchdog: reload of {model} with a new config failed "
                                   f"({one_line(err)}); unloading and loading it")
                    client.unload_model(model, headers=headers)
                    client.load_model(model, headers=headers)
                    if ENSEMBLE in self.models and ENSEMBLE not in models:
                        client.load_model(ENSEMBLE, headers=headers)
            waiting = [ENSEMBLE] if ENSEMBLE in self.models else list(models)
            deadline = time.monotonic() + timeout
            while not all(client.is_model_ready(m) for m in waiting) or self.dead_models_of(models):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"models {models} were not ready {timeout:.0f} s after their reload")
                time.sleep(0.05)
        finally:
            client.close()
        self._retire(old_pids)
        return time.monotonic() - started

    RETIRE_GRACE_S = 5.0   # requests the old instances took before the swap finish first

    def _retire(self, pids: list[int]) -> None:
        """Stop the surviving processes of the replaced instances. With more than one instance, the old
        model never finishes unloading (its dead instance keeps it UNLOADING, recipe gotcha 8), so its live
        instances would stay forever (measured: +460 MiB after six kills with 2 instances each)."""
        def retire():
            alive = self.stub_processes()
            stale = [pid for pid in pids if pid in alive]
            for pid in stale:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if stale:
                self._log_line(f"toonark watchdog: stopped {len(stale)} process(es) of the replaced instances")

        if pids:
            timer = threading.Timer(self.RETIRE_GRACE_S, retire)
            timer.daemon = True
            timer.start()

    def dead_models_of(self, models: list[str]) -> list[str]:
        dead = set(self.dead_models())
        return [m for m in models if m in dead]

    WATCHDOG_BACKOFF_S = 2.0      # wait after the first failed reload; doubles per failure, at most 60 s
    WATCHDOG_MAX_ATTEMPTS = 5     # failed reloads in a row before the watchdog gives up (and says so)

    def check_and_recover(self) -> list[str]:
        """One watchdog pass: reload the models whose stub died; returns them (empty when all are alive,
        while backing off after a failed reload, and once it gave up)."""
        dead = self.dead_models()
        if not dead:
            self._failed_attempts = 0
            return []
        if self._failed_attempts >= self.WATCHDOG_MAX_ATTEMPTS or time.monotonic() < self._next_attempt_at:
            return []
        record = {"models": dead, "at": time.time()}
        try:
            record["seconds"] = round(self.reload_models(dead), 2)
            record["ok"] = True
            record["done_at"] = time.time()
            self._failed_attempts = 0
        except Exception as err:   # noqa: BLE001 - keep watching; the record and the log say what failed
            record.update(ok=False, error=one_line(err))
            self._failed_attempts += 1
            self._next_attempt_at = time.monotonic() + min(60.0, self.WATCHDOG_BACKOFF_S * 2 ** (self._failed_attempts - 1))
        self.recoveries.append(record)
        if record["ok"]:
            outcome = f"took {record['seconds']} s"
        else:
            outcome = f"failed ({self._failed_attempts}/{self.WATCHDOG_MAX_ATTEMPTS}): {record['error']}"
            if self._failed_attempts >= self.WATCHDOG_MAX_ATTEMPTS:
                outcome += "; giving up, restart the server"
        self._log_line(f"toonark watchdog: stub of {', '.join(dead)} died; reload {outcome}")
        return dead

    def start_watchdog(self, interval_s: float = 0.25) -> None:
        """Watch the stubs every `interval_s` from a daemon thread (after wait_ready)."""
        if self._watchdog is not None:
            return

        def loop():
            while not self._watchdog_stop.wait(interval_s):
                if self.process is None or self.process.poll() is not None:
                    self.reap_stubs()
                    return
                with contextlib.suppress(Exception):
                    self.check_and_recover()

        self._watchdog = threading.Thread(target=loop, name="tritonserver-watchdog", daemon=True)
        self._watchdog.start()

    def reap_stubs(self) -> None:
        """Once tritonserver has exited, kill the stubs it left behind. A stub started after the server began
        serving (a reload) inherits the server's open client connections, and one left running after the server
        died keeps them open: a request in flight there waits for its full timeout instead of failing at once
        and going to another server (a soak run lost a request that way: 120 s on the aborted primary's port)."""
        if self.process is not None and self.process.poll() is not None:
            # Only ours: the stubs are in the server's session (same process group id).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL of the process group after `timeout`; remove this server's shm regions."""
        code = None
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        if self.process is not None:
            timeout = self.exit_timeout_s + 5 if timeout is None else timeout
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
            self.reap_stubs()
            code = self.process.returncode
            if self._reader:
                self._reader.join(timeout=5)
        # The reader writes to the log file until the server's output ends: close it only after the reader
        # (a reader still running closes it itself when the output ends).
        with self._log_lock:
            self._stopping = True
            if self._reader is None or self._reader_done:
                self._close_log_locked()
        self.remove_shm()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def remove_shm(self) -> list[str]:
        removed = []
        for path in glob.glob(os.path.join("/dev/shm", glob.escape(self.shm_prefix) + "*")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(options: ServerOptions, ready_timeout: float = 300.0, out=sys.stdout) -> int:
    """Run a server in the foreground until Ctrl-C / SIGTERM; stop it cleanly. Returns the exit code."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    previous = {}
    server = None
    try:
        server = TritonServer(options.repo, host=options.host, http_port=options.http_port,
                              grpc_port=options.grpc_port, metrics_port=options.metrics_port,
                              log_verbose=options.log_verbose, exit_timeout_s=options.exit_timeout_s,
                              extra_args=options.extra_args, idle_unload_s=options.idle_unload_s)
        # Both set explicitly: a shell starting this in the background leaves SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        server.start()
        try:
            took = server.wait_ready(ready_timeout, cancel=stopping)
        except InterruptedError:
            return 0
        if options.watchdog:
            server.start_watchdog()
        print(f"ready in {took:.1f} s: models {', '.join(server.models)}\n"
              f"  HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}\n"
              f"  try: python scripts/generate.py --url {server.http_url} --prompt 'a happy robot' --out robot.png\n"
              f"Ctrl-C stops the server.", file=out, flush=True)
        while not stopping.is_set():
            if server.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {server.process.returncode}; last log lines:\n"
                                   f"{server.log_tail()}")
            stopping.wait(0.5)
            while server.recoveries:
                record = server.recoveries.pop(0)
                print(f"watchdog: stub of {', '.join(record['models'])} died; "
                      + (f"reloaded in {record['seconds']} s" if record["ok"] else f"reload failed: {record['error']}"),
                      file=out, flush=True)
        return 0
    finally:
        if server is not None:
            print("stopping tritonserver ...", file=out, flush=True)
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
