"""The stdlib suites' patch-all helper (``stdlib_patch/sitecustomize.py``) on its
own: quick, so they run on every axis, also when the suites are off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tlsctl
from _patch_all import PATCH_DIR, TAG, child_env

# The helper patches with tlsctl.patch(), which needs the binding (PyPy,
# uv's Pythons and TLSCTL_BINDING=off have none).
pytestmark = pytest.mark.skipif(not tlsctl.info().bound, reason="tlsctl not bound")

_PROBE = r"""
import json, ssl, sys, warnings
import tlsctl

server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
default_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
# Not create_default_context(): before 3.10 it makes a PROTOCOL_TLS
# context, which can serve, and so is patched.
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS)
    fixed = ssl.SSLContext(ssl.PROTOCOL_TLSv1_2)

class Sub(ssl.SSLContext):
    pass

sub = Sub(ssl.PROTOCOL_TLS_SERVER)
conn = server.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
print(json.dumps({
    "policies": [getattr(c.__dict__.get("_tlsctl_policy"), "tickets", None)
                 for c in (server, default_server, legacy, sub, client, fixed)],
    "conn": tlsctl.connection_state(conn).policy,
    "sitecustomize": sys.modules["sitecustomize"].__file__,
    "ours": getattr(sys.modules.get("tlsctl_patch_all"), "__file__", None),
}))
"""


def _probe(env: dict[str, str], code: str = _PROBE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("policy", ["defer", "suppress", "immediate"])
def test_helper_patches_every_server_context(policy: str, tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    env = child_env(policy, {"TLSCTL_PATCH_ALL_REPORT": str(report)})
    proc = _probe(env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    server_side = [policy] * 4
    assert data["policies"] == [*server_side, None, None]
    assert data["conn"] == policy
    assert data["ours"] == str(PATCH_DIR / "sitecustomize.py")
    line = [x for x in proc.stderr.splitlines() if x.startswith(TAG)]
    assert len(line) == 1, proc.stderr
    assert line[0].split(" ", 2)[2] == (
        f"policy={policy} patched=4 server_connections=1 stock=2 client=1 "
        "fixed-version=1 unexpected=0"
    )
    (record,) = (json.loads(x) for x in report.read_text().splitlines())
    assert record["patched"] == 4 and record["errors"] == []


def test_helper_imports_the_next_sitecustomize(tmp_path: Path) -> None:
    """A sitecustomize further along sys.path (Debian ships one) still runs."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['NEXT'] = '1'\n")
    env = child_env("defer")
    env["PYTHONPATH"] = os.pathsep.join([str(PATCH_DIR), str(other)])
    code = _PROBE + "import os; assert os.environ['NEXT'] == '1'\n"
    proc = _probe(env, code)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["sitecustomize"] == str(other / "sitecustomize.py")
    assert data["ours"] == str(PATCH_DIR / "sitecustomize.py")
    assert data["conn"] == "defer"


def test_helper_refuses_an_unknown_policy() -> None:
    proc = _probe(child_env("sometimes"), "print('ran')")
    assert proc.returncode == 2
    assert "ran" not in proc.stdout
    assert f"{TAG} cannot patch: TLSCTL_PATCH_ALL='sometimes'" in proc.stderr


def test_helper_is_inert_without_a_policy() -> None:
    env = child_env("defer")
    env["TLSCTL_PATCH_ALL"] = ""
    proc = _probe(env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["policies"] == [None] * 6
    assert TAG not in proc.stderr


def test_helper_reports_once_from_the_owning_process() -> None:
    """A fork() child that exits normally does not print the parent's line."""
    code = (
        "import os, ssl\nssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "pid = os.fork()\nif pid == 0:\n    raise SystemExit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    proc = _probe(child_env("defer"), code)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith(TAG)]
    assert len(lines) == 1 and " patched=1 " in lines[0], proc.stderr
