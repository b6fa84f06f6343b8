"""engine.json: what an engine was built from and with, and the checks that refuse a stale one.

Every engine folder (OUT/engines/<backend>-<precision>/<submodel>/) holds the engine file and
an engine.json written after it. `load_engine` trusts an engine only when that record still
matches: the engine file's hash, the source ONNX's hash, and, for TensorRT, the library
version and GPU the plan was built for.
"""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

from toonark.engines.backends import EngineError, backend_for
from toonark.files import read_json, sha256_onnx
from toonark.layout import BuildLayout

ENGINE_JSON = "engine.json"
# Bumped when the layout of engine.json or of the engine folder changes.
METADATA_FORMAT = 1


def make_command(build_dir: Path, backend: str, precision: str) -> str:
    return f"make engine OUT={build_dir} BACKEND={backend} PRECISION={precision}"


def engine_file_name(backend: str) -> str:
    return backend_for(backend).engine_file


def engine_files(engine_dir: Path, backend: str) -> list[Path]:
    """The engine file plus, for ORT, its external-data file when there is one."""
    return backend_for(backend).engine_files(engine_dir)


def engine_hash(engine_dir: Path, backend: str) -> str:
    return backend_for(backend).engine_hash(engine_dir)


def toonark_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("toonark")
    except PackageNotFoundError:
        return "unknown"


def library_info(backend: str) -> dict:
    """Name and version of the runtime that builds and runs this backend's engines."""
    return backend_for(backend).library_info()


def device_name(backend: str, device_id: int = 0) -> str:
    """The CPU family for ort-cpu (backends.cpu_family: its saved layouts are per family), else the CUDA device's
    name (what a TensorRT plan is tied to)."""
    return backend_for(backend).device_name(device_id)


def profile_json(profile: dict) -> dict:
    return {name: {"min": list(mn), "opt": list(opt), "max": list(mx)} for name, (mn, opt, mx) in profile.items()}


