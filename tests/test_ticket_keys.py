"""tlsctl.set_ticket_keys / TicketKey: shared keys, rotation, a fleet."""

from __future__ import annotations

import contextlib
import os
import pickle
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import connect
from tlsctl import ResumeStatus, TicketDecision, TicketKey, scenarios
from tlsctl._fleet import fleet_resumption
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
TLS13 = ssl.TLSVersion.TLSv1_3

# Fixed key material, so the tests can look for it in reprs and messages.
KEY80 = bytes(range(80))
KEY48 = bytes(range(100, 148))


def _keyed(
    server_ctx: CtxFactory, version: ssl.TLSVersion, keys: list[Any]
) -> ssl.SSLContext:
    return tlsctl.set_ticket_keys(server_ctx(maximum_version=version), keys)


def _no_key_bytes(text: str, key: bytes) -> None:
    for window in (key[i : i + 8] for i in range(0, len(key) - 8, 4)):
        assert window.hex() not in text
        assert repr(window)[2:-1] not in text


# --- TicketKey ------------------------------------------------------------


def test_ticket_key_formats_and_repr_without_key_bytes(tmp_path: Path) -> None:
    for raw in (KEY80, KEY48):
        key = TicketKey(raw)
        assert key.size == len(raw)
        assert key.export() == raw
        _no_key_bytes(repr(key), raw)
        _no_key_bytes(str(key), raw)
        path = tmp_path / f"key{len(raw)}"
        path.write_bytes(raw)  # nginx's ssl_session_ticket_key file
        assert TicketKey.from_file(path).id == key.id
    assert TicketKey(KEY80).id != TicketKey(KEY48).id
    fresh = {TicketKey.generate().id for _ in range(8)}
    assert len(fresh) == 8
    assert TicketKey.generate().size == 80
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(TicketKey(KEY80))


@pytest.mark.parametrize("size", [0, 16, 47, 49, 79, 81, 96])
def test_ticket_key_wrong_size(size: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        TicketKey(bytes(size))
    path = tmp_path / "bad"
    path.write_bytes(bytes(size))
    with pytest.raises(ValueError, match="80 or 48 bytes"):
        TicketKey.from_file(path)


def test_ticket_key_wrong_type() -> None:
    with pytest.raises(TypeError, match="bytes"):
        TicketKey("x" * 80)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TicketKey(80)  # type: ignore[arg-type]


def test_set_ticket_keys_bad_inputs(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    ctx = server_ctx()
    with pytest.raises(TypeError, match="sequence"):
        tlsctl.set_ticket_keys(ctx, KEY80)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tlsctl.set_ticket_keys(ctx, [80])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        tlsctl.set_ticket_keys(ctx, [])
    with pytest.raises(ValueError, match="same name") as info:
        tlsctl.set_ticket_keys(ctx, [KEY80, KEY80[:16] + bytes(64)])
    _no_key_bytes(str(info.value), KEY80)
    with pytest.raises(ValueError, match="80 bytes") as info:
        tlsctl.set_ticket_keys(ctx, [KEY80[:50]])
    _no_key_bytes(str(info.value), KEY80)
    with pytest.raises(ValueError, match="server context"):
        tlsctl.set_ticket_keys(client_ctx(), [KEY80])
    with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
        tlsctl.set_ticket_keys(object(), [KEY80])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["_data", "id", "size", "export", "other"])
def test_ticket_key_is_immutable(name: str, server_ctx: CtxFactory) -> None:
    key = TicketKey(KEY80)
    with pytest.raises(AttributeError, match="immutable"):
        setattr(key, name, b"x")
    with pytest.raises(AttributeError, match="immutable"):
        delattr(key, name)
    assert key.export() == KEY80 and key.size == 80
    assert key.id == TicketKey(KEY80).id
    with contextlib.suppress(AttributeError):
        key.__init__(KEY48)  # type: ignore[call-arg]  # no second initialisation
    assert key.export() == KEY80
    tlsctl.set_ticket_keys(server_ctx(), [key])


def test_ticket_key_is_final(server_ctx: CtxFactory) -> None:
    with pytest.raises(TypeError, match="cannot be subclassed"):

        class Evil(TicketKey):  # type: ignore[misc]
            def _record(self) -> bytes:
                return b"\x50"

    if sys.version_info >= (3, 11):  # typing.final marks the class from 3.11
        assert getattr(TicketKey, "__final__", False) is True

    class Impostor:  # passes isinstance(x, TicketKey) through __class__
        __class__ = TicketKey  # type: ignore[assignment]

        def _record(self) -> bytes:
            return b"\x50"

        def export(self) -> bytes:
            return KEY80

    assert isinstance(Impostor(), TicketKey)
    with pytest.raises(TypeError, match="not Impostor"):
        tlsctl.set_ticket_keys(server_ctx(), [Impostor()])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "data",
    [b"x", b"", bytes(47), bytes(81), bytes(300), "x" * 80, None, "unset"],
    ids=["1-byte", "empty", "47-byte", "81-byte", "300-byte", "str", "None", "unset"],
)
def test_set_ticket_keys_rejects_a_key_changed_behind_its_back(
    data: object, server_ctx: CtxFactory
) -> None:
    """Immutability can still be bypassed with object.__setattr__; such a key
    never reaches C as a malformed record."""
    if data == "unset":
        key = object.__new__(TicketKey)  # never initialised
    else:
        key = TicketKey(KEY80)
        object.__setattr__(key, "_data", data)
    from tlsctl import _bind, _tickets

    assert _tickets._RECORD_SIZE == _bind.lib.TLSCTL_KEY_RECORD
    ctx = server_ctx()
    with pytest.raises(ValueError, match="malformed") as info:
        tlsctl.set_ticket_keys(ctx, [TicketKey(KEY48), key])
    assert "keys[1]" in str(info.value)


