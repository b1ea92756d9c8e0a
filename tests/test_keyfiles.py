"""tlsctl.watch_ticket_keys: keys from files, reloaded when the files change.

Real files in tmp_path, real handshakes (conftest.connect), real threads and
a real fork().  Waits poll a condition against a deadline; the watchers
check every 0.05 s.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import connect
from tlsctl import TicketKey
from tlsctl._keyfiles import KeyFileWarning, KeyWatcher, watch_ticket_keys
from tlsctl._keysig import _link_chain, _signature
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
Watch = Callable[..., KeyWatcher]

FAST = 0.05  # the watchers' interval
DEADLINE = 5.0  # the longest any condition is waited for


def wait_for(condition: Callable[[], object], what: str) -> float:
    """Poll ``condition`` until it holds; fail after ``DEADLINE`` seconds.
    Returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"timed out after {DEADLINE} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def write_atomic(path: Path, data: bytes) -> None:
    """Vault Agent / consul-template style: a temporary file renamed over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ids(keys: list[TicketKey]) -> list[str]:
    return [k.id for k in keys]


def ticket_names(counter: TicketCounter) -> set[bytes]:
    names = set(counter.key_names)
    counter.key_names.clear()
    return names


def no_key_bytes(text: str, *keys: bytes) -> None:
    for key in keys:
        for window in (key[i : i + 8] for i in range(0, len(key) - 8, 4)):
            assert window.hex() not in text
            assert repr(window)[2:-1] not in text


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tlsctl-keys:")]


@pytest.fixture
def watch() -> Iterator[Watch]:
    """watch_ticket_keys, every watcher stopped at teardown."""
    made: list[KeyWatcher] = []

    def make(*args: Any, **kw: Any) -> KeyWatcher:
        watcher = watch_ticket_keys(*args, **kw)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.stop()


@pytest.fixture
def reports(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """Every KeyFileWarning (``always`` shown) and every WARNING record of the
    ``tlsctl`` logger; the getter checks that both channels said the same."""
    caplog.set_level(logging.INFO, logger="tlsctl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def get() -> list[str]:
            warned = [
                str(w.message) for w in caught if issubclass(w.category, KeyFileWarning)
            ]
            logged = [
                r.getMessage()
                for r in caplog.records
                if r.name == "tlsctl" and r.levelno == logging.WARNING
            ]
            assert warned == logged
            return warned

        yield get


# --- following changes ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["two watchers", "one watcher, two contexts"])
def test_contexts_follow_an_atomic_rename(
    layout: str,
    tmp_path: Path,
    watch: Watch,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    """Rotation by rename: a ticket issued under the new key by context A
    resumes on context B, and tickets under the old key still resume while
    it is listed second (then stop, once it is dropped)."""
    k0, k1, k2, spare = (TicketKey.generate() for _ in range(4))
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    current.write_bytes(k0.export())
    previous.write_bytes(spare.export())
    a, b = server_ctx(), server_ctx()
    if layout == "two watchers":
        watchers = [
            watch(a, [current, previous], interval=FAST),
            watch(b, [str(current), str(previous)], interval=FAST),
        ]
    else:
        watchers = [watch([a, b], [current, previous], interval=FAST)]
    assert len(watcher_threads()) == len(watchers)  # one thread per watcher
    client = client_ctx()
    counter = TicketCounter(client)
    old = connect(a, client).client.session
    assert connect(b, client, old).client.session_reused
    assert ticket_names(counter) == {k0.export()[:16]}

    write_atomic(previous, k0.export())  # the old key becomes the second one
    write_atomic(current, k1.export())  # and the new one encrypts
    took = wait_for(
        lambda: all(ids(w.keys) == [k1.id, k0.id] for w in watchers),
        "the new key in every watcher",
    )
    print(f"\nrename followed in {took * 1000:.0f} ms (interval {FAST * 1000:.0f} ms)")

    new = connect(a, client).client.session
    assert ticket_names(counter) == {k1.export()[:16]}
    assert connect(b, client, new).client.session_reused  # A's new ticket on B
    assert connect(b, client, old).client.session_reused  # old key, listed 2nd
    assert connect(a, client, old).client.session_reused
    assert ticket_names(counter) == {k1.export()[:16]}  # renewed under k1

    write_atomic(previous, k1.export())  # rotate again: k0 is dropped
    write_atomic(current, k2.export())
    wait_for(
        lambda: all(ids(w.keys) == [k2.id, k1.id] for w in watchers),
        "the second rotation",
    )
    assert not connect(b, client, old).client.session_reused
    assert connect(b, client, new).client.session_reused
    assert all(w.errors == {} and w.last_error is None for w in watchers)


def _k8s_secret(root: Path, version: int, files: dict[str, bytes]) -> None:
    """Kubernetes' AtomicWriter: the files in a fresh timestamped folder,
    then ``..data`` switched to it by renaming a new symlink over it; the
    user-visible names are ``name -> ..data/name``, made once."""
    folder = root / f"..2024_01_01_00_00_0{version}.{version}"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    (root / "..data_tmp").symlink_to(folder.name)
    os.replace(root / "..data_tmp", root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)
    if old is not None:
        shutil.rmtree(root / old)


def test_kubernetes_secret_symlink_swap(
    tmp_path: Path, watch: Watch, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    k0, k1, spare = (TicketKey.generate() for _ in range(3))
    _k8s_secret(tmp_path, 1, {"current": k0.export(), "previous": spare.export()})
    server = server_ctx()
    watcher = watch(
        server, [tmp_path / "current", tmp_path / "previous"], interval=FAST
    )
    client = client_ctx()
    counter = TicketCounter(client)
    old = connect(server, client).client.session
    assert ticket_names(counter) == {k0.export()[:16]}

    _k8s_secret(tmp_path, 2, {"current": k1.export(), "previous": k0.export()})
    wait_for(lambda: ids(watcher.keys) == [k1.id, k0.id], "the swapped secret")
    assert connect(server, client, old).client.session_reused
    assert ticket_names(counter) == {k1.export()[:16]}
    assert watcher.errors == {}


def test_the_signature_covers_the_symlink_chain(tmp_path: Path) -> None:
    """``..data`` switched to a folder holding a hard link of the same file:
    the file's stat (dev, ino, size, mtime) is unchanged, the link chain
    is not, so the swap is seen; re-reading finds the same key."""
    key = TicketKey.generate()
    one = tmp_path / "..v1"
    one.mkdir()
    (one / "key").write_bytes(key.export())
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "key").symlink_to("..data/key")
    path = str(tmp_path / "key")
    before, chain = os.stat(path), _link_chain(path)
    assert [link[:2] for link in chain] == [
        (path, "..data/key"),
        (str(tmp_path / "..data"), "..v1"),
    ]
    sig = _signature(path)

    two = tmp_path / "..v2"
    two.mkdir()
    os.link(one / "key", two / "key")
    (tmp_path / "..tmp").symlink_to("..v2")
    os.replace(tmp_path / "..tmp", tmp_path / "..data")
    after = os.stat(path)
    fields = ("st_dev", "st_ino", "st_size", "st_mtime_ns")
    assert [getattr(before, f) for f in fields] == [getattr(after, f) for f in fields]
    assert _link_chain(path) != chain
    assert _signature(path) != sig
    sig = _signature(path)
    os.chmod(two / "key", 0o400)  # fixing a permission is a change too
    assert _signature(path) != sig
    # A relative path with ".." and a loop resolve like the kernel does.
    assert _link_chain(str(tmp_path / "..v1" / ".." / "key")) == _link_chain(path)
    (tmp_path / "loop").symlink_to("loop")
    assert _link_chain(str(tmp_path / "loop"))[-1][1] == "ELOOP"


# --- bad files -----------------------------------------------------------------


def _break(kind: str, path: Path) -> str:
    """Make ``path`` bad in the way ``kind`` says; returns a word its
    problem message contains."""
    if kind == "wrong size":
        write_atomic(path, bytes(37))
        return "this one 37"
    if kind == "half-written in place":
        with open(path, "r+b") as f:  # a writer caught mid-way
            f.truncate(40)
        return "this one 40"
    if kind == "FIFO":
        tmp = path.with_name("fifo")
        os.mkfifo(tmp)  # no writer: reading it would block forever
        os.replace(tmp, path)
        return "FIFO"
    if kind == "deleted":
        path.unlink()
        return "No such file or directory"
    if kind == "directory":
        path.unlink()
        path.mkdir()
        return "directory"
    if kind == "unreadable":
        path.chmod(0)
        return "Permission denied"
    raise AssertionError(kind)


def _repair(path: Path, data: bytes) -> None:
    if path.is_dir():
        path.rmdir()
    if path.exists():
        path.chmod(0o600)
    write_atomic(path, data)


@pytest.mark.parametrize(
    "kind",
    [
        "wrong size",
        "half-written in place",
        "FIFO",
        "deleted",
        "directory",
        pytest.param(
            "unreadable",
            marks=pytest.mark.skipif(
                os.geteuid() == 0, reason="root reads a mode-0 file"
            ),
        ),
    ],
)
def test_a_bad_file_changes_nothing_and_is_reported_once(
    kind: str,
    tmp_path: Path,
    watch: Watch,
    reports: Callable[[], list[str]],
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    k0, k1, k2 = (TicketKey.generate() for _ in range(3))
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    current.write_bytes(k0.export())
    previous.write_bytes(k1.export())
    server = server_ctx()
    watcher = watch(server, [current, previous], interval=FAST)
    client = client_ctx()
    counter = TicketCounter(client)
    session = connect(server, client).client.session

    word = _break(kind, current)
    wait_for(lambda: str(current) in watcher.errors, "the problem to be seen")
    checks = watcher._checks
    wait_for(lambda: watcher._checks >= checks + 3, "three more checks")
    assert watcher.reload() is False  # a forced re-read: nothing new either
    assert watcher.reload() is False

    assert ids(watcher.keys) == [k0.id, k1.id]  # nothing dropped or changed
    assert watcher.running
    assert connect(server, client, session).client.session_reused
    assert ticket_names(counter) == {k0.export()[:16]}  # k0 still encrypts
    [message] = reports()  # exactly one report, on both channels
    assert str(current) in message and word in message
    assert watcher.errors[str(current)] in message
    assert watcher.last_error is not None and watcher.last_error in message
    no_key_bytes(message, k0.export(), k1.export())
    no_key_bytes(repr(watcher), k0.export(), k1.export())

    _repair(current, k2.export())  # fixed: the new key loads
    wait_for(lambda: ids(watcher.keys) == [k2.id, k1.id], "the repaired file")
    assert watcher.errors == {}
    assert not connect(server, client, session).client.session_reused  # k0 gone
    fresh = connect(server, client).client.session
    assert connect(server, client, fresh).client.session_reused
    assert ticket_names(counter) == {k2.export()[:16]}
    assert len(reports()) == 1


def test_each_distinct_problem_is_reported_once(
    tmp_path: Path, watch: Watch, reports: Callable[[], list[str]], server_ctx: Any
) -> None:
    """Missing, then half-written, then good, then missing again: three
    problems, three reports; a clash of key names is one too."""
    k0, k1 = TicketKey.generate(), TicketKey.generate()
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    current.write_bytes(k0.export())
    previous.write_bytes(k1.export())
    server = server_ctx()  # the watcher only holds a weak reference
    watcher = watch(server, [current, previous], interval=FAST)

    def seen(word: str) -> Callable[[], bool]:
        return lambda: word in watcher.errors.get(str(current), "")

    current.unlink()
    wait_for(seen("No such file"), "missing")
    current.write_bytes(bytes(10))
    wait_for(seen("this one 10"), "half-written")
    assert len(reports()) == 2
    current.write_bytes(bytes(20))  # still half-written, another size
    wait_for(seen("this one 20"), "still half-written")
    write_atomic(current, k0.export())
    wait_for(lambda: watcher.errors == {}, "the repair")
    current.unlink()
    wait_for(seen("No such file"), "missing again")
    write_atomic(current, k0.export())
    wait_for(lambda: watcher.errors == {}, "the second repair")
    assert ids(watcher.keys) == [k0.id, k1.id]
    assert [m.split("': ")[1].split(";")[0] for m in reports()] == [
        "No such file or directory (FileNotFoundError)",
        "a ticket key file holds 80 or 48 bytes, this one 10",
        "a ticket key file holds 80 or 48 bytes, this one 20",
        "No such file or directory (FileNotFoundError)",
    ]

    # previous gets a different key with current's name: refused as a whole
    clash = k0.export()[:16] + os.urandom(64)
    write_atomic(previous, clash)
    wait_for(lambda: str(previous) in watcher.errors, "the clash")
    assert watcher.reload() is False
    assert ids(watcher.keys) == [k0.id, k1.id]
    assert "name of the key in" in reports()[-1] and len(reports()) == 5
    write_atomic(previous, k0.export())  # the same key twice: listed once
    wait_for(lambda: ids(watcher.keys) == [k0.id], "the duplicate")
    assert watcher.errors == {} and len(reports()) == 5


def test_reload_and_warning_filters(
    tmp_path: Path, watch: Watch, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """reload() checks synchronously and says whether the keys changed; a
    KeyFileWarning made an error is raised by reload() and does not kill the
    thread."""
    k0, k1 = TicketKey.generate(), TicketKey.generate()
    path = tmp_path / "key"
    path.write_bytes(k0.export())
    server = server_ctx()
    watcher = watch(server, path, interval=3600)  # the thread never checks
    assert watcher.reload() is False
    write_atomic(path, k1.export())
    assert ids(watcher.keys) == [k0.id]
    assert watcher.reload() is True
    assert ids(watcher.keys) == [k1.id]
    assert watcher.reload() is False

    with warnings.catch_warnings():
        warnings.simplefilter("error", KeyFileWarning)
        path.write_bytes(b"short")
        with pytest.raises(KeyFileWarning, match="this one 5"):
            watcher.reload()
        assert ids(watcher.keys) == [k1.id]  # the check completed first
        assert watcher.reload() is False  # reported once: no second raise
        other = tmp_path / "other"
        other.write_bytes(k0.export())
        other_server = server_ctx()
        quick = watch(other_server, other, interval=FAST)
        other.write_bytes(b"short")
        wait_for(lambda: quick.errors, "the thread's report")
        checks = quick._checks
        wait_for(lambda: quick._checks > checks, "one more check")
        assert quick.running  # the raised warning did not end the thread
    client = client_ctx()
    session = connect(server, client).client.session
    assert connect(server, client, session).client.session_reused


# --- lifetime --------------------------------------------------------------------


def test_stop_joins_is_idempotent_and_the_thread_is_a_daemon(
    tmp_path: Path, server_ctx: CtxFactory
) -> None:
    k0, k1 = TicketKey.generate(), TicketKey.generate()
    path = tmp_path / "key"
    path.write_bytes(k0.export())
    before = len(watcher_threads())
    server = server_ctx()
    with watch_ticket_keys(server, [path], interval=FAST) as watcher:
        [thread] = [t for t in watcher_threads() if t.name == "tlsctl-keys:key"]
        assert thread.daemon and thread.is_alive() and watcher.running
        assert len(watcher_threads()) == before + 1
    assert not thread.is_alive() and not watcher.running  # joined on exit
    watcher.stop()
    watcher.stop()
    checks = watcher._checks
    write_atomic(path, k1.export())
    time.sleep(4 * FAST)  # a stopped watcher does not check any more
    assert watcher._checks == checks and ids(watcher.keys) == [k0.id]
    assert watcher.reload() is True  # but reload() still works
    assert len(watcher_threads()) == before
    with pytest.raises(TypeError, match="watch_ticket_keys"):
        KeyWatcher()


def test_the_thread_does_not_keep_the_interpreter_alive(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(TicketKey.generate().export())
    code = (
        "import ssl, sys, tlsctl._keyfiles as k\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "w = k.watch_ticket_keys(ctx, [sys.argv[1]], interval=3600)\n"
        "assert w.running\n"
        "print('started')\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "started\n"
    assert time.monotonic() - start < 20


def test_the_watcher_ends_with_its_contexts(
    tmp_path: Path, server_ctx: CtxFactory
) -> None:
    """Weak references: once every context is gone the thread ends and the
    keys are dropped."""
    path = tmp_path / "key"
    path.write_bytes(TicketKey.generate().export())
    ctx = server_ctx()
    watcher = watch_ticket_keys(ctx, [path], interval=FAST)
    key = weakref.ref(watcher.keys[0])
    assert watcher.contexts == [ctx]
    del ctx
    gc.collect()
    wait_for(lambda: not watcher.running, "the thread to end")
    assert watcher.keys == [] and watcher.contexts == []
    gc.collect()
    assert key() is None
    assert watcher.reload() is False
    watcher.stop()


def test_replaced_keys_are_not_kept(
    tmp_path: Path, watch: Watch, server_ctx: CtxFactory
) -> None:
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    current.write_bytes(TicketKey.generate().export())
    previous.write_bytes(TicketKey.generate().export())
    server = server_ctx()
    watcher = watch(server, [current, previous], interval=FAST)
    refs = [weakref.ref(k) for k in watcher.keys]
    first = watcher.keys[0].id
    write_atomic(previous, current.read_bytes())
    write_atomic(current, TicketKey.generate().export())
    wait_for(lambda: watcher.keys[1].id == first, "the rotation")
    gc.collect()
    assert refs[0]() is None  # re-read from "previous": a new object
    assert refs[1]() is None  # no longer listed at all


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_keeps_reloading(
    tmp_path: Path, server_ctx: CtxFactory, client_ctx: CtxFactory, watch: Watch
) -> None:
    """gunicorn's preload_app: the watcher is made in the master, which
    forks.  The child gets a thread of its own that follows the file (and
    issues tickets under the new key); the parent's thread goes on too."""
    k0, k1, k2 = (TicketKey.generate() for _ in range(3))
    path = tmp_path / "key"
    path.write_bytes(k0.export())
    server = server_ctx()
    watcher = watch(server, [path], interval=FAST)
    client = client_ctx()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once, whatever happens
        report: dict[str, Any] = {}
        try:
            signal.alarm(20)
            os.close(ready_r)
            os.close(go_w)
            report["threads"] = len(watcher_threads())
            report["running"] = watcher.running
            os.write(ready_w, b"ready\n")
            os.read(go_r, 1)  # the parent wrote k1
            report["waited"] = wait_for(
                lambda: ids(watcher.keys) == [k1.id], "the child's reload"
            )
            counter = TicketCounter(client)
            connect(server, client)
            report["ticket_key"] = list(ticket_names(counter)) == [k1.export()[:16]]
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(ready_w, json.dumps(report).encode() + b"\n")
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        with os.fdopen(ready_r, "rb") as pipe:
            assert select.select([pipe], [], [], DEADLINE)[0], "the child hung"
            assert pipe.readline() == b"ready\n"
            assert watcher.running  # the parent's thread was restarted
            write_atomic(path, k1.export())
            os.write(go_w, b"g")
            assert select.select([pipe], [], [], 2 * DEADLINE)[0], "the child hung"
            child = json.loads(pipe.readline())
    finally:
        os.close(go_w)
        deadline = time.monotonic() + DEADLINE
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child did not exit")
            time.sleep(0.01)
    assert child == {
        "threads": 1,
        "running": True,
        "waited": child.get("waited"),
        "ticket_key": True,
    }, child
    wait_for(lambda: ids(watcher.keys) == [k1.id], "the parent's reload")
    write_atomic(path, k2.export())  # the parent keeps following, after fork
    wait_for(lambda: ids(watcher.keys) == [k2.id], "the parent's next reload")
    assert watcher.reload() is False  # no lock left held by the fork hooks


