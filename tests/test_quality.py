"""Packaging checks of the Python layer that are not lint.

The lint itself (ruff, mypy --strict on src and tests, shellcheck) is the
``lint`` session of noxfile.py, run once by CI, not by every pytest run.
"""

from __future__ import annotations

from pathlib import Path


def test_py_typed_ships() -> None:
    import tlsctl

    assert (Path(tlsctl.__file__).parent / "py.typed").exists()
