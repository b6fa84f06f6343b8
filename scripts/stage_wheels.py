"""Wheels for an offline GPU machine, in parts small enough to carry one per call (benchmarks/NOTES.md):

    .venv/bin/python scripts/stage_wheels.py stage [--out .stage/gpu] [--part-mb 58]  # here, with network
    python3 scripts/stage_wheels.py join --parts DIR [DIR ...] --out /tmp/wheels          # there, stdlib only
    make setup GPU=1 WHEELS=/tmp/wheels                                                  # there, offline

`stage` downloads (pip download --no-deps, CPython 3.12 manylinux x86_64 by default) the packages an offline
image with its own CUDA torch lacks: onnxruntime-gpu at the version of requirements-gpu.txt, and OFFLINE_SET at
the versions this venv resolved from pyproject.toml (so the offline machine runs what the CPU suite tested).
Whole wheels are packed into parts p0, p1, ... of at most --part-mb MB; a wheel larger than that is cut into
chunks. Each part holds manifest.json (every wheel's sha256 and chunk list), so `join` needs no hash from the
command line, says which part is missing, and checks every wheel before writing it (temp name, then rename).
Nobody with network access needs this: `make setup GPU=1` installs from PyPI.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from toonark.scripts import _cli as cli
except ImportError:   # run as a file before `make setup` installed toonark: python put scripts/ first on sys.path
    import _cli as cli

ROOT = Path(__file__).resolve().parent.parent
# What the lent H200 image (Python 3.12, torch 2.11 cu130, numpy 2.x) lacks or has at a version toonark cannot use
# (numpy < 2 for the Triton Python backend; transformers 4.57 / hub 0.36 / tokenizers 0.22 for optimum-onnx).
OFFLINE_SET = ("numpy", "nvidia-pytriton", "tritonclient", "python-rapidjson", "gevent", "geventhttpclient",
               "greenlet", "zope.event", "zope.interface", "brotli", "diffusers", "transformers", "huggingface_hub",
               "tokenizers", "optimum", "optimum-onnx", "onnx", "polygraphy", "onnx-graphsurgeon", "open_clip_torch",
               "fpng", "lazy_loader", "scipy")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
MANIFEST = "manifest.json"


def gpu_requirements() -> dict[str, str]:
    """{name: version} pinned in requirements-gpu.txt."""
    pins = {}
    for line in (ROOT / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def offline_specs(skip: tuple[str, ...] = ()) -> list[str]:
    """pip specs of the offline set: onnxruntime-gpu from requirements-gpu.txt, the rest at this venv's versions."""
    specs = [f"onnxruntime-gpu=={gpu_requirements()['onnxruntime-gpu']}"]
    for name in OFFLINE_SET:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"{name} is not installed in {sys.prefix}; run `make setup` and call this script "
                             f"with .venv/bin/python (the versions come from that venv)") from None
    return [s for s in specs if s.split("==")[0] not in skip]


