"""The bug scenarios, reproducible on 127.0.0.1.

Used by ``python -m tlsctl demo``, by the test suite and by the benchmark, so
the numbers all three report come from one implementation.  Every function
runs a real server thread and a real client over loopback TCP with real TLS
handshakes; certificates come from ``trustme`` (install ``tlsctl[demo]``).

Invariants: every loop is bounded in count and time (socket timeouts on
both ends), servers bind to 127.0.0.1 only, and every thread is joined
before a function returns.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "Certs",
    "DeadlockResult",
    "MemoryBioResult",
    "ResumptionResult",
    "TicketCounter",
    "UploadResult",
    "client_context",
    "make_certs",
    "memory_bio_request_response",
    "one_way_uploads",
    "recv_line",
    "request_clients",
    "request_response",
    "server_context",
    "upload_clients",
    "write_before_read",
]

LOCALHOST = "127.0.0.1"


@dataclass
class Certs:
    """A throwaway CA, a server certificate for ``localhost`` and a client
    certificate with many SANs (large client certificates make large tickets)."""

    ca: Any
    server: Any
    client: Any


def make_certs(client_sans: int = 400) -> Certs:
    """Generate throwaway certificates with ``trustme``."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost", LOCALHOST)
    client = ca.issue_cert(*(f"client{i}.example" for i in range(client_sans)))
    return Certs(ca, server, client)


