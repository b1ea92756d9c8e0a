"""Static checks of the Python layer: mypy --strict and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (CPython-only extra)")
    proc = _run("mypy", "--strict", "src/tlsctl", "bench/clienthello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    pytest.importorskip("ruff", reason="ruff is not installed (CPython-only extra)")
    proc = _run("ruff", "check", "setup.py", "src", "tests", "ci", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_py_typed_ships() -> None:
    import tlsctl

    assert (Path(tlsctl.__file__).parent / "py.typed").exists()
