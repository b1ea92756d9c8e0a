"""tlsctl's start-up hook for ``python -m tlsctl run`` (and ``tlsctl run``).

The launcher puts this folder first on ``PYTHONPATH`` and describes the
injection in ``TLSCTL_INJECT*`` variables, so every Python process of the
command's tree (multiprocessing spawn workers, ``subprocess`` calls of
Python) injects tlsctl at start-up; forked children inherit it.  Then the
``sitecustomize`` this module hides, if there is one further down
``sys.path``, runs too, as it would have without the launcher.

A misconfiguration (a bad key file) stops the process: a server must not
run without what it was started for.  An interpreter that cannot import
tlsctl (another virtual environment, PyPy) says so once and runs as stock.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _inject() -> None:
    try:
        from tlsctl._inject import inject_from_environment
    except ImportError as exc:
        sys.stderr.write(f"tlsctl run: tlsctl is not importable here ({exc})\n")
        return
    try:
        inject_from_environment()
    except Exception as exc:  # any failure is fatal, with its reason
        sys.stderr.write(f"tlsctl run: injection failed: {exc}\n")
        sys.stderr.flush()
        os._exit(2)  # SystemExit here would be a fatal start-up error


def _run_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            spec.loader.exec_module(module)
            return


_inject()
_run_next_sitecustomize()