def make_metadata(*, submodel: str, backend: str, precision: str, source_onnx: Path, engine_dir: Path,
                  profile: dict, limits, settings: dict, io: dict, build_seconds: float, build_dir: Path,
                  source_sha256: str | None = None) -> dict:
    """The engine.json record (engine_dir must already hold the finished engine file). source_sha256:
    sha256_onnx(source_onnx) when the caller has it already (hashing a UNet takes seconds)."""
    files = engine_files(engine_dir, backend)
    return {
        "format": METADATA_FORMAT,
        "submodel": submodel,
        "backend": backend,
        "precision": precision,
        "engine_file": files[0].name,
        "engine_files": [p.name for p in files],
        "engine_sha256": engine_hash(engine_dir, backend),
        "engine_bytes": sum(p.stat().st_size for p in files),
        # Relative to the build folder, so a build folder can be moved or mounted elsewhere.
        "source_onnx": _relative(source_onnx, build_dir),
        "source_onnx_sha256": source_sha256 or sha256_onnx(source_onnx),
        "profile": profile_json(profile),
        "limits": limits.to_json(),
        "io": io,
        "library": library_info(backend),
        "device": device_name(backend, settings.get("device_id", 0)),
        "host": platform.node(),
        "toonark_version": toonark_version(),
        "settings": settings,
        "build_seconds": round(build_seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _relative(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def read_metadata(build_dir: Path, backend: str, precision: str, submodel: str) -> dict:
    engine_dir = BuildLayout(build_dir).engine_dir(backend, precision) / submodel
    fix = f"Build it with `{make_command(build_dir, backend, precision)}`."
    main = engine_dir / engine_file_name(backend)
    if not main.is_file():
        raise EngineError(f"no {backend} {precision} engine for {submodel}: {main} is missing. {fix}")
    try:
        return read_json(engine_dir / ENGINE_JSON, f"{submodel} engine metadata", fix)
    except (FileNotFoundError, ValueError) as err:
        raise EngineError(str(err)) from None


def check_metadata(metadata: dict, *, build_dir: Path, backend: str, precision: str, submodel: str,
                   source_onnx: Path, verify_hashes: bool = True, source_sha256: str | None = None) -> None:
    """Raise EngineError when the engine in its folder no longer matches its engine.json or its source.
    source_sha256: sha256_onnx(source_onnx) when the caller has it already."""
    engine_dir = BuildLayout(build_dir).engine_dir(backend, precision) / submodel
    fix = f"Rebuild it with `{make_command(build_dir, backend, precision)}`."
    where = engine_dir / ENGINE_JSON
    if metadata.get("format") != METADATA_FORMAT or metadata.get("backend") != backend \
            or metadata.get("precision") != precision or metadata.get("submodel") != submodel:
        raise EngineError(f"{where} does not describe a {backend} {precision} {submodel} engine of this toonark "
                          f"version (format {metadata.get('format')!r}). {fix}")
    backend_for(backend).check_engine(metadata, engine_dir, fix)
    if not verify_hashes:
        return
    actual = engine_hash(engine_dir, backend)
    if actual != metadata.get("engine_sha256"):
        raise EngineError(f"{engine_dir / metadata.get('engine_file', engine_file_name(backend))} is corrupt: "
                          f"sha256 {actual[:12]} differs from {metadata.get('engine_sha256', '')[:12]} "
                          f"recorded in {where}. {fix}")
    if not Path(source_onnx).is_file():
        raise EngineError(f"the source ONNX of the {submodel} engine is missing: {source_onnx}. "
                          f"Re-export, then `{make_command(build_dir, backend, precision)}`.")
    current = source_sha256 or sha256_onnx(source_onnx)
    if current != metadata.get("source_onnx_sha256"):
        raise EngineError(f"{engine_dir} is stale: it was built from {source_onnx} with sha256 "
                          f"{metadata.get('source_onnx_sha256', '')[:12]}, which is now {current[:12]}. {fix}")


# --- I/O contract shared by every runtime wrapper -------------------------------------------

def onnx_type_to_numpy(onnx_type: str) -> str:
    """'tensor(float16)' -> 'float16' (ORT's NodeArg.type); 'tensor(float)' -> 'float32'."""
    inner = onnx_type[len("tensor("):-1] if onnx_type.startswith("tensor(") else onnx_type
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def prepare_feeds(spec, metadata: dict, feeds: dict) -> dict:
    """Check numpy feeds against the spec and the engine's recorded I/O and profile.

    Float inputs are cast to the engine's float type (fp32 <-> fp16), so callers need not know
    the engine precision; a wrong kind (int for float), a wrong rank or a shape outside the
    profile the engine was built for raises ValueError naming the input.
    """
    import numpy as np
    expected = spec.input_names
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise ValueError(f"{spec.name} engine takes inputs {expected}; got {sorted(feeds)} "
                         f"(missing {missing}, unknown {extra})")
    inputs = metadata.get("io", {}).get("inputs", {})
    profile = metadata.get("profile", {})
    out = {}
    for tensor in spec.inputs:
        value = np.asarray(feeds[tensor.name])
        want = np.dtype(inputs.get(tensor.name, {}).get("dtype", tensor.numpy_dtype("fp32").name))
        if value.dtype != want:
            if value.dtype.kind == "f" and want.kind == "f":
                value = value.astype(want)
            else:
                raise ValueError(f"{spec.name} input {tensor.name!r} has dtype {value.dtype}, the engine takes {want}")
        if value.ndim != len(tensor.dims):
            raise ValueError(f"{spec.name} input {tensor.name!r} has shape {list(value.shape)}, expected rank "
                             f"{len(tensor.dims)} ({[d.name if hasattr(d, 'name') else d for d in tensor.dims]})")
        if tensor.name in profile:
            low, high = profile[tensor.name]["min"], profile[tensor.name]["max"]
            if any(not lo <= v <= hi for v, lo, hi in zip(value.shape, low, high)):
                raise ValueError(f"{spec.name} input {tensor.name!r} has shape {list(value.shape)}, outside the "
                                 f"engine profile {low}..{high}; re-export with wider limits (`scripts/export.py "
                                 f"--max-batch/--min-image/--max-image`), then `make engine`")
        # Not np.ascontiguousarray: it would turn a 0-d input into shape (1,).
        out[tensor.name] = value if value.flags.c_contiguous else value.copy(order="C")
    return out


def sizes_from_shapes(spec, shapes: dict) -> dict[str, int]:
    """Recover the request sizes {B, H, W} from concrete input shapes (inverse of spec.shapes)."""
    from toonark.specs import Axis
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name not in shapes:
            continue
        for dim, value in zip(tensor.dims, shapes[tensor.name]):
            if isinstance(dim, Axis):
                size = value * dim.div // dim.mul
                if sizes.setdefault(dim.symbol, size) != size:
                    raise ValueError(f"{spec.name} inputs disagree on {dim.symbol}: {sizes[dim.symbol]} vs {size} "
                                     f"(from {tensor.name!r} axis {dim.name} = {value})")
    return sizes
