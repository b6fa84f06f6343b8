"""The rooms import in one direction: core toonark/ <- export <- calibration <- engines <- served models
<- serving tooling <- benchmarks <- scripts. Every `import` / `from` node (lazy ones inside functions
too) of every .py file under the rooms is parsed with ast and mapped to its room's rank; an import of
a higher-ranked room fails with the file, the module and both ranks."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder in the checkout -> (room name, rank); the package name is toonark.<folder> except for the core.
ROOMS = {
    "toonark": ("core", 0),
    "export": ("export", 1),
    "calibration": ("calibration", 2),
    "engines": ("engines", 3),
    "triton_model_repo": ("triton_model_repo", 4),
    "serving": ("serving", 5),
    "benchmarks": ("benchmarks", 6),
    "scripts": ("scripts", 7),
}


def room_of_module(module: str) -> tuple[str, int] | None:
    """The room a dotted module name lives in, None for modules outside toonark."""
    parts = module.split(".")
    if parts[0] in ROOMS and parts[0] != "toonark":
        return ROOMS[parts[0]]        # `import scripts.x` / `from engines import` (sys.path style)
    if parts[0] != "toonark":
        return None
    if len(parts) > 1 and parts[1] in ROOMS and parts[1] != "toonark":
        return ROOMS[parts[1]]
    return ROOMS["toonark"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    folder = path.relative_to(ROOT).parts[0]
    package = "toonark" if folder == "toonark" else f"toonark.{folder}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from toonark import engines` names a room in the imported names
            names = [f"{module}.{a.name}" for a in node.names] if module == "toonark" else [module]
            found += [(node.lineno, name) for name in names]
    return found


def arrows_back() -> list[str]:
    errors = []
    for folder, (room, rank) in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            for line, module in imported_modules(path):
                target = room_of_module(module)
                if target is None or target[1] <= rank:
                    continue
                errors.append(f"{path.relative_to(ROOT)}:{line} imports {module}: {room} (rank {rank}) must not "
                              f"import {target[0]} (rank {target[1]})")
    return errors


def test_every_import_points_down_the_rooms():
    errors = arrows_back()
    assert not errors, "imports against the one direction of the rooms:\n" + "\n".join(errors)


@pytest.mark.parametrize("source, message", [
    ("from toonark.serving.client import x\n",
     "engines/ort.py:1 imports toonark.serving.client: engines (rank 3) must not import serving (rank 5)"),
    ("def f():\n    from toonark.scripts import bench\n",
     "engines/ort.py:2 imports toonark.scripts: engines (rank 3) must not import scripts (rank 7)"),
    ("from toonark import calibration\n",
     None),   # engines may import calibration
])
def test_the_checker_sees_back_arrows_and_lazy_imports(tmp_path, source, message):
    """The checker itself: a planted file in a temporary tree is reported (or not) with the exact message."""
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "ort.py").write_text(source)
    for folder in ROOMS:
        (tmp_path / folder).mkdir(exist_ok=True)
    globals()["ROOT"], saved = tmp_path, ROOT
    try:
        errors = arrows_back()
    finally:
        globals()["ROOT"] = saved
    assert errors == ([message] if message else [])


def test_core_imports_no_stage_at_run_time():
    """Importing the core modules loads no stage package (the ast check above, confirmed by Python)."""
    import subprocess
    import sys
    code = ("import sys, toonark.pipeline, toonark.family, toonark.specs, toonark.scheduler, toonark.layout, "
            "toonark.files, toonark.tokenizer\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in ([['toonark', r] for r in "
            "('export', 'calibration', 'engines', 'triton_model_repo', 'serving', 'benchmarks', 'scripts')]))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
