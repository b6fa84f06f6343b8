"""`make setup GPU=1` pieces that run without a GPU: the check's refusals (no driver, CPU onnxruntime) and the
wheel parts an offline GPU machine gets (scripts/stage_wheels.py: cut, join, verify). The passing side of the
check needs a GPU (benchmarks/NOTES.md, "Offline GPU machines")."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toonark.scripts import gpu_check, stage_wheels

ROOT = Path(__file__).resolve().parent.parent


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")
def test_gpu_check_without_a_driver_stops_before_installing(tmp_path):
    report = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--driver-only", "--json",
                             str(report)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "no NVIDIA driver on this machine" in result.stderr and "use `make setup` (CPU build)" in result.stderr
    assert json.loads(report.read_text())["ok"] is False
    # The Makefile asks this before anything else: no venv is touched, nothing downloaded.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}   # under make test
    dry = subprocess.run(["make", "--no-print-directory", "-n", "setup", "GPU=1", "VENV=/nonexistent-venv"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert dry.stdout.splitlines()[0].endswith("scripts/gpu_check.py --driver-only")


def test_cpu_onnxruntime_is_refused_with_the_fix():
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here is the GPU build")
    with pytest.raises(gpu_check.CheckFailed, match="has no CUDAExecutionProvider") as err:
        gpu_check.check_onnxruntime()
    assert "requirements-gpu.txt" in str(err.value)


def test_gpu_pair_shares_one_cuda_major():
    pins = stage_wheels.gpu_requirements()
    assert set(pins) == {"onnxruntime-gpu", "torch"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={pins["torch"]}"' in pyproject, "GPU torch must be the version pyproject pins"


def _wheels(tmp_path: Path, sizes: dict[str, int]) -> dict[str, Path]:
    folder = tmp_path / "wheels"
    folder.mkdir()
    out = {}
    for name, size in sizes.items():
        path = folder / name
        path.write_bytes(os.urandom(size))
        out[name] = path
    return out


def test_parts_fit_the_limit_and_join_back_bit_exact(tmp_path):
    wheels = _wheels(tmp_path, {"a-1-py3-none-any.whl": 10, "b-1-py3-none-any.whl": 25, "big-1-py3-none-any.whl": 95})
    parts = stage_wheels.write_parts(wheels, tmp_path / "stage", part_bytes=40)
    sizes = [sum(f.stat().st_size for f in (tmp_path / "stage" / f"p{i}").iterdir() if f.name != "manifest.json")
             for i in range(len(parts))]
    assert len(parts) == 4 and max(sizes) <= 40 and sum(sizes) == 130
    # Small wheels stay whole: both are in the first part.
    assert sorted(w for w, _, n in parts[0] if n == wheels[w].stat().st_size) == ["a-1-py3-none-any.whl",
                                                                                   "b-1-py3-none-any.whl"]
    out = tmp_path / "joined"
    stage_wheels.join(sorted((tmp_path / "stage").iterdir()), out, partial=False)
    for name, path in wheels.items():
        assert (out / name).read_bytes() == path.read_bytes()


def test_join_names_missing_parts_and_rejects_a_damaged_one(tmp_path):
    wheels = _wheels(tmp_path, {"a-1-py3-none-any.whl": 10, "big-1-py3-none-any.whl": 95})
    stage_wheels.write_parts(wheels, tmp_path / "stage", part_bytes=40)
    parts = sorted((tmp_path / "stage").iterdir())
    with pytest.raises(FileNotFoundError, match="parts p2 of 3 are missing"):
        stage_wheels.join([p for p in parts if p.name != "p2"], tmp_path / "out", partial=False)
    assert not (tmp_path / "out").exists()   # refused before anything was written
    stage_wheels.join([p for p in parts if p.name != "p2"], tmp_path / "out", partial=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-1-py3-none-any.whl"]
    chunk = next(f for f in parts[1].iterdir() if f.name.startswith("big-"))
    chunk.write_bytes(chunk.read_bytes()[:-1])   # cut short in transit
    with pytest.raises(ValueError, match="does not match its sha256"):
        stage_wheels.join(parts, tmp_path / "out2", partial=False)
    assert [p.name for p in (tmp_path / "out2").iterdir()] == ["a-1-py3-none-any.whl"]   # no half-written file


def test_gpu_kit_carries_the_built_classifier_and_refuses_a_stale_one(tmp_path, monkeypatch):
    """The offline box cannot build the prompt classifier's graph (no base model, no peft) and the graph is too
    large for one call, so the gpu kit's parts carry the one `make setup` built here, checked by the sidecar's
    sha256; `join --site` unpacks the wheels only."""
    import hashlib
    import json
    import zipfile

    from toonark.prompt_safety import classifier
    data = tmp_path / "data"
    data.mkdir()
    graph = b"graph bytes"
    (data / classifier.MODEL_NAME).write_bytes(b"an older build")
    (data / classifier.TOKENIZER_NAME).write_text("{}")
    (data / classifier.SIDECAR_NAME).write_text(json.dumps({"onnx_sha256": hashlib.sha256(graph).hexdigest()}))
    monkeypatch.setattr(classifier, "data_dir", lambda: data)
    with pytest.raises(RuntimeError, match=r"safety_classifier.onnx: not the sidecar build; run `make setup` here"):
        stage_wheels.built_classifier()
    (data / classifier.MODEL_NAME).write_bytes(graph)
    files = stage_wheels.built_classifier()
    assert sorted(files) == ["toonark-data/safety_classifier.onnx", "toonark-data/safety_tokenizer.json"]
    wheel = tmp_path / "w-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("w/__init__.py", "")
    stage_wheels.write_parts({wheel.name: wheel, **files}, tmp_path / "stage", part_bytes=1 << 20)
    stage_wheels.join(sorted((tmp_path / "stage").iterdir()), tmp_path / "out", partial=False, site=tmp_path / "site")
    assert (tmp_path / "out" / "toonark-data" / classifier.MODEL_NAME).read_bytes() == graph
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == [".joined", "w"]
    # `make setup GPU=1 WHEELS=` places it, and refuses a kit staged from another round (another sidecar).
    (data / classifier.MODEL_NAME).write_bytes(b"an older build")
    (tmp_path / "out" / "toonark-data" / classifier.MODEL_NAME).write_bytes(b"a graph from another round")
    with pytest.raises(RuntimeError, match=r"out/toonark-data/safety_classifier.onnx: not the sidecar build; "
                                           r"stage the kit again from this commit"):
        stage_wheels.place(tmp_path / "out")
    assert (data / classifier.MODEL_NAME).read_bytes() == b"an older build"
    (tmp_path / "out" / "toonark-data" / classifier.MODEL_NAME).write_bytes(graph)
    assert stage_wheels.main(["place", "--wheels", str(tmp_path / "out")]) == 0
    assert (data / classifier.MODEL_NAME).read_bytes() == graph
    assert sorted(p.name for p in data.iterdir()) == sorted([classifier.MODEL_NAME, classifier.TOKENIZER_NAME,
                                                             classifier.SIDECAR_NAME])