# --- the first load and misuse ---------------------------------------------------


def test_first_load_formats_and_arguments(
    tmp_path: Path, watch: Watch, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """nginx's 48-byte format too; one path or one context need no list;
    a relative path is resolved against the current directory now."""
    k80, k48 = TicketKey.generate(), TicketKey(os.urandom(48))
    (tmp_path / "k80").write_bytes(k80.export())
    (tmp_path / "k48").write_bytes(k48.export())
    server = server_ctx()
    watcher = watch((c for c in [server, server]), tmp_path / "k48", interval=1)
    assert ids(watcher.keys) == [k48.id] and watcher.contexts == [server]
    assert watcher.paths == (str(tmp_path / "k48"),) and watcher.interval == 1.0
    watcher.stop()
    with _chdir(tmp_path):
        watcher = watch(server, ["k80", "k48"])
    assert watcher.paths == (str(tmp_path / "k80"), str(tmp_path / "k48"))
    assert ids(watcher.keys) == [k80.id, k48.id]
    client = client_ctx()
    session = connect(server, client).client.session
    other = tlsctl.set_ticket_keys(server_ctx(), [k80])
    assert connect(other, client, session).client.session_reused
    assert repr(watcher).startswith("<KeyWatcher paths=[")
    assert k80.id in repr(watcher)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:  # contextlib.chdir is 3.11+
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_a_bad_first_load_raises_and_starts_nothing(
    tmp_path: Path, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    good = tmp_path / "good"
    good.write_bytes(TicketKey.generate().export())
    short = tmp_path / "short"
    short.write_bytes(bytes(50))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    clash = tmp_path / "clash"
    clash.write_bytes(good.read_bytes()[:16] + bytes(64))
    server = server_ctx()
    before = len(watcher_threads())
    cases: list[tuple[Any, Any, dict[str, Any], type[Exception], str]] = [
        (server, [good, tmp_path / "missing"], {}, FileNotFoundError, "missing"),
        (server, [short], {}, ValueError, "this one 50"),
        (server, [fifo], {}, ValueError, "FIFO"),
        (server, [good, clash], {}, ValueError, "name of the key"),
        (server, [], {}, ValueError, "at least one key file"),
        (server, [""], {}, ValueError, "empty"),
        (server, b"good", {}, TypeError, "paths must be"),
        (server, [b"good"], {}, TypeError, "not bytes"),
        (server, [good], {"interval": 0}, ValueError, "positive"),
        (server, [good], {"interval": -1}, ValueError, "positive"),
        (server, [good], {"interval": float("nan")}, ValueError, "positive"),
        (server, [good], {"interval": "1"}, TypeError, "seconds"),
        (server, [good], {"interval": True}, TypeError, "seconds"),
        ([], [good], {}, ValueError, "at least one context"),
        (None, [good], {}, TypeError, "ssl.SSLContext"),
        ("ctx", [good], {}, TypeError, "ssl.SSLContext"),
        ([server, object()], [good], {}, TypeError, "not object"),
        ([server, client_ctx()], [good], {}, ValueError, "server context"),
    ]
    for ctx, paths, kw, error, match in cases:
        with pytest.raises(error, match=match):
            watch_ticket_keys(ctx, paths, **kw)
    assert len(watcher_threads()) == before


def test_one_watcher_per_context(
    tmp_path: Path, watch: Watch, server_ctx: CtxFactory
) -> None:
    """Two watchers of one context would install their files' keys in turn."""
    a, b = TicketKey.generate(), TicketKey.generate()
    (tmp_path / "a").write_bytes(a.export())
    (tmp_path / "b").write_bytes(b.export())
    one, two = server_ctx(), server_ctx()
    first = watch([one, two], tmp_path / "a", interval=FAST)
    for ctx in (one, [two], [server_ctx(), one]):
        with pytest.raises(ValueError, match="already watched by <KeyWatcher"):
            watch_ticket_keys(ctx, tmp_path / "b")
    assert ids(first.keys) == [a.id]
    first.stop()
    second = watch(two, tmp_path / "b", interval=FAST)
    assert ids(second.keys) == [b.id] and second.running


def test_importing_it_costs_little() -> None:
    """threading and logging (not imported by ssl) wait for the first
    watcher: ``import tlsctl`` (which imports this module) loads neither."""
    code = (
        "import sys, ssl\n"
        "before = {m for m in ('threading', 'logging') if m in sys.modules}\n"
        "import tlsctl, tlsctl._keyfiles\n"
        "now = {m for m in ('threading', 'logging') if m in sys.modules}\n"
        "print(sorted(now - before))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
