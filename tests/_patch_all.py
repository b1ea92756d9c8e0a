"""The child environments of the stdlib suites: ``stdlib_patch/sitecustomize.py``
on ``PYTHONPATH`` patches every server ``SSLContext`` with ``TLSCTL_PATCH_ALL``."""

from __future__ import annotations

import os
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent / "stdlib_patch"
TAG = "tlsctl-patch-all:"  # the helper's summary line starts with this


def child_env(policy: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TLSCTL_MECHANISM", None)
    if policy == "defer-stash":
        policy = "defer"
        env["TLSCTL_MECHANISM"] = "stash"
    path = [str(PATCH_DIR)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(path), TLSCTL_PATCH_ALL=policy)
    env.pop("TLSCTL_PATCH_ALL_REPORT", None)
    env.update(extra or {})
    return env


def unpatched_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TLSCTL_PATCH_ALL", "TLSCTL_PATCH_ALL_REPORT", "TLSCTL_MECHANISM"):
        env.pop(name, None)
    return env
