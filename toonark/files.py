"""Write-then-rename helpers and content hashes: no stage ever leaves a half-written file
that a later run could trust."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes 0700; the result is read by other users (a Triton server account), so honour umask.
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            # A fresh, empty, uniquely named sibling: renaming a folder over an empty one replaces it,
            # so neither a leftover from a crashed run nor a concurrent writer can make this fail.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)  # put the previous content back rather than lose it
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling for writing; it is renamed onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; see atomic_dir
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: Path, what: str, fix: str):
    """Load a JSON file, naming the file and the command that rewrites it when it is missing or broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} is corrupt ({path}: {err}). {fix}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_onnx(model_path: Path) -> str:
    """Hash of an ONNX model file plus its external-data files (same folder), in name order."""
    model_path = Path(model_path)
    digest = hashlib.sha256()
    for path in [model_path] + sorted(p for p in model_path.parent.iterdir()
                                      if p != model_path and p.suffix in (".data", ".onnx_data", ".bin")):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_tree(folder: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Hash of every file (optionally only some suffixes) below `folder`, paths included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if suffixes and path.suffix not in suffixes:
            continue
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()
