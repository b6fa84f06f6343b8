"""scripts/: one CLI pattern (scripts/_cli.py). Each script parses typed arguments, does its work in `run(args)`
and leaves errors to `cli.main`: `error: <message>` on stderr and exit 1 for the project's errors, a traceback
for anything else (a bug). The scripts' own refusals are tested with their stages (test_engines, test_export,
test_calibration, test_triton, test_loadtest, test_faults)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from toonark.scripts import _cli as cli

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CLIS = sorted(p for p in SCRIPTS.glob("*.py") if p.name not in ("__init__.py", "_cli.py", "bench.py"))


@pytest.mark.parametrize("path", CLIS, ids=[p.stem for p in CLIS])
def test_every_script_leaves_errors_to_the_one_error_path(path):
    tree = ast.parse(path.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "run" in functions or "run_demo" in functions, f"{path.name}: no run(args)"
    main = functions["main"]
    assert ast.unparse(main.body[-1]).startswith("return cli.main(run, "), f"{path.name}: main must be cli.main(run, ...)"
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
            assert not caught & {e.__name__ for e in cli.KNOWN_ERRORS}, (
                f"{path.name}:{node.lineno} catches {sorted(caught)} itself; let cli.main report it")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not node.value.startswith("error: "), f"{path.name}:{node.lineno} prints its own error line"


def test_known_errors_become_one_error_line_and_exit_1(capsys):
    from toonark.serving.client import ServerError

    def failing(error):
        def run(args):
            raise error
        return run

    for error in (ValueError("width 65 must be a multiple of 64"), FileNotFoundError("build info not found: x"),
                  ServerError("unreachable"), TimeoutError("not ready in 300 s")):
        assert cli.main(failing(error), None) == 1
        assert capsys.readouterr().err == f"error: {error}\n"
    assert cli.main(lambda args: None, None) == 0
    assert cli.main(lambda args: 3, None) == 3
    with pytest.raises(KeyError):   # a bug keeps its traceback
        cli.main(failing(KeyError("boom")), None)
