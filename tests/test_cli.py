"""python -m tlsctl {doctor,demo} and pydoc, as a user runs them."""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tlsctl
from tlsctl import _quickack

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
    if hasattr(socket, "TCP_QUICKACK"):  # every hook reported, aligned
        hooks = [line for line in proc.stdout.splitlines() if "quickack " in line]
        assert len(hooks) == 2 + len(_quickack._HOOKS), proc.stdout  # sockets, uvloop
        active = [line for line in hooks if line.endswith(" active")]
        assert len({line.index(" active") for line in active}) == 1, active


@pytest.mark.skipif(
    tlsctl.info().mechanism in (None, "python"),
    reason="the demo's servers are sockets: they need a socket defer mechanism",
)
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
        "quickack(obj",
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


def _ticket_key(
    *args: str, timeout: float = 30, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    """``python -m tlsctl ticket-key ARGS``; a hang fails the test."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    try:
        return subprocess.run(
            [sys.executable, "-m", "tlsctl", "ticket-key", *args],
            stderr=subprocess.PIPE,
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ticket-key {' '.join(args)} hung")


def _one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tlsctl ticket-key: error: "), err
    return lines[0]


def test_ticket_key_force_leaves_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(bytes(80))
    path.chmod(0o644)
    proc = _ticket_key("--force", str(path), umask=0)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tlsctl.TicketKey.from_file(path).export() != bytes(80)
    assert os.listdir(tmp_path) == ["ticket.key"]  # no temporary file left


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_ticket_key_never_follows_a_symlink(tmp_path: Path, force: bool) -> None:
    flag = ["--force"] if force else []
    target = tmp_path / "precious"
    target.write_bytes(b"not a key, and not to be touched")
    link = tmp_path / "ticket.key"
    link.symlink_to(target.name)
    line = _one_line_error(_ticket_key(*flag, str(link)))
    assert "symbolic link" in line and "--force" in line and str(link) in line
    assert target.read_bytes() == b"not a key, and not to be touched"
    assert link.is_symlink() and os.readlink(link) == target.name
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to("nowhere")
    line = _one_line_error(_ticket_key(*flag, str(dangling)))
    assert "symbolic link" in line
    assert sorted(os.listdir(tmp_path)) == ["dangling.key", "precious", "ticket.key"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_ticket_key_refuses_what_is_not_a_regular_file(
    tmp_path: Path, kind: str, force: bool
) -> None:
    path = tmp_path / "ticket.key"
    if kind == "FIFO":
        os.mkfifo(path)  # no reader: opening it for writing would block
    else:
        path.mkdir()
    proc = _ticket_key(*(["--force"] if force else []), str(path), timeout=15)
    line = _one_line_error(proc)
    assert f"is a {kind}" in line and str(path) in line
    assert os.listdir(tmp_path) == ["ticket.key"]
    assert stat.S_ISFIFO(path.lstat().st_mode) == (kind == "FIFO")


def test_ticket_key_missing_folder(tmp_path: Path) -> None:
    line = _one_line_error(_ticket_key(str(tmp_path / "nope" / "ticket.key")))
    assert "nope" in line and "does not exist" in line
    (tmp_path / "file").write_bytes(b"")
    line = _one_line_error(_ticket_key(str(tmp_path / "file" / "ticket.key")))
    assert "file" in line and "Not a directory" in line
    assert os.listdir(tmp_path) == ["file"]


def test_ticket_key_permission_problem(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("root, and no sysfs to refuse a file")
        path = Path("/sys/tlsctl-test-ticket.key")
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
        path = folder / "ticket.key"
    line = _one_line_error(_ticket_key(str(path)))
    assert str(path) in line
    assert "Permission denied" in line or "Read-only file system" in line
    assert not os.path.lexists(path)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_ticket_key_failure_removes_the_temporary_file(
    tmp_path: Path,
    failing: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tlsctl.__main__ import main

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "ticket.key"
    path.write_bytes(bytes(80))
    monkeypatch.setattr(os, failing, broken)
    assert main(["ticket-key", "--force", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlsctl ticket-key: error: ") and err.count("\n") == 1
    assert os.strerror(errno.EIO) in err
    assert os.listdir(tmp_path) == ["ticket.key"]
    assert path.read_bytes() == bytes(80)  # the old key stays in place


def test_ticket_key_without_force_never_replaces_what_appears_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --force the key is published with a hard link, which fails if
    anything took the name after it was checked (here, just before)."""
    from tlsctl.__main__ import main

    real_link = os.link
    path = tmp_path / "ticket.key"

    def racing_link(src: str, dst: str) -> None:
        os.symlink("elsewhere", dst)  # appears between the check and the link
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert main(["ticket-key", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlsctl ticket-key: error: ") and "--force" in err
    assert os.readlink(path) == "elsewhere"
    assert os.listdir(tmp_path) == ["ticket.key"]


def test_ticket_key_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses hard links (EPERM: vfat, some FUSE) still
    gets its key, by rename after a second check."""
    from tlsctl.__main__ import main

    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "ticket.key"
    assert main(["ticket-key", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tlsctl.TicketKey.from_file(path).size == 80
    assert os.listdir(tmp_path) == ["ticket.key"]


def test_ticket_key_to_stdout(tmp_path: Path) -> None:
    help_text = _ticket_key("--help").stdout.decode()
    assert "'-'" in help_text and "stdout" in help_text
    proc = _ticket_key("-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == 80
    key = tlsctl.TicketKey(proc.stdout)
    assert f"wrote {key!r}" in proc.stderr.decode()
    assert proc.stdout.hex() not in proc.stderr.decode()
    assert os.listdir(tmp_path) == []  # no file named "-"


def test_ticket_key_to_stdout_refuses_a_terminal(tmp_path: Path) -> None:
    try:
        controller, terminal = os.openpty()
    except OSError as exc:  # a chroot without /dev/pts
        pytest.skip(f"no pseudo-terminal can be opened here: {exc}")
    try:
        proc = _ticket_key("-", cwd=tmp_path, stdout=terminal)
        os.close(terminal)
        terminal = -1
        shown = b""
        while select.select([controller], [], [], 0)[0]:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    line = _one_line_error(proc)
    assert "terminal" in line
    assert shown == b""
    assert os.listdir(tmp_path) == []


def test_every_public_name_has_a_docstring() -> None:
    import inspect

    for name in tlsctl.__all__:
        obj = getattr(tlsctl, name)
        if isinstance(obj, (str, tuple)):
            continue  # __version__, POLICIES
        assert inspect.getdoc(obj), name


def test_demo_refuses_bad_numbers_and_reads_sizes() -> None:
    from tlsctl.__main__ import _size

    assert _size("262144") == _size("256K") == _size("256KiB") == 256 * 1024
    assert _size("1M") == 1024 * 1024
    for args, message in (
        (["--connections", "0"], "at least 1"),
        (["--connections", "-3"], "at least 1"),
        (["--size", "0"], "at least 1 byte"),
        (["--size", "lots"], "not a size"),
    ):
        proc = _run("-m", "tlsctl", "demo", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_every_option_has_help() -> None:
    for command in ("demo", "doctor", "ticket-key", "run"):
        proc = _run("-m", "tlsctl", command, "--help")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split("options:", 1)[-1].splitlines()
        options = [ln for ln in lines if ln.strip().startswith("--")]
        for line in options:
            at = lines.index(line)
            text = line.strip() + (lines[at + 1] if at + 1 < len(lines) else "")
            assert len(text.split()) > 2, (command, line)  # a description
