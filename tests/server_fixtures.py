"""One real tritonserver per test session, serving the tiny build's generated repository.

Import the fixtures into a test module (`from server_fixtures import triton_repo, triton_server`);
they build on conftest's `tiny_engines`. The server binds 127.0.0.1 on free ports, uses its own
shm-region prefix and is stopped (shm removed) at the end of the session, also after failures.
"""
from __future__ import annotations

from pathlib import Path

import pytest

READY_TIMEOUT_S = 300   # 2 loaded cores: 6 Python stubs importing onnxruntime take a while


@pytest.fixture(scope="session")
def triton_repo(tiny_engines) -> Path:
    from toonark.serving.repository import write_repo
    return write_repo(tiny_engines, backend="ort-cpu", precision="fp32", layout="python", intra_op_threads=1)


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    from toonark.serving.launcher import TritonServer
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(triton_repo, log_path=log)
    try:
        server.start()
        ready_s = server.wait_ready(READY_TIMEOUT_S)
        server.start_watchdog()   # a stub that dies is reloaded (server.py; tests/test_faults.py)
        print(f"\ntritonserver ready in {ready_s:.1f} s (HTTP {server.http_url}, gRPC {server.grpc_url}; log {log})")
        yield server
    finally:
        server.stop()
        leftover = server.remove_shm()
        assert not leftover, f"shm regions left behind: {leftover}"
