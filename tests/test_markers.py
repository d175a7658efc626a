"""The ``slow`` marker: registered, and the names conftest.py marks are real tests."""

import ast
from pathlib import Path

from conftest import SLOW_MODULES, SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def _test_functions(module: str) -> set:
    tree = ast.parse((TESTS / module).read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_slow_lists_name_real_tests():
    for module in SLOW_MODULES:
        assert (TESTS / module).is_file(), module
    for module, names in SLOW_TESTS.items():
        missing = set(names) - _test_functions(module)
        assert not missing, f"conftest.SLOW_TESTS: {module} has no {sorted(missing)}"


def test_slow_marker_is_registered(pytestconfig):
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("slow:") for m in markers), markers


def _collected(*args) -> set:
    """``{(module, test name)}`` that ``pytest --collect-only ARGS`` selects."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
        + [str(TESTS / m) for m in sorted(SLOW_TESTS)],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
    )
    assert res.returncode in (0, 5), res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln.split("::") for ln in res.stdout.splitlines() if "::" in ln]
    return {(Path(p[0]).name, p[1].split("[")[0]) for p in lines}


def test_marked_tests_are_collected_as_slow():
    """`-m slow` selects exactly the listed tests of each collected module (a module skipped
    for a missing requirement, e.g. torch, has none)."""
    every, slow = _collected(), _collected("-m", "slow")
    modules = {m for m, _ in every}
    expected = {(m, n) for m, names in SLOW_TESTS.items() if m in modules for n in names}
    assert slow == expected, sorted(slow ^ expected)
