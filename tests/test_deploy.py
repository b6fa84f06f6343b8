"""deploy/ (Dockerfile, compose, Kubernetes) checked without Docker or a cluster: hadolint, kubernetes-validate
against a pinned Kubernetes version, yamllint, and one source for ports, layout, model names and server flags:
the container runs the same launcher as `make serve` (scripts/serve.py -> serving.launcher), and every number a
manifest repeats (ports, grace period, the ensemble's name in the autoscaling rule) is compared here with the
launcher's and the repository generator's own values. The entry point itself runs for real on the CPU
(python layout, ort-cpu) against the pip-bundled tritonserver."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.33.0"   # pinned: the schemas kubernetes-validate checks the manifests against
# Kubernetes objects (validated); prometheus-adapter.yaml holds Helm values for the adapter, not an object.
K8S_OBJECTS = ("volume.yaml", "build-job.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the test extra installs it (`make setup`)")
    return str(path)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _server_defaults() -> dict:
    from toonark.serving.launcher import ServerOptions
    return {f.name: f.default for f in dataclasses.fields(ServerOptions) if f.default is not dataclasses.MISSING}


# --- linters ------------------------------------------------------------------------------------

def test_hadolint_passes_on_the_dockerfile():
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", "deploy/Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_strictly():
    result = _run([_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
                   *(str(K8S / name) for name in K8S_OBJECTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(K8S_OBJECTS), result.stdout
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(K8S_OBJECTS + ("prometheus-adapter.yaml",)), \
        "a new manifest must be added to K8S_OBJECTS (validated) or named here"


def test_yamllint_passes():
    result = _run([_tool("yamllint"), "--strict", "deploy", ".yamllint.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_install(tmp_path):
    # The check can fail: the same linter settings refuse a Dockerfile with an unpinned pip install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM nvcr.io/nvidia/tritonserver:24.10-py3\nRUN pip install numpy\n")
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(bad)])
    assert result.returncode != 0 and "DL3013" in result.stdout


# --- one source ---------------------------------------------------------------------------------

def _entrypoint() -> str:
    return (DEPLOY / "entrypoint.sh").read_text()


def test_container_serves_through_the_launcher_of_make_serve(tmp_path):
    entry = _entrypoint()
    makefile = (ROOT / "Makefile").read_text()
    # `make serve` and the container start the same CLI, so the tritonserver flags have one builder.
    assert re.search(r"^serve:.*\n\t\$\(PY\) scripts/serve\.py ", makefile, re.M)
    assert "exec python3 -m toonark.scripts.serve --repo \"$repo\" --host 0.0.0.0" in entry
    assert "tritonserver" not in re.sub(r"#.*", "", entry), "no hand-written tritonserver line in the container"
    docker = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_RELEASE\}-py3$", docker, re.M)
    assert re.search(r"^ARG TRITON_RELEASE=24\.10$", docker, re.M)   # Triton 2.51, as the pip bundle tested here
    assert "TOONARK_TRITONSERVER=/opt/tritonserver" in docker
    for name in ("make_repo", "build_engine"):
        assert f"python3 -m toonark.scripts.{name} " in entry
    # What those flags are (the launcher's builder, for the image's install): explicit model control, the
    # metrics on the metrics port, strict readiness for the probes; no Triton response cache (issue 18).
    from toonark.serving.launcher import TritonServer
    defaults = _server_defaults()
    repo = tmp_path / "repo"
    (repo / "toonark").mkdir(parents=True)
    (repo / "toonark" / "config.pbtxt").write_text('name: "toonark"\n')
    server = TritonServer(repo, host="0.0.0.0", http_port=defaults["http_port"], grpc_port=defaults["grpc_port"],
                          metrics_port=defaults["metrics_port"])   # its command on the image's paths; not started
    command = server.command(Path("/opt/tritonserver"))
    for flag in ("--model-control-mode=explicit", "--strict-readiness=true", "--exit-on-error=true",
                 f"--metrics-port={defaults['metrics_port']}", f"--http-port={defaults['http_port']}",
                 f"--grpc-port={defaults['grpc_port']}", "--backend-directory=/opt/tritonserver/backends"):
        assert flag in command, (flag, command)
    assert not any(arg.startswith("--cache-config") for arg in command)


def test_ports_in_every_deploy_file_are_the_launchers():
    defaults = _server_defaults()
    ports = {"http": defaults["http_port"], "grpc": defaults["grpc_port"], "metrics": defaults["metrics_port"]}
    docker = (DEPLOY / "Dockerfile").read_text()
    expose = re.search(r"^EXPOSE (.+)$", docker, re.M).group(1).split()
    assert sorted(map(int, expose)) == sorted(ports.values())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["toonark"]
    assert sorted(compose["ports"]) == sorted(f"{p}:{p}" for p in ports.values())
    pod = _load("deployment.yaml")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    service = _load("service.yaml")["spec"]["ports"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service} == {n: (p, n) for n, p in ports.items()}
    # The probes: Triton's health endpoints on the HTTP port; warm-up (entrypoint) asks the same port.
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["exec"]["command"] == ["/usr/local/bin/toonark-entrypoint", "warmup"]
    assert f"127.0.0.1:${{TOONARK_HTTP_PORT:-{ports['http']}}}" in _entrypoint()
    # The pod outlives the launcher's clean stop (tritonserver --exit-timeout-secs) before a SIGKILL.
    assert pod["spec"]["terminationGracePeriodSeconds"] > defaults["exit_timeout_s"] + 5


def test_layouts_and_model_names_are_the_generators(tiny_build):
    from toonark.specs import BuildInfo
    from toonark.serving.repository import ENSEMBLE, LAYOUTS, repo_configs
    entry = _entrypoint()
    branches = re.search(r'case "\$layout" in\n(.*?)\n  \*\)', entry, re.S).group(1)
    backend_of = {}
    for line in branches.splitlines():
        names, backend = re.match(r"\s*([\w|]+)\) backend=\$\{TOONARK_BACKEND:-([\w-]+)\}", line).groups()
        backend_of.update({name: backend for name in names.split("|")})
    assert sorted(backend_of) == sorted(LAYOUTS), "the entry point must offer exactly the generator's layouts"
    info = BuildInfo.read(tiny_build)
    models = {}
    for layout, backend in backend_of.items():   # each pair is one the generator accepts
        models[layout] = set(repo_configs(info, backend=backend, precision="fp16", layout=layout))
    default = re.search(r"layout=\$\{TOONARK_LAYOUT:-(\w+)\}", entry).group(1)
    assert default == "tensorrt_plan"
    docker = (DEPLOY / "Dockerfile").read_text()
    assert f"TOONARK_LAYOUT={default}" in docker
    for name in ("deployment.yaml", "build-job.yaml"):
        env = {e["name"]: e["value"] for e in _load(name)["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["TOONARK_LAYOUT"] in LAYOUTS
    # The autoscaling rule names the ensemble (requests) and sums queue time over the other models.
    rule = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"][0]
    labels = set(re.findall(r'model!?="(\w+)"', rule["seriesQuery"] + rule["metricsQuery"]))
    assert labels == {ENSEMBLE} and all(ENSEMBLE in names for names in models.values())
    hpa = _load("hpa.yaml")["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["scaleTargetRef"]["name"] == _load("deployment.yaml")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and _load("pdb.yaml")["spec"]["maxUnavailable"] == 1
    # Build and serving pods must land on the same GPU type (TensorRT plans are per GPU model).
    selectors = [_load(n)["spec"]["template"]["spec"]["nodeSelector"] for n in ("deployment.yaml", "build-job.yaml")]
    assert selectors[0] == selectors[1]
    volume = "/models"
    assert "TOONARK_BUILD=/models/build" in docker and "build_dir=${TOONARK_BUILD:-/models/build}" in entry
    for name in ("deployment.yaml", "build-job.yaml"):
        mounts = _load(name)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert volume in [m["mountPath"] for m in mounts]


# --- the entry point, for real, on the CPU --------------------------------------------------------

@pytest.mark.server
def test_entrypoint_builds_serves_and_warms_up_on_cpu(tiny_engines, tmp_path):
    from toonark.serving.launcher import free_port, triton_bundle
    ports = {name: str(free_port()) for name in ("HTTP", "GRPC", "METRICS")}
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", TOONARK_BUILD=str(tiny_engines),
               TOONARK_LAYOUT="python", TOONARK_BACKEND="ort-cpu", TOONARK_PRECISION="fp32",
               TOONARK_REPO=str(tmp_path / "repo"), TOONARK_TRITONSERVER=str(triton_bundle()), TMPDIR=str(tmp_path),
               **{f"TOONARK_{name}_PORT": port for name, port in ports.items()})
    entry = str(DEPLOY / "entrypoint.sh")
    bad = subprocess.run([entry, "build"], env=dict(env, TOONARK_BUILD=str(tmp_path / "nothing")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "has no pipeline/toonark.json" in bad.stderr
    built = subprocess.run([entry, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "repo" / "toonark" / "config.pbtxt").is_file()
    # Not started yet: warm-up fails, as the startupProbe's first tries do.
    early = subprocess.run([entry, "warmup"], env=env, capture_output=True, text=True, timeout=120)
    assert early.returncode != 0
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([entry, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['HTTP']}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the entry point's server was not ready in 300 s:\n" + (tmp_path / "serve.log").read_text())
        warm = subprocess.run([entry, "warmup"], env=env, capture_output=True, text=True, timeout=300)
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert (tmp_path / "toonark-warmup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['METRICS']}/metrics", timeout=5) as r:
            assert b'nv_inference_request_success{model="toonark"' in r.read()
    finally:
        server.send_signal(signal.SIGTERM)   # the launcher stops tritonserver cleanly (Kubernetes' SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            code = None
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
