"""tlsctl.inject_into_ssl / extract_from_ssl and the zero-code launcher
(``python -m tlsctl run``): every server context of a process and of its
process tree, whoever made it."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import bio_pair, connect, needs_defer, split_records
from tlsctl import TicketKey, _inject
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]

pytestmark = needs_defer


@pytest.fixture(autouse=True)
def _extracted() -> Iterator[None]:
    yield
    tlsctl.extract_from_ssl()


def _deferred(server: ssl.SSLContext, client: ssl.SSLContext) -> int:
    """Tickets with the first write, after nothing at the handshake."""
    pair = bio_pair(server, client)
    pair.handshake()
    assert pair.s_out.pending == 0, "a ticket went out with the handshake"
    pair.server.write(b"x")
    return len(split_records(pair.s_out.read())) - 1


def _stock_tickets_at_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> int:
    pair = bio_pair(server, client)
    pair.handshake()
    return len(split_records(pair.s_out.read()))


def test_contexts_made_before_and_after_are_adopted(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    before = server_ctx()
    tlsctl.inject_into_ssl()
    after = server_ctx()
    assert _deferred(before, client_ctx()) == 2
    assert _deferred(after, client_ctx()) == 2
    assert tlsctl.connection_state(connect(after, client_ctx()).server).issued == 2
    info = _inject.injected()
    assert info is not None and info["contexts"] == 2
    assert info["generated_master"] and info["rotate_every"] == 3600
    assert info["keep"] == 2 and info["ticket_keys"] is None
    assert before.num_tickets == 2  # the user's knob, untouched


def test_client_side_and_unservable_contexts_stay_stock(
    server_ctx: CtxFactory, client_ctx: CtxFactory, certs: Any
) -> None:
    tlsctl.inject_into_ssl()
    client = client_ctx()
    pair = connect(server_ctx(), client)  # the client side: never adopted
    assert "_tlsctl_plan" not in vars(client)
    assert pair.client.session is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fixed = ssl.SSLContext(ssl.PROTOCOL_TLSv1_2)  # tlsctl cannot prove it
    certs.server.configure_cert(fixed)
    assert _stock_tickets_at_handshake(fixed, client_ctx()) >= 0  # works, stock
    assert vars(fixed)["_tlsctl_plan"] is False
    assert _inject.injected()["contexts"] == 1  # type: ignore[index]


def test_a_context_per_connection_resumes_with_the_injected_key(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """gunicorn's sync and gthread workers make a new context per
    connection: with stock keys nothing ever resumes."""
    tlsctl.inject_into_ssl()
    client = client_ctx()
    session = connect(server_ctx(), client).client.session
    resumed = 0
    for _ in range(5):
        pair = connect(server_ctx(), client, session)
        resumed += pair.client.session_reused
        session = pair.client.session
    assert resumed == 5


def test_the_owners_policy_and_keys_stay(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    own_key = TicketKey.generate()
    mine = tlsctl.patch(server_ctx(), tickets="suppress")
    keyed = tlsctl.set_ticket_keys(server_ctx(), [own_key])
    tlsctl.inject_into_ssl()
    assert _deferred(mine, client_ctx()) == 0  # still suppress
    client = client_ctx()
    counter = TicketCounter(client)
    connect(keyed, client)
    assert set(counter.key_names) == {own_key.export()[:16]}


def test_inject_again_rotates_and_extract_restores(
    server_ctx: CtxFactory, client_ctx: CtxFactory, tmp_path: Path
) -> None:
    k1, k2 = TicketKey.generate(), TicketKey.generate()
    (tmp_path / "k1").write_bytes(k1.export())
    tlsctl.inject_into_ssl(ticket_keys=[tmp_path / "k1"])  # a path
    server = server_ctx()
    client = client_ctx()
    counter = TicketCounter(client)
    session = connect(server, client).client.session
    assert counter.key_names == [k1.export()[:16]] * 2
    tlsctl.inject_into_ssl(ticket_keys=[k2, k1])  # rotation, for adopted too
    pair = connect(server, client, session)
    assert pair.client.session_reused  # under the old key, still listed
    assert counter.key_names[-1] == k2.export()[:16]  # renewed under the new
    tlsctl.extract_from_ssl()
    tlsctl.extract_from_ssl()  # idempotent
    assert _stock_tickets_at_handshake(server, client_ctx()) > 0  # stock again
    assert _inject.injected() is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one of"):
        tlsctl.inject_into_ssl(tickets="later")
    with pytest.raises(ValueError, match="tickets='suppress'"):
        tlsctl.inject_into_ssl(tickets="suppress", count=1)
    with pytest.raises(TypeError, match="not a single one"):
        tlsctl.inject_into_ssl(ticket_keys="/etc/key")
    with pytest.raises(FileNotFoundError):
        tlsctl.inject_into_ssl(ticket_keys=["/nonexistent/key"])
    assert _inject.injected() is None  # nothing half-done


def test_threads_adopting_one_context(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    tlsctl.inject_into_ssl()
    server = server_ctx()
    client = client_ctx()
    counts: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        n = _deferred(server, client)
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [2] * 8
    assert _inject.injected()["contexts"] == 1  # type: ignore[index]


# --- the launcher -------------------------------------------------------------

_CHILD = r"""
import json, os, ssl, sys
sys.path[:0] = [{tests!r}]


