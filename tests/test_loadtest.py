"""scripts/loadtest.py and its library against the real session server (server_fixtures.py)."""
from __future__ import annotations

import json
import time

import pytest
from server_fixtures import triton_repo, triton_server  # noqa: F401  (pytest fixtures)

from toonark.serving.loadtest import REPORT_KEYS, LoadConfig, format_table, run_load

pytestmark = pytest.mark.server


def test_small_load_has_no_errors_and_an_exact_count(triton_server):
    config = LoadConfig(http_url=triton_server.http_url, grpc_url=triton_server.grpc_url, clients=4,
                        requests_per_client=10, steps=1, width=64, height=64, max_seconds=120)
    report = run_load(config)
    print("\n" + format_table(report))
    assert set(REPORT_KEYS) <= set(report)
    assert report["errors"] == 0, report["errors_by_message"]
    assert report["requests"] == report["ok"] == report["planned"] == 40
    assert report["stopped_by"] == "count"
    assert {p: r["requests"] for p, r in report["by_protocol"].items()} == {"http": 20, "grpc": 20}
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["throughput_rps"] > 0


def test_the_deadline_stops_the_run(triton_server):
    config = LoadConfig(http_url=triton_server.http_url, grpc_url=triton_server.grpc_url, clients=2,
                        requests_per_client=100_000, steps=1, max_seconds=1.0, request_timeout_s=30)
    start = time.monotonic()
    report = run_load(config)
    assert time.monotonic() - start < 1.0 + 10   # the deadline plus at most one request in flight
    assert report["stopped_by"] == "time"
    assert 0 < report["requests"] < report["planned"]
    assert report["requests"] == report["ok"] + report["errors"]


def test_errors_are_grouped_by_message(triton_server):
    config = LoadConfig(http_url=triton_server.http_url, grpc_url=triton_server.grpc_url, clients=2,
                        requests_per_client=2, width=100)
    report = run_load(config)
    assert report["ok"] == 0 and report["errors"] == 4
    (message, count), = report["errors_by_message"].items()
    assert count == 4 and "width 100 must be a multiple of 64" in message and "request id" not in message


def test_cli_writes_the_json_report(triton_server, tmp_path, capsys):
    from toonark.scripts.loadtest import main
    out = tmp_path / "reports" / "load.json"
    assert main(["--http-url", triton_server.http_url, "--grpc-url", triton_server.grpc_url, "--clients", "2",
                 "--requests", "2", "--steps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 4 and report["errors"] == 0
    assert [p.name for p in out.parent.iterdir()] == ["load.json"]   # atomic: no temporary left
    printed = capsys.readouterr().out
    assert "p95 ms" in printed and "throughput" in printed


def test_cli_needs_a_server(capsys):
    from toonark.scripts.loadtest import main
    assert main(["--clients", "1"]) == 1
    assert "give --http-url and/or --grpc-url" in capsys.readouterr().err


def test_config_is_checked():
    with pytest.raises(ValueError, match="no --grpc-url"):
        LoadConfig(http_url="127.0.0.1:1", clients=1)
    with pytest.raises(ValueError, match="at least 1 client"):
        LoadConfig(http_url="127.0.0.1:1", protocols=("http",), clients=0)


def test_an_explicit_protocol_without_its_url_is_refused(capsys):
    from toonark.scripts.loadtest import main
    assert main(["--http-url", "127.0.0.1:1", "--protocol", "grpc", "--clients", "1"]) == 1
    err = capsys.readouterr().err
    assert "no --grpc-url" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="protocol list is empty.*--http-url and/or --grpc-url"):
        LoadConfig(http_url="127.0.0.1:1", protocols=(), clients=1)


def test_unique_subjects_pass_the_kid_safety_rules():
    """The load tester's unique subjects spell their number in syllables: "number 1488" was refused as a hate code
    in a kill-each run (a lost request that was no server fault); every name a default run (8 x 200 requests) can
    send passes and is unique."""
    from toonark.prompts import PromptPolicy
    from toonark.serving.loadtest import LoadConfig, pet_name
    policy, prompt = PromptPolicy.load(), LoadConfig.__dataclass_fields__["prompt"].default
    with pytest.raises(Exception, match="hate"):
        policy.compose(f"{prompt} number 1488")
    # Every name a default run can send (its seeds: clients x requests_per_client); a soak's seeds go further
    # (seed_base), so their spelling is what keeps them clear of number codes. 5,000 names read here were 76 s.
    defaults = LoadConfig.__dataclass_fields__
    names = [pet_name(n) for n in range(defaults["clients"].default * defaults["requests_per_client"].default)]
    assert len(set(names)) == len(names) and pet_name(1488) == "kopevuvu"
    policy.compose(f"{prompt} named {names[0]}")
    # compose checks the subject with the shipped filter; the names go through it in two processes (11-30 ms each by host)
    from toonark.prompt_safety.evaluate import shipped_readings
    refused = [(n, r) for n, r in zip(names, shipped_readings([f"{prompt} named {n}" for n in names])) if r]
    assert not refused, refused[:5]
