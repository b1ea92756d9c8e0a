"""python -m tlsctl {doctor,demo} and pydoc, as a user runs them."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

import tlsctl

pytestmark = pytest.mark.skipif(not tlsctl.info().bound, reason="tlsctl not bound")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300
    )


def test_doctor() -> None:
    proc = _run("-m", "tlsctl", "doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"openssl_version          {tlsctl.info().openssl_version}" in proc.stdout
    assert "-> OK" in proc.stdout


@pytest.mark.skipif(tlsctl.info().mechanism is None, reason="needs a defer mechanism")
def test_demo_small() -> None:
    proc = _run("-m", "tlsctl", "demo", "--connections", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    patched = [line for line in lines if " patched " in line]
    assert len(patched) == 3
    assert "0 (0 conns)" in patched[0]
    assert "completed" in patched[1]
    assert "patched: no data lost, no deadlock, resumption as stock" in proc.stdout


def test_pydoc_reads_well() -> None:
    proc = _run("-m", "pydoc", "tlsctl")
    assert proc.returncode == 0
    for name in (
        "patch(ctx",
        "issue_tickets(conn",
        "connection_state(conn",
        "info()",
        "class TlsctlError",
        "class ConnectionState",
        "set_ticket_callbacks(",  # 3.13 wraps long signatures
        "set_ticket_keys(",
        "class TicketKey",
        "class TicketDecision",
        "class ResumeStatus",
    ):
        assert name in proc.stdout, name


def test_ticket_key_writes_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    proc = _run("-m", "tlsctl", "ticket-key", str(path))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = tlsctl.TicketKey.from_file(path)
    assert key.size == 80
    assert key.id in proc.stdout and path.read_bytes().hex() not in proc.stdout
    again = _run("-m", "tlsctl", "ticket-key", str(path))
    assert again.returncode == 1 and "--force" in again.stderr
    assert tlsctl.TicketKey.from_file(path).id == key.id  # not overwritten
    forced = _run("-m", "tlsctl", "ticket-key", "--force", str(path))
    assert forced.returncode == 0
    assert tlsctl.TicketKey.from_file(path).id != key.id


def test_every_public_name_has_a_docstring() -> None:
    import inspect

    for name in tlsctl.__all__:
        obj = getattr(tlsctl, name)
        if isinstance(obj, (str, tuple)):
            continue  # __version__, POLICIES
        assert inspect.getdoc(obj), name