def server_context(
    certs: Certs,
    *,
    require_client_cert: bool = False,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A fresh ``PROTOCOL_TLS_SERVER`` context with the server certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certs.server.configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        certs.ca.configure_trust(ctx)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


def client_context(
    certs: Certs,
    *,
    with_client_cert: bool = False,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A fresh ``PROTOCOL_TLS_CLIENT`` context trusting the throwaway CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certs.ca.configure_trust(ctx)
    if with_client_cert:
        certs.client.configure_cert(ctx)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


class TicketCounter:
    """Counts NewSessionTicket messages a client context reads, and records
    the key name each ticket starts with (OpenSSL's ticket format: 16-byte
    key name, IV, encrypted session, HMAC) in ``key_names``.

    Uses ``SSLContext._msg_callback``, CPython's (private, 3.8+) hook over
    OpenSSL's message callback, which sees decrypted handshake messages.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.count = 0
        self.key_names: list[bytes] = []
        self._lock = threading.Lock()
        ctx._msg_callback = self  # type: ignore[attr-defined]

    def __call__(
        self,
        conn: Any,
        direction: str,
        version: Any,
        content_type: Any,
        msg_type: Any,
        data: bytes,
    ) -> None:
        if (
            direction == "read"
            and content_type == ssl._TLSContentType.HANDSHAKE  # type: ignore[attr-defined]
            and msg_type == ssl._TLSMessageType.NEWSESSION_TICKET  # type: ignore[attr-defined]
        ):
            with self._lock:
                self.count += 1
                self.key_names.append(_ticket_key_name(data, version))


def _ticket_key_name(message: bytes, version: Any) -> bytes:
    """The first 16 bytes of the ticket in a NewSessionTicket message
    (4-byte handshake header; TLS 1.3 body: lifetime, age_add, nonce<1>,
    ticket<2>; TLS 1.2 body: lifetime hint, ticket<2>)."""
    body = message[4:]
    if version == ssl.TLSVersion.TLSv1_3:
        offset = 8 + 1 + body[8]  # past lifetime, age_add and the nonce
    else:
        offset = 4
    return body[offset + 2 : offset + 2 + 16]


def recv_line(conn: socket.socket) -> bytes:
    """Read up to and including the first newline, or what arrived before
    the peer closed (then without one)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            break
        line += chunk
    return line


class _Server:
    """Accepts ``n`` connections on 127.0.0.1, one at a time, in a thread,
    calling ``handle(raw_socket)`` for each; collects results in order."""

    def __init__(
        self,
        n: int,
        handle: Callable[[socket.socket], Any],
        *,
        bufsize: int | None = None,
        accept_timeout: float = 30.0,
    ) -> None:
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self._n = n
        self._handle = handle
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bufsize is not None:  # accepted sockets inherit these
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self._listener.bind((LOCALHOST, 0))
        self._listener.listen(128)
        self._listener.settimeout(accept_timeout)
        self.address = self._listener.getsockname()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for _ in range(self._n):
                raw, _ = self._listener.accept()
                with raw:
                    self.results.append(self._handle(raw))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def __enter__(self) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(60)
        self._listener.close()

    def join(self) -> list[Any]:
        self._thread.join(60)
        if self._thread.is_alive():
            raise TimeoutError("server thread did not finish")
        if self.error is not None:
            raise self.error
        return self.results


# ---------------------------------------------------------------- one-way


@dataclass
class UploadResult:
    """Outcome of ``one_way_uploads``: bytes the server received per upload."""

    size: int
    received: list[int]
    server_errors: list[str] = field(default_factory=list)

    @property
    def connections(self) -> int:
        return len(self.received)

    @property
    def lost_connections(self) -> int:
        return sum(1 for r in self.received if r != self.size)

    @property
    def bytes_lost(self) -> int:
        return sum(self.size - r for r in self.received)


def one_way_uploads(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    connections: int = 200,
    size: int = 256 * 1024,
    timeout: float = 10.0,
    read_delay: float = 0.0,
) -> UploadResult:
    """Clients upload ``size`` bytes and close without reading anything.

    ``read_delay``: seconds the server waits after each handshake before it
    reads (a busy server); the longer, the more upload data sits unread in
    its kernel when the client's RST arrives.

    The server reads each connection until EOF or an error and records how
    many bytes arrived.  Any NewSessionTicket the server sends lies unread in
    the client's receive buffer when it closes, so its kernel sends RST and
    the server's kernel drops upload data still queued for the server.
    """
    errors: list[str] = []

    def handle(raw: socket.socket) -> int:
        raw.settimeout(timeout)
        got = 0
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                if read_delay:
                    time.sleep(read_delay)
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
        except (OSError, ssl.SSLError) as exc:
            errors.append(type(exc).__name__)
        return got

    with _Server(connections, handle) as server:
        upload_clients(server.address, client_ctx, connections, size, timeout)
        received = server.join()
    return UploadResult(size, received, errors)


def upload_clients(
    address: Any,
    client_ctx: ssl.SSLContext,
    connections: int,
    size: int,
    timeout: float = 10.0,
) -> None:
    """The client half of ``one_way_uploads``: connect, upload, close."""
    payload = b"u" * size
    for _ in range(connections):
        with socket.create_connection(address, timeout=timeout) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as c:
                c.sendall(payload)


# -------------------------------------------------------------- deadlock


@dataclass
class DeadlockResult:
    """Outcome of ``write_before_read``."""

    server_outcome: str  # "completed", "handshake timed out", or an error name
    client_outcome: str
    received: int
    tickets: int

    @property
    def completed(self) -> bool:
        return self.server_outcome == "completed" and self.client_outcome == "completed"


def write_before_read(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    size: int = 512 * 1024,
    bufsize: int = 4096,
    timeout: float = 5.0,
) -> DeadlockResult:
    """A client sends ``size`` bytes before reading, over small buffers.

    Use a server context that requires a client certificate and a client
    context carrying a large one: the tickets are then several KiB each.  A
    server that writes them during the handshake blocks on a full send
    buffer while the client blocks on its own; neither reads.
    """
    payload = b"d" * size
    counter = TicketCounter(client_ctx)

    def handle(raw: socket.socket) -> tuple[str, int]:
        raw.settimeout(timeout)
        got = 0
        try:
            conn = server_ctx.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            try:
                conn.do_handshake()
            except (socket.timeout, TimeoutError):
                return "handshake timed out", 0
            with conn:
                while got < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
                conn.sendall(b"done")
        except (socket.timeout, TimeoutError):
            return "timed out after handshake", got
        except (OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}", got
        return "completed", got

    client_outcome = "completed"
    with _Server(1, handle, bufsize=bufsize) as server:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        raw.settimeout(timeout)
        try:
            raw.connect(server.address)
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as c:
                c.sendall(payload)
                reply = b""
                while len(reply) < 4:
                    chunk = c.recv(4 - len(reply))
                    if not chunk:
                        break
                    reply += chunk
                if reply != b"done":
                    client_outcome = f"bad reply {reply!r}"
        except (socket.timeout, TimeoutError):
            client_outcome = "timed out"
        except (OSError, ssl.SSLError) as exc:
            client_outcome = type(exc).__name__
        finally:
            raw.close()
        [(server_outcome, received)] = server.join()
    return DeadlockResult(server_outcome, client_outcome, received, counter.count)


# ------------------------------------------------------------ resumption


@dataclass
class ResumptionResult:
    """Outcome of ``request_response``."""

    connections: int
    resumed: int
    tickets: int
    replies_ok: int


def request_response(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    connections: int = 10,
    timeout: float = 10.0,
) -> ResumptionResult:
    """Clients send a request, read the reply, and reconnect with the
    newest session they hold.  Counts resumed handshakes and tickets read."""

    def handle(raw: socket.socket) -> None:
        raw.settimeout(timeout)
        with server_ctx.wrap_socket(raw, server_side=True) as conn:
            request = recv_line(conn)
            if request.endswith(b"\n"):
                conn.sendall(b"reply to " + request)

    with _Server(connections, handle) as server:
        result = request_clients(server.address, client_ctx, connections, timeout)
        server.join()
    return result


def request_clients(
    address: Any,
    client_ctx: ssl.SSLContext,
    connections: int,
    timeout: float = 10.0,
) -> ResumptionResult:
    """The client half of ``request_response``: send ``request <i>\\n``, read
    the newline-terminated reply, reconnect with the newest session.  ``tickets`` counts
    the NewSessionTicket messages these clients read (it installs a
    ``TicketCounter`` on ``client_ctx``)."""
    counter = TicketCounter(client_ctx)
    resumed = ok = 0
    session: ssl.SSLSession | None = None
    for i in range(connections):
        with socket.create_connection(address, timeout=timeout) as raw:
            with client_ctx.wrap_socket(
                raw, server_hostname="localhost", session=session
            ) as c:
                request = f"request {i}\n".encode()
                c.sendall(request)
                # Read the whole reply, not to EOF: the server closes without
                # close_notify, and OpenSSL 3.5 then marks the session
                # non-resumable (measured on Debian trixie).
                reply = recv_line(c)
                ok += reply == b"reply to " + request
                resumed += bool(c.session_reused)
                session = c.session
    return ResumptionResult(connections, resumed, counter.count, ok)


# ------------------------------------------------ memory BIOs (tlsctl-pymech)


@dataclass
class MemoryBioResult:
    """Outcome of ``memory_bio_request_response``."""

    connections: int
    resumed: int
    tickets: int  # NewSessionTickets the clients read
    replies_ok: int
    early_bytes: int  # server bytes after its handshake, before its reply


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> bytes:
    data = src.read()
    dst.write(data)
    return data


def memory_bio_request_response(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    connections: int = 2,
) -> MemoryBioResult:
    """In one thread over memory BIOs (as asyncio, uvloop and trio drive
    ``SSLObject``): each client sends a request, the server reads it and
    replies, and the client reconnects with its newest session.
    ``early_bytes`` counts what the servers wrote after their handshake
    finished and before their reply (0 when ``defer`` works; the tickets
    still reach the clients, with the reply)."""
    counter = TicketCounter(client_ctx)
    resumed = ok = early = 0
    session: ssl.SSLSession | None = None
    for i in range(connections):
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        client = client_ctx.wrap_bio(
            c_in, c_out, server_hostname="localhost", session=session
        )
        server_done = client_done = False
        for _ in range(10):  # a handshake takes at most a few round trips
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            _pump(c_out, s_in)
            if not server_done:
                try:
                    server.do_handshake()
                    server_done = True
                    early += s_out.pending
                except ssl.SSLWantReadError:
                    pass
                _pump(s_out, c_in)
            if server_done and client_done:
                break
        request = f"request {i}\n".encode()
        client.write(request)
        _pump(c_out, s_in)
        got = server.read(1024)  # a read: must not release deferred tickets
        early += s_out.pending
        server.write(b"reply to " + got)
        _pump(s_out, c_in)
        reply = b""
        while True:
            try:
                chunk = client.read(1024)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            reply += chunk
        ok += reply == b"reply to " + request
        resumed += bool(client.session_reused)
        session = client.session
    return MemoryBioResult(connections, resumed, counter.count, ok, early)
