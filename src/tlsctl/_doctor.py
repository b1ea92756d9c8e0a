"""``python -m tlsctl doctor``: what tlsctl bound to here, what works, and
one live patched exchange with resumption (needs trustme, the demo extra)."""

from __future__ import annotations

import sys

import tlsctl
from tlsctl import scenarios

# What doctor's two live connections should deliver.
_DOCTOR_TICKETS = "(2 after the full handshake + 1 after the resumed one)"


def doctor() -> int:
    """``python -m tlsctl doctor``: what was bound, and one live check."""
    info = tlsctl.info()
    print(f"tlsctl {tlsctl.__version__} on Python {sys.version.split()[0]}")
    for name in type(info)._fields:
        value = getattr(info, name)
        if name == "openssl_version_number":
            value = f"{value:#x}"
        print(f"  {name:24} {value}")
    if info.mechanism == "python":  # tlsctl-pymech
        return _doctor_python()
    if not info.bound:
        print("not bound: patch() will raise BindingError")
        return 1
    try:
        import trustme  # noqa: F401
    except ImportError:
        print("live check skipped: install tlsctl[demo] (trustme) to run it")
        return 0
    policy = "defer" if info.mechanism else "immediate"
    if info.mechanism is None:
        print(
            "tickets='defer' is unavailable here (no SSL_new_session_ticket); "
            "the live check uses tickets='immediate'"
        )
    certs = scenarios.make_certs(client_sans=1)
    server = tlsctl.patch(scenarios.server_context(certs), tickets=policy)
    result = scenarios.request_response(
        server, scenarios.client_context(certs), connections=2
    )
    ok = result.replies_ok == 2 and result.resumed == 1 and result.tickets > 0
    print(
        f"live patched handshake (tickets={policy!r}): replies "
        f"{result.replies_ok}/2, tickets delivered {result.tickets} "
        f"{_DOCTOR_TICKETS}, resumed "
        f"{result.resumed}/1 -> {'OK' if ok else 'FAILED'}"
    )
    _doctor_quickack()
    return 0 if ok else 1


# --- tlsctl-pymech ----------------------------------------------------------
def _doctor_python() -> int:
    """doctor under the python mechanism: what works here, and one live
    patched memory-BIO exchange with resumption."""
    from tlsctl import _pyhold

    print("what works here (mechanism python):")
    for subject, verdict in _pyhold.support():
        print(f"  {subject:24} {verdict}")
    try:
        import trustme  # noqa: F401
    except ImportError:
        print("live check skipped: install tlsctl[demo] (trustme) to run it")
        return 0
    import warnings

    certs = scenarios.make_certs(client_sans=1)
    with warnings.catch_warnings():  # its news is printed above
        warnings.simplefilter("ignore", _pyhold.SocketsNotDeferredWarning)
        server = tlsctl.patch(scenarios.server_context(certs))
    result = scenarios.memory_bio_request_response(
        server, scenarios.client_context(certs), connections=2
    )
    ok = (
        result.replies_ok == 2
        and result.resumed == 1
        and result.early_bytes == 0
        and result.tickets > 0
    )
    print(
        f"live patched memory-BIO exchange (tickets='defer'): replies "
        f"{result.replies_ok}/2, bytes sent between handshake and first write "
        f"{result.early_bytes}, tickets delivered {result.tickets} "
        f"{_DOCTOR_TICKETS}, resumed "
        f"{result.resumed}/1 -> {'OK' if ok else 'FAILED'}"
    )
    _doctor_quickack()
    return 0 if ok else 1


# --- end tlsctl-pymech ------------------------------------------------------


def _doctor_quickack() -> None:
    """Where tlsctl can spare clients without TCP_NODELAY the delayed-ACK
    stall (TCP_QUICKACK after the handshake; see the README's FAQ)."""
    import importlib
    import socket

    from tlsctl import _quickack

    if not hasattr(socket, "TCP_QUICKACK"):
        print(f"  {'quickack':36} unavailable (no TCP_QUICKACK on this system)")
        return
    if tlsctl.info().mechanism == "python":  # tlsctl-pymech
        print(f"  {'quickack sockets':36} not needed (sockets are stock here)")
    else:
        print(f"  {'quickack sockets':36} active (set in C when the handshake is done)")
    # What a server here would get: every hooked module that imports.
    modules = [module for module, _, _ in _quickack._HOOKS.values()]
    for name in ("asyncio", "trio", "uvloop", *modules):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for framework, state in _quickack.status().items():
        print(f"  {'quickack ' + framework:36} {state}")
