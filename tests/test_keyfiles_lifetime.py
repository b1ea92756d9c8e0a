"""tlsctl.watch_ticket_keys: the watcher's lifetime (stop, its daemon thread,
weak references to the contexts, fork()) and its first load and misuse.
test_keyfiles.py has following changes and bad files; _keyfile_helpers.py
what both use.  Real files in tmp_path, real handshakes, real threads and
a real fork().
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _keyfile_helpers as common
import tlsctl
from _keyfile_helpers import FAST, CtxFactory, Watch, ids, wait_for, write_atomic
from conftest import connect
from tlsctl import TicketKey
from tlsctl._keyfiles import KeyWatcher, watch_ticket_keys
from tlsctl.scenarios import TicketCounter


@pytest.fixture
def watch() -> Iterator[Watch]:
    """watch_ticket_keys, every watcher stopped at teardown."""
    yield from common.watchers()


# --- lifetime --------------------------------------------------------------------


def test_stop_joins_is_idempotent_and_the_thread_is_a_daemon(
    tmp_path: Path, server_ctx: CtxFactory
) -> None:
    k0, k1 = TicketKey.generate(), TicketKey.generate()
    path = tmp_path / "key"
    path.write_bytes(k0.export())
    before = len(common.watcher_threads())
    server = server_ctx()
    with watch_ticket_keys(server, [path], interval=FAST) as watcher:
        [thread] = [t for t in common.watcher_threads() if t.name == "tlsctl-keys:key"]
        assert thread.daemon and thread.is_alive() and watcher.running
        assert len(common.watcher_threads()) == before + 1
    assert not thread.is_alive() and not watcher.running  # joined on exit
    watcher.stop()
    watcher.stop()
    checks = watcher._checks
    write_atomic(path, k1.export())
    time.sleep(4 * FAST)  # a stopped watcher does not check any more
    assert watcher._checks == checks and ids(watcher.keys) == [k0.id]
    assert watcher.reload() is True  # but reload() still works
    assert len(common.watcher_threads()) == before
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
            report["threads"] = len(common.watcher_threads())
            report["running"] = watcher.running
            os.write(ready_w, b"ready\n")
            os.read(go_r, 1)  # the parent wrote k1
            report["waited"] = wait_for(
                lambda: ids(watcher.keys) == [k1.id], "the child's reload"
            )
            counter = TicketCounter(client)
            connect(server, client)
            report["ticket_key"] = list(common.ticket_names(counter)) == [
                k1.export()[:16]
            ]
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(ready_w, json.dumps(report).encode() + b"\n")
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        with os.fdopen(ready_r, "rb") as pipe:
            assert select.select([pipe], [], [], common.DEADLINE)[0], "the child hung"
            assert pipe.readline() == b"ready\n"
            assert watcher.running  # the parent's thread was restarted
            write_atomic(path, k1.export())
            os.write(go_w, b"g")
            assert select.select([pipe], [], [], 2 * common.DEADLINE)[0], (
                "the child hung"
            )
            child = json.loads(pipe.readline())
    finally:
        os.close(go_w)
        deadline = time.monotonic() + common.DEADLINE
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
    before = len(common.watcher_threads())
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
    assert len(common.watcher_threads()) == before


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