def test_set_ticket_keys_needs_an_iterable(server_ctx: CtxFactory) -> None:
    ctx = server_ctx()
    for bad, name in ((None, "NoneType"), (42, "int"), (KEY80, "bytes")):
        with pytest.raises(TypeError) as info:
            tlsctl.set_ticket_keys(ctx, bad)  # type: ignore[arg-type]
        assert str(info.value) == (
            f"keys must be a sequence of TicketKey (or bytes) objects, not {name}"
        )
    # Any iterable is read once, in order (documented).
    key = TicketKey(KEY80)
    keys: list[TicketKey | bytes] = [key, KEY48]
    assert tlsctl.set_ticket_keys(ctx, (k for k in keys)) is ctx

    def failing() -> Iterator[TicketKey]:
        yield key
        raise TypeError("boom")  # its own error, not "not a sequence"

    with pytest.raises(TypeError, match=r"^boom$"):
        tlsctl.set_ticket_keys(ctx, failing())


def _from_file_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    """TicketKey.from_file(path) in a child process with 1 GiB of address
    space and a deadline, so that reading a FIFO or a device to its end
    fails this test instead of hanging it or eating the machine's memory.
    Exit status 3: it raised ValueError (printed)."""
    code = (
        "import os, resource, sys\n"
        "try:\n"
        "    # AddressSanitizer (the matrix's host-asan run) maps terabytes of\n"
        "    # shadow memory: there only the deadline holds\n"
        "    if 'libasan' not in os.environ.get('LD_PRELOAD', ''):\n"
        "        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "except (ValueError, OSError):\n"
        "    pass  # not settable here (macOS): the deadline still holds\n"
        "import tlsctl\n"
        "try:\n"
        "    tlsctl.TicketKey.from_file(sys.argv[1])\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"TicketKey.from_file({str(path)!r}) hung")


@pytest.mark.parametrize("kind", ["FIFO", "character device", "huge file"])
def test_from_file_refuses_without_reading_everything(
    kind: str, tmp_path: Path
) -> None:
    if kind == "FIFO":
        path = tmp_path / "fifo"
        os.mkfifo(path)  # no writer: opening it for reading would block
    elif kind == "character device":
        path = Path("/dev/zero")  # endless
    else:
        path = tmp_path / "huge"
        path.touch()
        os.truncate(path, 1 << 36)  # 64 GiB, sparse: only its size is read
    proc = _from_file_in_child(path)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert str(path) in message
    assert kind in message if kind != "huge file" else "80 or 48 bytes" in message


def test_from_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory") as info:
        TicketKey.from_file(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_from_file_follows_symlinks(tmp_path: Path) -> None:
    """The layout of a Kubernetes Secret volume: key -> ..data/key,
    ..data -> ..2024_01_01_00_00_00.1/ (a symlink to a folder)."""
    real = tmp_path / "..2024_01_01_00_00_00.1"
    real.mkdir()
    (real / "key").write_bytes(KEY80)
    (tmp_path / "..data").symlink_to(real.name)
    link = tmp_path / "key"
    link.symlink_to(Path("..data") / "key")
    assert TicketKey.from_file(link).id == TicketKey(KEY80).id
    assert TicketKey.from_file(str(link)).export() == KEY80
    dangling = tmp_path / "dangling"
    dangling.symlink_to("nowhere")
    with pytest.raises(FileNotFoundError) as info:
        TicketKey.from_file(dangling)
    assert info.value.filename == str(dangling)


# --- behaviour on real handshakes -----------------------------------------


@pytest.mark.parametrize("raw", [KEY80, KEY48], ids=["80-byte", "48-byte"])
def test_contexts_sharing_keys_resume_each_others_tickets(
    raw: bytes,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    a = _keyed(server_ctx, tls_version, [TicketKey(raw)])
    b = _keyed(server_ctx, tls_version, [raw])
    client = client_ctx()
    counter = TicketCounter(client)
    session = connect(a, client).client.session
    assert session is not None and session.has_ticket
    assert set(counter.key_names) == {raw[:16]}  # tickets name our key
    assert connect(b, client, session).client.session_reused
    # Stock contexts each have their own random keys: no cross resumption.
    stock_session = connect(server_ctx(), client).client.session
    assert not connect(server_ctx(), client, stock_session).client.session_reused


def test_ticket_counts_match_stock(
    tls_version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """With the first key, a resumed TLS 1.3 handshake gets one renewal
    ticket and TLS 1.2 none, exactly as with OpenSSL's built-in keys."""
    counts = []
    for keyed in (False, True):
        server = server_ctx(maximum_version=tls_version)
        if keyed:
            tlsctl.set_ticket_keys(server, [TicketKey.generate()])
        client = client_ctx()
        counter = TicketCounter(client)
        session = connect(server, client).client.session
        full = counter.count
        counter.count = 0
        assert connect(server, client, session).client.session_reused
        counts.append((full, counter.count))
    assert counts[0] == counts[1]
    assert counts[1] == ((2, 1) if tls_version == TLS13 else (1, 0))


def test_rotation(
    tls_version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    old, new = TicketKey.generate(), TicketKey.generate()
    server = _keyed(server_ctx, tls_version, [old])
    statuses: list[ResumeStatus] = []

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        statuses.append(status)
        if status.decrypted:
            return TicketDecision.USE_RENEW
        return TicketDecision.IGNORE_RENEW

    tlsctl.set_ticket_callbacks(server, on_resume=on_resume)
    client = client_ctx()
    counter = TicketCounter(client)
    old_session = connect(server, client).client.session
    assert old_session is not None

    tlsctl.set_ticket_keys(server, [new, old])  # rotate: new first, old kept
    counter.key_names.clear()
    pair = connect(server, client, old_session)
    assert pair.client.session_reused
    assert statuses[-1].key_id == old.id and statuses[-1].key_index == 1
    # ... and it came back renewed under the new key
    assert counter.key_names == [new.export()[:16]]
    renewed = pair.client.session
    assert renewed is not None

    tlsctl.set_ticket_keys(server, [new])  # drop the old key
    assert connect(server, client, renewed).client.session_reused
    assert statuses[-1].key_id == new.id and statuses[-1].key_index == 0
    assert not connect(server, client, old_session).client.session_reused
    assert statuses[-1].key_index is None and not statuses[-1].decrypted


@pytest.mark.parametrize("policy", ["defer", "suppress", "immediate"])
def test_keys_compose_with_policies(
    policy: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    key = TicketKey.generate()
    issuer = tlsctl.set_ticket_keys(server_ctx(), [key])
    client = client_ctx()
    session = connect(issuer, client).client.session
    server = tlsctl.patch(tlsctl.set_ticket_keys(server_ctx(), [key]), tickets=policy)
    assert connect(server, client, session).client.session_reused


def test_fleet_of_processes_resumes_everywhere() -> None:
    """4 worker processes share one port with SO_REUSEPORT, each with its
    own SSLContext.  With shared keys every reconnect resumes, whichever
    worker answers; with OpenSSL's per-context keys most miss."""
    certs = scenarios.make_certs(client_sans=1)
    shared = fleet_resumption(certs, keys=[TicketKey.generate()])
    stock = fleet_resumption(certs, keys=None)
    print(
        f"\nfleet of {shared.workers}, {shared.reconnects} reconnects: "
        f"shared keys resumed {shared.resumed}/{shared.reconnects} "
        f"(served by {dict(sorted(shared.served_by.items()))}); "
        f"stock resumed {stock.resumed}/{stock.reconnects}, "
        f"missed {stock.missed} ({stock.missed / stock.reconnects:.0%})"
    )
    assert len(shared.served_by) > 1  # the kernel really spread them
    assert shared.resumed == shared.reconnects == 40


def test_rotation_while_other_threads_handshake(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """Keys are swapped under a mutex: handshakes running without the GIL in
    other threads always see a whole key list (both keys stay listed, so
    every one of them resumes)."""
    k1, k2 = TicketKey.generate(), TicketKey.generate()
    server = _keyed(server_ctx, TLS13, [k1, k2])
    client = client_ctx()
    session = connect(server, client).client.session
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(40):
            reused = connect(server, client, session).client.session_reused
            with lock:
                results.append(reused)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    rotations = 0
    while any(t.is_alive() for t in threads):
        tlsctl.set_ticket_keys(server, [k2, k1] if rotations % 2 else [k1, k2])
        rotations += 1
    for t in threads:
        t.join()
    assert rotations > 10
    assert results == [True] * 120
