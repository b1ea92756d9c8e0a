"""tlsctl: control when TLS 1.3 session tickets leave a Python ``ssl`` server.

OpenSSL servers send NewSessionTicket messages right after the handshake,
whether or not the application ever writes.  Clients that upload and close
without reading then lose data (their kernel answers with RST), and clients
that write before reading can deadlock a handshake that has large tickets.
``tlsctl.patch(ctx)`` makes a server context send its tickets with the
server's first application write instead, as BoringSSL does, keeping session
resumption::

    import ssl, tlsctl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain("cert.pem", "key.pem")
    tlsctl.patch(ctx)              # tickets="defer" is the default

Public API: ``patch``, ``issue_tickets``, ``connection_state``, ``info``,
``ConnectionState``, ``Info``, ``POLICIES``, ``MAX_TICKETS``; session ticket callbacks
(``set_ticket_callbacks``, ``TicketDecision``, ``TicketStatus``,
``ResumeStatus``) and shared ticket keys for multi-process and
multi-machine servers (``set_ticket_keys``, ``TicketKey``, and from files,
reloaded on change: ``watch_ticket_keys``; rotated automatically, also
fleet-wide from one master: ``rotate_ticket_keys``;
``set_ticket_lifetime``); the exceptions rooted at ``TlsctlError``
(``NotBoundError`` where tlsctl cannot bind: PyPy, uv's Pythons, where
``defer`` serves memory-BIO connections only and says so once with
``SocketsNotDeferredWarning``);
``inject_into_ssl`` / ``extract_from_ssl`` for every server context of the
process (``python -m tlsctl run -- COMMAND`` does it for a process tree);
``quickack`` for a protocol of your own on uvloop (the delayed-ACK remedy).
``python -m tlsctl doctor`` shows what was bound; ``python -m tlsctl demo``
shows the bugs and the fix side by side.
"""

from tlsctl._bind import Info, info
from tlsctl._errors import (
    BindingError,
    ConnectionStateError,
    NotBoundError,
    OpenSSLError,
    TlsctlError,
    UnsupportedError,
)
from tlsctl._policy import (
    MAX_TICKETS,
    POLICIES,
    ConnectionState,
    connection_state,
    issue_tickets,
    patch,
)
from tlsctl._quickack import quickack

# The rest of the API loads with its first use (PEP 562): a server that only
# patches never imports the callback, key, key-file and injection modules,
# nor the python mechanism's (~2 ms of ``import tlsctl``;
# docs/performance.md, "Import").  Type checkers see the plain imports below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from tlsctl._inject import extract_from_ssl, inject_into_ssl
    from tlsctl._keyfiles import KeyFileWarning, KeyWatcher, watch_ticket_keys
    from tlsctl._lifecycle import (
        MAX_TICKET_LIFETIME,
        rotate_ticket_keys,
        set_ticket_lifetime,
    )
    from tlsctl._pyhold import SocketsNotDeferredWarning
    from tlsctl._tickets import (
        ResumeStatus,
        TicketDecision,
        TicketKey,
        TicketStatus,
        set_ticket_callbacks,
        set_ticket_keys,
    )

# {public name: the submodule that defines it}, for __getattr__.
_LAZY = {
    "extract_from_ssl": "_inject",
    "inject_into_ssl": "_inject",
    "KeyFileWarning": "_keyfiles",
    "KeyWatcher": "_keyfiles",
    "watch_ticket_keys": "_keyfiles",
    "MAX_TICKET_LIFETIME": "_lifecycle",
    "rotate_ticket_keys": "_lifecycle",
    "set_ticket_lifetime": "_lifecycle",
    "SocketsNotDeferredWarning": "_pyhold",
    "ResumeStatus": "_tickets",
    "TicketDecision": "_tickets",
    "TicketKey": "_tickets",
    "TicketStatus": "_tickets",
    "set_ticket_callbacks": "_tickets",
    "set_ticket_keys": "_tickets",
}


# Hidden from type checkers, which would otherwise accept any name (a typo
# included) as an attribute of the package.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """Load a lazily imported public name (and keep it in the module)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'tlsctl' has no attribute {name!r}")
        value = getattr(__import__(f"tlsctl.{module}", fromlist=[name]), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "MAX_TICKETS",
    "MAX_TICKET_LIFETIME",
    "POLICIES",
    "BindingError",
    "ConnectionState",
    "ConnectionStateError",
    "Info",
    "KeyFileWarning",
    "KeyWatcher",
    "NotBoundError",
    "OpenSSLError",
    "ResumeStatus",
    "SocketsNotDeferredWarning",
    "TicketDecision",
    "TicketKey",
    "TicketStatus",
    "TlsctlError",
    "UnsupportedError",
    "__version__",
    "connection_state",
    "extract_from_ssl",
    "info",
    "inject_into_ssl",
    "issue_tickets",
    "patch",
    "quickack",
    "rotate_ticket_keys",
    "set_ticket_callbacks",
    "set_ticket_keys",
    "set_ticket_lifetime",
    "watch_ticket_keys",
]
