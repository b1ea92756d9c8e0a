"""tlsctl.watch_ticket_keys: keys from files, reloaded when the files change.

Real files in tmp_path, real handshakes (conftest.connect), real threads and
a real fork().  Waits poll a condition against a deadline; the watchers
check every 0.05 s.  Following changes and bad files here; the watcher's
lifetime (stop, threads, weak references, fork) and its first load and
misuse in test_keyfiles_lifetime.py; what both use in _keyfile_helpers.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import _keyfile_helpers as common
from _keyfile_helpers import FAST, CtxFactory, Watch, ids, wait_for, write_atomic
from conftest import connect
from tlsctl import TicketKey
from tlsctl._keyfiles import KeyFileWarning
from tlsctl._keysig import _link_chain, _signature
from tlsctl.scenarios import TicketCounter


def no_key_bytes(text: str, *keys: bytes) -> None:
    for key in keys:
        for window in (key[i : i + 8] for i in range(0, len(key) - 8, 4)):
            assert window.hex() not in text
            assert repr(window)[2:-1] not in text


@pytest.fixture
def watch() -> Iterator[Watch]:
    """watch_ticket_keys, every watcher stopped at teardown."""
    yield from common.watchers()


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
    assert len(common.watcher_threads()) == len(watchers)  # one thread per watcher
    client = client_ctx()
    counter = TicketCounter(client)
    old = connect(a, client).client.session
    assert connect(b, client, old).client.session_reused
    assert common.ticket_names(counter) == {k0.export()[:16]}

    write_atomic(previous, k0.export())  # the old key becomes the second one
    write_atomic(current, k1.export())  # and the new one encrypts
    took = wait_for(
        lambda: all(ids(w.keys) == [k1.id, k0.id] for w in watchers),
        "the new key in every watcher",
    )
    print(f"\nrename followed in {took * 1000:.0f} ms (interval {FAST * 1000:.0f} ms)")

    new = connect(a, client).client.session
    assert common.ticket_names(counter) == {k1.export()[:16]}
    assert connect(b, client, new).client.session_reused  # A's new ticket on B
    assert connect(b, client, old).client.session_reused  # old key, listed 2nd
    assert connect(a, client, old).client.session_reused
    assert common.ticket_names(counter) == {k1.export()[:16]}  # renewed under k1

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
    assert common.ticket_names(counter) == {k0.export()[:16]}

    _k8s_secret(tmp_path, 2, {"current": k1.export(), "previous": k0.export()})
    wait_for(lambda: ids(watcher.keys) == [k1.id, k0.id], "the swapped secret")
    assert connect(server, client, old).client.session_reused
    assert common.ticket_names(counter) == {k1.export()[:16]}
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
        # in one step, as every kind here: the watcher never sees the file
        # missing in between (a directory cannot be renamed over a file; a
        # symbolic link to one can, and stat() follows it)
        folder, link = path.with_name("folder"), path.with_name("link")
        folder.mkdir()
        link.symlink_to(folder)
        os.replace(link, path)
        return "directory"
    if kind == "unreadable":
        path.chmod(0)
        return "Permission denied"
    raise AssertionError(kind)


def _repair(path: Path, data: bytes) -> None:
    if path.exists() and not path.is_symlink():
        path.chmod(0o600)
    write_atomic(path, data)  # over the bad file or link, in one step


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
    assert common.ticket_names(counter) == {k0.export()[:16]}  # k0 still encrypts
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
    assert common.ticket_names(counter) == {k2.export()[:16]}
    assert len(reports()) == 1


def _reported(reports: Callable[[], list[str]], n: int) -> Callable[[], bool]:
    """Whether n reports are out on both channels: the watcher records a
    problem, then reports it outside its lock (log record, then warning)."""

    def check() -> bool:
        try:
            return len(reports()) == n
        except AssertionError:  # between the log record and the warning
            return False

    return check


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
    # write_atomic: write_bytes() would show the watcher an empty file first
    write_atomic(current, bytes(10))
    wait_for(seen("this one 10"), "half-written")
    wait_for(_reported(reports, 2), "the second report")
    write_atomic(current, bytes(20))  # still half-written, another size
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
    wait_for(_reported(reports, 5), "the clash's report")
    assert "name of the key in" in reports()[-1]
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
