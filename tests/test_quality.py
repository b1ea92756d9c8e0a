"""Static checks of the Python layer: mypy --strict and ruff."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (CPython-only extra)")
    # bench.py and soak.py bring the modules they import beside them
    # (bench_*.py, _pairs.py), which the tests import only in part.
    bench = ["bench/clienthello.py", "bench/bench.py", "bench/soak.py"]
    proc = _run("mypy", "--strict", "src/tlsctl", *bench)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_the_tests() -> None:
    """The tests are typed too; they import conftest and bench's modules as
    top-level modules, so mypy runs from tests/ with bench/ on its path."""
    pytest.importorskip("mypy", reason="mypy is not installed (CPython-only extra)")
    tests = ROOT / "tests"
    files = [
        *sorted(p.name for p in tests.glob("*.py")),
        "stdlib_patch/sitecustomize.py",
    ]
    env = dict(os.environ, MYPYPATH=str(ROOT / "bench"))
    proc = _run("mypy", "--strict", *files, cwd=tests, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    pytest.importorskip("ruff", reason="ruff is not installed (CPython-only extra)")
    proc = _run("ruff", "check", "setup.py", "src", "tests", "ci", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_py_typed_ships() -> None:
    import tlsctl

    assert (Path(tlsctl.__file__).parent / "py.typed").exists()
