"""toonark.files: atomic folder replacement survives leftovers and failed renames."""
import os
from pathlib import Path

import pytest

from toonark.files import atomic_dir


def _write(folder: Path, text: str) -> None:
    (folder / "payload.txt").write_text(text)


def test_atomic_dir_replaces_despite_leftover_old_folder(tmp_path):
    final = tmp_path / "pipeline"
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
    # What a crashed run with this very pid used to leave behind: a non-empty ".pipeline.old-<pid>".
    leftover = tmp_path / f".pipeline.old-{os.getpid()}"
    leftover.mkdir()
    (leftover / "stale.txt").write_text("stale")
    for text in ("two", "three"):
        with atomic_dir(final) as tmp:
            _write(tmp, text)
        assert (final / "payload.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pipeline", leftover.name])


def test_atomic_dir_restores_final_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "pipeline"
    with atomic_dir(final) as tmp:
        _write(tmp, "old")
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".pipeline.tmp-"):
            raise OSError("simulated failure of the second rename")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(final) as tmp:
            _write(tmp, "new")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert (final / "payload.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_atomic_dir_failure_in_block_keeps_final(tmp_path):
    final = tmp_path / "pipeline"
    with atomic_dir(final) as tmp:
        _write(tmp, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            _write(tmp, "new")
            raise RuntimeError("boom")
    assert (final / "payload.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