def download(specs: list[str], dest: Path, python_version: str) -> None:
    abi = "cp" + python_version.replace(".", "")
    for spec in specs:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
               "--abi", "none", "-d", str(dest)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd + [spec], check=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_parts(sizes: dict[str, int], part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Parts as lists of (wheel, offset, length): small wheels packed whole (smallest first), larger ones cut."""
    parts: list[list[tuple[str, int, int]]] = [[]]
    room = part_bytes
    for name in sorted(sizes, key=lambda n: (sizes[n], n)):
        offset, left = 0, sizes[name]
        while left:
            if room == 0 or (left <= part_bytes and left > room):   # keep a wheel that fits a part whole
                parts.append([])
                room = part_bytes
            take = min(left, room)
            parts[-1].append((name, offset, take))
            offset, left, room = offset + take, left - take, room - take
    return [p for p in parts if p]


def write_parts(wheels: dict[str, Path], out: Path, part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Cut `wheels` ({file name: path}) into out/p0, out/p1, ... (old parts removed), each with the manifest."""
    sizes = {name: path.stat().st_size for name, path in wheels.items()}
    parts = plan_parts(sizes, part_bytes)
    manifest = {"parts": len(parts),
                "wheels": {name: {"sha256": sha256(wheels[name]), "bytes": sizes[name],
                                  "chunks": [[f"p{i}", off, n] for i, part in enumerate(parts)
                                             for (w, off, n) in part if w == name]} for name in sizes}}
    for old in out.glob("p[0-9]*"):
        shutil.rmtree(old)
    for i, part in enumerate(parts):
        folder = out / f"p{i}"
        folder.mkdir(parents=True)
        for name, offset, length in part:
            with open(wheels[name], "rb") as src, open(folder / f"{name}.{offset}", "wb") as dst:
                src.seek(offset)
                dst.write(src.read(length))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def stage(out: Path, part_mb: float, python_version: str, skip: tuple[str, ...]) -> int:
    cache = out / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    specs = offline_specs(skip)
    download(specs, cache, python_version)
    wanted = {s.split("==")[0].lower().replace("-", "_").replace(".", "_") for s in specs}
    wheels = {p.name: p for p in sorted(cache.glob("*.whl"))
              if p.name.split("-")[0].lower().replace(".", "_") in wanted}
    parts = write_parts(wheels, out, int(part_mb * 1e6))
    sizes = {name: path.stat().st_size for name, path in wheels.items()}
    print(f"staged {len(wheels)} wheels ({sum(sizes.values()) / 1e6:.0f} MB) in {len(parts)} parts under {out}:")
    for i, part in enumerate(parts):
        print(f"  p{i}: {sum(n for _, _, n in part) / 1e6:5.1f} MB  "
              + ", ".join(f"{w}{'' if n == sizes[w] else f' [{off}+{n}]'}" for w, off, n in part))
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    print("carry one part a call on the same warm machine (benchmarks/NOTES.md):")
    for i in range(len(parts)):
        print(f"  run carry=[\"{rel}/p{i}\"] command: mkdir -p /tmp/parts && cp -r {rel}/p{i} /tmp/parts/")
    print(f"then: python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels && "
          f"make setup GPU=1 WHEELS=/tmp/wheels")
    return 0


def join(part_dirs: list[Path], out: Path, partial: bool) -> int:
    found = {d.name: d for d in part_dirs if (d / MANIFEST).is_file()}
    if not found:
        raise FileNotFoundError(f"no {MANIFEST} in {', '.join(map(str, part_dirs))}: pass the carried part folders "
                         f"(p0, p1, ...) made by `scripts/stage_wheels.py stage`")
    manifest = json.loads(next(iter(found.values())).joinpath(MANIFEST).read_text())
    missing = [f"p{i}" for i in range(manifest["parts"]) if f"p{i}" not in found]
    if missing and not partial:
        raise FileNotFoundError(f"parts {', '.join(missing)} of {manifest['parts']} are missing: carry them in the "
                         f"calls before this one, on the same warm machine (its /tmp is gone once it goes back)")
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, entry in sorted(manifest["wheels"].items()):
        if any(part not in found for part, _, _ in entry["chunks"]):
            skipped.append(name)
            continue
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as dst:
            for part, offset, _ in entry["chunks"]:
                with open(found[part] / f"{name}.{offset}", "rb") as src:
                    shutil.copyfileobj(src, dst)
        if sha256(Path(tmp)) != entry["sha256"]:
            os.unlink(tmp)
            raise ValueError(f"{name} does not match its sha256 after joining: a part was cut short in transit; "
                             f"carry it again")
        os.replace(tmp, out / name)
        written.append(name)
    print(f"joined {len(written)} wheels into {out}" + (f"; left out (parts missing): {', '.join(skipped)}"
                                                         if skipped else ""))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="download the offline set and cut it into parts (needs network)")
    s.add_argument("--out", type=Path, default=ROOT / ".stage" / "gpu")
    s.add_argument("--part-mb", type=float, default=58.0, help="MB a part (a call carries 64 MiB with the tree)")
    s.add_argument("--python-version", default="3.12", help="the offline machine's Python (X.Y)")
    s.add_argument("--skip", nargs="*", default=(), help="package names the offline machine already has")
    j = sub.add_parser("join", help="rebuild and check the wheels from carried parts (stdlib only)")
    j.add_argument("--parts", type=Path, nargs="+", required=True)
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--partial", action="store_true", help="write the wheels whose parts are all there; skip the rest")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.command == "stage":
        return stage(args.out, args.part_mb, args.python_version, tuple(args.skip))
    return join(args.parts, args.out, args.partial)


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