def check(role):
    from tlsctl import _inject, scenarios
    from conftest import bio_pair
    certs = scenarios.make_certs(client_sans=1)
    server = scenarios.server_context(certs)  # a plain context: nobody patches it
    pair = bio_pair(server, scenarios.client_context(certs))
    pair.handshake()
    print(json.dumps(dict(role=role, held=pair.s_out.pending == 0,
                          injected=_inject.injected(),
                          site=os.environ.get("OTHER_SITE_RAN"))), flush=True)


if __name__ == "__main__":
    check(sys.argv[1])
    if sys.argv[1] == "parent":
        import multiprocessing, subprocess
        spawn = multiprocessing.get_context("spawn")
        p = spawn.Process(target=check, args=("spawned",))
        p.start()
        p.join()
        subprocess.run([sys.executable, __file__, "exec"], check=True)
"""


def test_launcher_injects_the_whole_process_tree(tmp_path: Path) -> None:
    """``python -m tlsctl run -- python child.py``: the child, a process it
    spawns and a Python it execs all inject, with the same key file, and an
    existing sitecustomize still runs."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
    key = tmp_path / "ticket.key"
    key.write_bytes(TicketKey.generate().export())
    other = tmp_path / "other-site"
    other.mkdir()
    (other / "sitecustomize.py").write_text(
        "import os\nos.environ['OTHER_SITE_RAN'] = 'yes'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(other))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlsctl",
            "run",
            "--ticket-keys",
            str(key),
            "--",
            sys.executable,
            str(script),
            "parent",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["role"] for line in lines] == ["parent", "spawned", "exec"]
    key_id = TicketKey.from_file(key).id
    for line in lines:
        assert line["held"], line
        assert line["injected"]["ticket_keys"] == [key_id], line
        assert line["injected"]["watched"] == [str(key)], line
        assert line["site"] == "yes", line


def test_launcher_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    for args in (
        ["--ticket-keys", str(tmp_path / "missing")],
        ["--tickets", "suppress", "--count", "2"],
        [],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tlsctl", "run", *args, "--"]
            + ([sys.executable, "-c", "pass"] if args else []),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "tlsctl run: error:" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_environment_switch_fails_loudly_on_a_bad_key_file(tmp_path: Path) -> None:
    """The launcher's environment, set by hand (a container's ENV): a key
    file that vanished stops the process instead of serving without it."""
    hook = Path(tlsctl.__file__).parent / "site-hook"
    env = dict(
        os.environ,
        PYTHONPATH=str(hook),
        TLSCTL_INJECT="defer",
        TLSCTL_INJECT_TICKET_KEYS=str(tmp_path / "gone"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", "print('served')"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2 and "served" not in proc.stdout
    assert "tlsctl run: injection failed" in proc.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
            from tlsctl import _inject
            print(_inject.injected()["tickets"])
        """),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(env, TLSCTL_INJECT="suppress", TLSCTL_INJECT_TICKET_KEYS=""),
    )
    assert ok.stdout.strip() == "suppress", ok.stderr


def test_master_rotation_lifetime_and_watched_files(
    server_ctx: CtxFactory, client_ctx: CtxFactory, tmp_path: Path
) -> None:
    """Injection takes issue 16's options: keys derived from a master (two
    processes with the same master share them: here two contexts), a
    ticket lifetime, and key files reloaded when replaced."""
    master = TicketKey.generate()
    tlsctl.inject_into_ssl(
        ticket_key_master=master, rotate_every=60, ticket_lifetime=90
    )
    a, b = server_ctx(), server_ctx()
    client = client_ctx()
    session = connect(a, client).client.session
    assert session is not None and session.ticket_lifetime_hint == 90
    assert connect(b, client, session).client.session_reused
    reference = tlsctl.rotate_ticket_keys(server_ctx(), every=60, master=master)
    assert connect(reference, client, session).client.session_reused
    info = _inject.injected()
    assert info is not None and info["master"] == master.id
    assert not info["generated_master"]
    tlsctl.extract_from_ssl()
    assert connect(a, client).client.session.ticket_lifetime_hint == 7200  # type: ignore[union-attr]

    k1, k2 = TicketKey.generate(), TicketKey.generate()
    path = tmp_path / "ticket.key"
    path.write_bytes(k1.export())
    tlsctl.inject_into_ssl(ticket_keys=[path])
    c = server_ctx()
    counter = TicketCounter(client)
    connect(c, client)
    assert counter.key_names[-1] == k1.export()[:16]
    (tmp_path / "new").write_bytes(k2.export())
    os.replace(tmp_path / "new", path)  # as Vault Agent / consul-template do
    info = _inject.injected()
    assert info is not None and info["watched"] == [str(path)]
    import time

    deadline = time.monotonic() + 10
    while counter.key_names[-1] != k2.export()[:16]:
        assert time.monotonic() < deadline, "the injected key file was not reloaded"
        time.sleep(0.05)
        connect(c, client)
