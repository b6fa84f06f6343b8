"""Files for an offline machine, in parts small enough to carry one per call (the lent GPU takes 64 MiB a call,
the working tree included; benchmarks/NOTES.md). Stdlib only: `join` runs on a bare image from the carried
checkout.

write_parts() packs files (by relative path: wheels, a data file, model folders) into out/p0, out/p1, ... of
at most part_bytes each, small files whole (smallest first) and larger ones cut into chunks; every part holds
the manifest (each file's sha256, size and chunks), so join() needs no hash from the command line, says which
part is missing, and checks every file before writing it (temp name, then rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from toonark.files import sha256_file

MANIFEST = "manifest.json"


def plan_parts(sizes: dict[str, int], part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Parts as lists of (file, offset, length): small files packed whole (smallest first), larger ones cut."""
    parts: list[list[tuple[str, int, int]]] = [[]]
    room = part_bytes
    for name in sorted(sizes, key=lambda n: (sizes[n], n)):
        offset, left = 0, sizes[name]
        while left:
            if room == 0 or (left <= part_bytes and left > room):   # keep a file that fits a part whole
                parts.append([])
                room = part_bytes
            take = min(left, room)
            parts[-1].append((name, offset, take))
            offset, left, room = offset + take, left - take, room - take
    return [p for p in parts if p]


def _chunk_name(name: str, offset: int) -> str:
    return f"{name.replace('/', '__')}.{offset}"     # one flat folder a part


def write_parts(files: dict[str, Path], out: Path, part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Cut `files` ({relative path: source}) into out/p0, out/p1, ... (old parts removed), each with the manifest."""
    sizes = {name: Path(path).stat().st_size for name, path in files.items()}
    parts = plan_parts(sizes, part_bytes)
    manifest = {"parts": len(parts),
                "files": {name: {"sha256": sha256_file(files[name]), "bytes": sizes[name],
                                 "chunks": [[f"p{i}", off, n] for i, part in enumerate(parts)
                                            for (f, off, n) in part if f == name]} for name in sizes}}
    for old in out.glob("p[0-9]*"):
        shutil.rmtree(old)
    for i, part in enumerate(parts):
        folder = out / f"p{i}"
        folder.mkdir(parents=True)
        for name, offset, length in part:
            with open(files[name], "rb") as src, open(folder / _chunk_name(name, offset), "wb") as dst:
                src.seek(offset)
                dst.write(src.read(length))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def tree(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its path relative to it (what write_parts takes)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def join(part_dirs: list[Path], out: Path, partial: bool = False) -> tuple[list[str], list[str]]:
    """The files from the carried part folders into `out` (by their relative paths), each checked against the
    manifest's sha256 before it is renamed into place. Returns (written, skipped); skipped are the files with a
    part missing, which only `partial` allows."""
    found = {d.name: d for d in part_dirs if (d / MANIFEST).is_file()}
    if not found:
        raise FileNotFoundError(f"no {MANIFEST} in {', '.join(map(str, part_dirs))}: pass the carried part folders "
                                f"(p0, p1, ...) that write_parts made")
    manifest = json.loads(next(iter(found.values())).joinpath(MANIFEST).read_text())
    missing = [f"p{i}" for i in range(manifest["parts"]) if f"p{i}" not in found]
    if missing and not partial:
        raise FileNotFoundError(f"parts {', '.join(missing)} of {manifest['parts']} are missing: carry them in the "
                                f"calls before this one, on the same warm machine (its /tmp is gone once it goes back)")
    written, skipped = [], []
    for name, entry in sorted(manifest["files"].items()):
        if any(part not in found for part, _, _ in entry["chunks"]):
            skipped.append(name)
            continue
        target = Path(out) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as dst:
            for part, offset, _ in entry["chunks"]:
                with open(found[part] / _chunk_name(name, offset), "rb") as src:
                    shutil.copyfileobj(src, dst)
        if sha256_file(Path(tmp)) != entry["sha256"]:
            os.unlink(tmp)
            raise ValueError(f"{name} does not match its sha256 after joining: a part was cut short in transit; "
                             f"carry it again")
        os.replace(tmp, target)
        written.append(name)
    return written, skipped
