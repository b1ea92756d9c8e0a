"""Session ticket callbacks and shared ticket keys.

Theory of operation
===================

Callbacks (``set_ticket_callbacks``)
    OpenSSL's ``SSL_CTX_set_session_ticket_cb`` calls one C function when a
    ticket is made and one when a client presents a ticket.  The C shim
    forwards both to ``_dispatch`` below with tlsctl's record of the
    connection (kept in the ``SSL``'s ex_data under tlsctl's own index, never
    Python's index 0).  ``_dispatch`` finds the ``ssl.SSLSocket`` /
    ``ssl.SSLObject``, calls the user's callable and returns a plain decision
    to C.  It never lets an exception unwind into OpenSSL: it keeps the
    first one in the record and tells OpenSSL to fail, and the connection's
    ``_sslobj`` proxy (see ``_policy``) re-raises it as soon as the OpenSSL
    call that ran the callback (``do_handshake``, ``read``, ``write``)
    returns, with its original traceback.

    The callables live in a holder stored as an attribute of the
    ``ssl.SSLContext``; C keeps only a weak reference to the holder.  So they
    live exactly as long as the context (a connection keeps its context
    alive), reference cycles through them stay collectable, and replacing
    them drops the old ones at once.

Shared keys (``set_ticket_keys``)
    Entirely in C (the ticket key callback): no Python runs per handshake.
    Key bytes cross into C once per call and are wiped there when replaced
    or freed.  ``TicketKey`` never shows its bytes in ``repr`` or in an
    exception message; ``TicketKey.id`` is a fingerprint safe to log.
    ``TicketKey`` is immutable and final, ``set_ticket_keys`` builds each
    record with ``TicketKey._record`` itself and checks its layout before
    anything reaches C, and ``TicketKey.from_file`` reads regular files
    only, at most 81 bytes.
"""

from __future__ import annotations

import enum
import os
import ssl
import stat
import weakref

from tlsctl import _bind, _policy
from tlsctl._errors import OpenSSLError, UnsupportedError
from tlsctl._record import Record, final

TYPE_CHECKING = False
if TYPE_CHECKING:  # nothing from typing at run time: import cost
    from collections.abc import Iterable, Iterator
    from typing import Any, Callable, Optional, Union

    Connection = Union[ssl.SSLSocket, ssl.SSLObject]
    OnIssue = Callable[[Connection], Optional[bytes]]
    OnResume = Callable[[Connection, Optional[bytes], "ResumeStatus"], "TicketDecision"]

__all__ = [
    "ResumeStatus",
    "TicketDecision",
    "TicketKey",
    "TicketStatus",
    "set_ticket_callbacks",
    "set_ticket_keys",
]


class TicketStatus(enum.IntEnum):
    """What OpenSSL made of a ticket a client presented (``SSL_TICKET_*``)."""

    FATAL_ERR_MALLOC = 0
    FATAL_ERR_OTHER = 1
    NONE = 2
    EMPTY = 3
    NO_DECRYPT = 4  #: not ours, a key no longer listed, or tampered with
    SUCCESS = 5  #: decrypted
    SUCCESS_RENEW = 6  #: decrypted, and OpenSSL would send a fresh ticket


class TicketDecision(enum.IntEnum):
    """What ``on_resume`` tells OpenSSL to do (``SSL_TICKET_RETURN_*``)."""

    ABORT = 0  #: fail the handshake
    IGNORE = 1  #: full handshake, and no new ticket (measured, 1.2 and 1.3)
    IGNORE_RENEW = 2  #: full handshake with new tickets, as for a stale ticket
    USE = 3  #: resume without sending a new ticket
    USE_RENEW = 4  #: resume and send a new ticket


_MAX_APPDATA = 16384  # sealed into every ticket; tickets are at most 64 KiB
_KEY_SIZES = (48, 80)


def _fingerprint(name: bytes) -> str:
    import hashlib  # here, not at import: see docs/performance.md, Import

    return hashlib.sha256(b"tlsctl ticket key name\0" + name).hexdigest()[:16]


_FILE_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _require_regular(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((k for test, k in _FILE_KINDS if test(mode)), "special file")
    raise ValueError(
        f"{path!r} is a {kind}, not a regular file: a ticket key file is a "
        f"regular file of 80 or 48 bytes"
    )


class ResumeStatus(Record):
    """The ``status`` argument of ``on_resume``.

    Attributes:
        code: OpenSSL's status (``TicketStatus``).
        key_id: fingerprint of the ticket's key name (``TicketKey.id`` of the
            key it names), or ``None`` when the ticket was too short to have
            one.
        key_index: position of that key in the list given to
            ``set_ticket_keys``, or ``None`` (no shared keys, or not listed).
    """

    __slots__ = _fields = ("code", "key_id", "key_index", "key_name")
    _hidden = ("key_name",)
    code: TicketStatus
    key_id: str | None
    key_index: int | None
    key_name: bytes | None

    def __init__(
        self,
        code: TicketStatus,
        key_id: str | None,
        key_index: int | None,
        key_name: bytes | None = None,
    ) -> None:
        self._set(code=code, key_id=key_id, key_index=key_index, key_name=key_name)

    @property
    def decrypted(self) -> bool:
        """The ticket decrypted: ``USE`` / ``USE_RENEW`` may resume it."""
        return self.code in (TicketStatus.SUCCESS, TicketStatus.SUCCESS_RENEW)

    @property
    def renew(self) -> bool:
        """OpenSSL would resume it and send a fresh ticket (its default)."""
        return self.code == TicketStatus.SUCCESS_RENEW


@final
class TicketKey:
    """One session ticket key: a 16-byte name, an HMAC secret and an AES key.

    ``TicketKey(data)`` takes nginx's ``ssl_session_ticket_key`` file
    formats: 80 bytes (name, 32-byte HMAC-SHA256 secret, 32-byte AES-256-CBC
    key) or 48 bytes (name, 16-byte AES-128-CBC key, 16-byte HMAC secret).
    ``TicketKey.generate()`` makes a fresh 80-byte key and
    ``TicketKey.from_file()`` reads a key file, so nginx-style rotation
    tooling (``openssl rand 80 > key``) can feed tlsctl.  The bytes never
    appear in ``repr()``; ``id`` is a fingerprint of the name, safe to log.

    A ``TicketKey`` is immutable (setting or deleting any attribute raises
    ``AttributeError``) and final (subclassing it raises ``TypeError``): the
    bytes checked when it was made are the bytes ``set_ticket_keys`` hands
    to OpenSSL (and ``set_ticket_keys`` checks each key's layout again, in
    case immutability was bypassed with ``object.__setattr__``).  It cannot
    be pickled or copied by pickling; ``export()`` the bytes deliberately
    instead.

    Raises:
        TypeError: ``data`` is not bytes, bytearray or memoryview.
        ValueError: ``data`` is neither 80 nor 48 bytes long.
    """

    __slots__ = ("__weakref__", "_data", "id")
    _data: bytes
    id: str

    def __new__(cls, data: bytes | bytearray | memoryview) -> TicketKey:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a ticket key is bytes, not {type(data).__name__}")
        raw = bytes(data)
        if len(raw) not in _KEY_SIZES:
            raise ValueError(
                f"a ticket key is 80 bytes (or nginx's 48-byte format), "
                f"got {len(raw)} bytes"
            )
        self = super().__new__(cls)
        object.__setattr__(self, "_data", raw)
        object.__setattr__(self, "id", _fingerprint(raw[:16]))
        return self

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Refused: a subclass could override what ``set_ticket_keys`` reads."""
        raise TypeError(
            "TicketKey cannot be subclassed: set_ticket_keys() trusts its internals"
        )

    def __setattr__(self, name: str, value: object) -> None:
        """Refused: a ``TicketKey`` is immutable."""
        raise AttributeError(f"TicketKey is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        """Refused: a ``TicketKey`` is immutable."""
        raise AttributeError(f"TicketKey is immutable: cannot delete {name!r}")

    @classmethod
    def generate(cls) -> TicketKey:
        """A fresh random 80-byte key (``os.urandom``)."""
        return cls(os.urandom(80))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TicketKey:
        """Read an nginx ``ssl_session_ticket_key`` file (48 or 80 bytes).

        ``path`` must name a regular file; symbolic links are followed (a
        Kubernetes Secret volume shows each key as ``key -> ..data/key``).
        Anything else (a FIFO, a device such as ``/dev/zero``, a directory,
        a socket) is refused without being read, and at most 81 bytes of a
        regular file are read, so a wrong path can neither hang the caller
        nor fill its memory.

        Raises:
            ValueError: ``path`` is not a regular file, or it does not hold
                exactly 80 or 48 bytes.  The message names the path, never
                the bytes.
            OSError: the file cannot be opened or read, e.g.
                ``FileNotFoundError`` (``.filename`` is the path) or
                ``PermissionError``.
        """
        name = os.fspath(path)
        # stat() before open(): a device or FIFO is never even opened.
        _require_regular(name, os.stat(name).st_mode)
        fd = os.open(
            name,
            os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
        )
        try:
            _require_regular(name, os.fstat(fd).st_mode)  # what was opened
            limit = max(_KEY_SIZES) + 1
            data = b""
            while len(data) < limit:
                chunk = os.read(fd, limit - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        if len(data) not in _KEY_SIZES:
            size = f"more than {max(_KEY_SIZES)}" if len(data) >= limit else len(data)
            raise ValueError(
                f"{name!r}: a ticket key file holds 80 or 48 bytes, this one {size}"
            )
        return cls(data)

    @property
    def size(self) -> int:
        """48 or 80."""
        return len(self._data)

    def export(self) -> bytes:
        """The key in nginx's file format (what ``from_file`` reads)."""
        return self._data

    def _record(self) -> bytes:
        """The C shim's layout: size byte, name, hmac[32], aes[32]."""
        d = self._data
        if len(d) == 80:
            name, hmac, aes = d[:16], d[16:48], d[48:80]
        else:
            name, aes, hmac = d[:16], d[16:32], d[32:48]
        return bytes([len(d)]) + name + hmac.ljust(32, b"\0") + aes.ljust(32, b"\0")

    def __repr__(self) -> str:
        return f"<TicketKey id={self.id} size={self.size}>"

    def __reduce__(self) -> Any:
        """Refused: pickling would copy the key bytes out of sight."""
        raise TypeError("TicketKey is not picklable; use export() deliberately")


_RECORD_SIZE = 81  # the C shim's TLSCTL_KEY_RECORD


def _checked_record(key: TicketKey, index: int) -> bytes:
    """``TicketKey._record`` of ``key`` (the class's own function, whatever
    the instance holds), proven to have the C shim's layout: immutability
    can still be bypassed with ``object.__setattr__``."""
    try:
        record = TicketKey._record(key)
    except (AttributeError, TypeError, ValueError):
        record = None
    if (
        type(record) is not bytes
        or len(record) != _RECORD_SIZE
        or record[0] not in _KEY_SIZES
    ):
        raise ValueError(
            f"keys[{index}] is a malformed TicketKey (changed after it was made?)"
        )
    return record


def set_ticket_keys(
    ctx: ssl.SSLContext, keys: Iterable[TicketKey | bytes]
) -> ssl.SSLContext:
    """Encrypt and decrypt session tickets with keys shared across processes.

    Give every server process (and machine) the same keys and a ticket
    issued by one resumes on any of them, as with nginx's
    ``ssl_session_ticket_key``.  The first key encrypts new tickets; every
    key decrypts.  A ticket under a later key resumes and is renewed under
    the first; a ticket under a key no longer listed gets a full handshake.
    Calling it again replaces the list (rotation): put the new key first and
    keep the previous one second for as long as its tickets should resume.

    ``keys`` is a list or tuple of ``TicketKey`` objects, or of bytes in a
    format ``TicketKey`` takes; any other iterable (a generator) is read
    once, in order.  A single key is not a list of keys: wrap it,
    ``[key]``.

    Works on TLS 1.2 and 1.3, OpenSSL 1.1.1 and 3.x; the key lookup runs in
    C for every handshake.  Without this call the context keeps OpenSSL's
    own per-context random keys.  Returns ``ctx``.

    Raises:
        TypeError: ``ctx`` is not an ``ssl.SSLContext``, ``keys`` is not
            iterable (or is a single key: bytes or a ``TicketKey``), or a key
            is neither a ``TicketKey`` nor bytes.
        ValueError: no keys, a key of the wrong size, a ``TicketKey`` whose
            internals were changed (each key's record is checked before it
            reaches C), two keys with the same name, or a client-only
            context.
        UnsupportedError: the bound OpenSSL offers no ticket key callback.
        BindingError: tlsctl is not bound, or ``ctx`` is not proven to
            belong to the bound OpenSSL.
    """
    ptr, kind = _bind.ctx_pointer(_bind.serving_context(ctx))
    items: Iterator[TicketKey | bytes] | None = None
    if not isinstance(keys, (bytes, bytearray, memoryview, TicketKey, str)):
        try:
            items = iter(keys)
        except TypeError:  # not iterable; an iterator's own errors propagate
            pass
    if items is None:
        raise TypeError(
            f"keys must be a sequence of TicketKey (or bytes) objects, "
            f"not {type(keys).__name__}"
        )
    # type(), not isinstance(): an object can claim TicketKey as __class__.
    parsed = [k if type(k) is TicketKey else TicketKey(k) for k in items]
    if not parsed:
        raise ValueError("set_ticket_keys() needs at least one key")
    records = [_checked_record(k, i) for i, k in enumerate(parsed)]
    names = [r[1:17] for r in records]
    if len(set(names)) != len(names):
        raise ValueError("two ticket keys have the same name")
    _bind.require_server_kind(kind, "tlsctl.set_ticket_keys()")
    lib = _bind.lib
    if lib.tlsctl_keys_mode() == lib.TLSCTL_KEYS_NONE:
        raise UnsupportedError(
            f"{_bind.info().openssl_version} offers no session ticket key callback"
        )
    blob = bytearray(b"".join(records))
    try:
        # C checks the layout again and copies what it keeps.
        rc = lib.tlsctl_set_ticket_keys(ptr, _bind.ffi.from_buffer(blob), len(blob))
    finally:
        blob[:] = bytes(len(blob))  # the copy we made; C keeps its own
    if rc == lib.TLSCTL_ERR_BAD_KEYS:
        raise ValueError(
            f"malformed ticket key records (at most {lib.TLSCTL_MAX_KEYS} keys "
            "of 48 or 80 bytes, each name once)"
        )
    if rc != 1:
        raise OpenSSLError(
            "installing the ticket key callback failed", _bind.openssl_errors()
        )
    return ctx


class _Callbacks:
    """The user's callables for one context (an attribute of the context;
    C holds only a weak reference to it)."""

    __slots__ = ("__weakref__", "on_issue", "on_resume")

    def __init__(self, on_issue: OnIssue | None, on_resume: OnResume | None) -> None:
        self.on_issue = on_issue
        self.on_resume = on_resume


def set_ticket_callbacks(
    ctx: ssl.SSLContext,
    *,
    on_issue: OnIssue | None = None,
    on_resume: OnResume | None = None,
) -> ssl.SSLContext:
    """Run Python code when the server issues a ticket or a client presents one.

    ``on_issue(conn) -> bytes | None`` runs as each ticket is made; bytes it
    returns are sealed into that ticket (``SSL_SESSION_set1_ticket_appdata``,
    at most 16 KiB) and come back to ``on_resume`` when the client presents
    it.  ``None`` adds nothing (a renewal ticket then carries the appdata of
    the session it renews, as OpenSSL does).

    ``on_resume(conn, appdata, status) -> TicketDecision`` runs when a client
    presents a ticket.  ``appdata`` is what ``on_issue`` sealed (``b""`` if
    nothing), or ``None`` when the ticket did not decrypt; ``status`` is a
    ``ResumeStatus``.  Return ``TicketDecision.USE_RENEW`` (resume and send a
    fresh ticket), ``USE`` (resume, no new ticket), ``IGNORE_RENEW`` (full
    handshake with new tickets), ``IGNORE`` (full handshake, no new ticket)
    or ``ABORT`` (fail the handshake).  ``USE``
    is only valid for a ticket that decrypted.

    ``conn`` is the server's ``ssl.SSLSocket`` / ``ssl.SSLObject``.  An
    exception raised by a callback fails the handshake (or the ticket) and is
    re-raised, traceback intact, from the call that ran it: ``do_handshake``,
    ``recv``/``read``, ``send``/``write`` or ``wrap_socket`` itself.

    Callbacks apply to server connections created after this call; they
    work with every ``patch()`` policy (with ``renew_on_resume=False`` a
    ``USE_RENEW`` resumes without a new ticket).  They stay alive exactly as
    long as the context.  Calling again replaces both; calling with neither
    removes them.  Returns ``ctx``.

    Raises:
        TypeError: ``ctx`` is not an ``ssl.SSLContext``, or a callback is not
            callable.
        ValueError: a client-only context.
        BindingError: tlsctl is not bound, or ``ctx`` is not proven to
            belong to the bound OpenSSL.
    """
    target = _bind.serving_context(ctx)
    ptr, kind = _bind.ctx_pointer(target)
    for name, fn in (("on_issue", on_issue), ("on_resume", on_resume)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, not {type(fn).__name__}")
    _bind.require_server_kind(kind, "tlsctl.set_ticket_callbacks()")
    lib = _bind.lib
    if on_issue is None and on_resume is None:
        rc = lib.tlsctl_set_callbacks(ptr, 0, 0, 0)
        target.__dict__.pop(_policy._CALLBACKS_ATTR, None)
    else:
        holder = _Callbacks(on_issue, on_resume)
        ref = weakref.ref(holder)
        rc = lib.tlsctl_set_callbacks(
            ptr, id(ref), on_issue is not None, on_resume is not None
        )
        if rc == 1:
            target.__dict__[_policy._CALLBACKS_ATTR] = holder
    if rc != 1:
        raise OpenSSLError(
            "SSL_CTX_set_session_ticket_cb failed", _bind.openssl_errors()
        )
    _policy.install_plan(target)
    return ctx


def _dispatch(
    event: int,
    holder_ref: weakref.ref[_Callbacks],
    record: _policy._CallbackRecord | None,
    status: int,
    appdata: bytes | None,
    key_name: bytes | None,
    key_index: int,
    fallback: int,
) -> object:
    """Called from C for every ticket callback (GIL held).  Never raises:
    an exception is kept in ``record`` and OpenSSL is told to fail."""
    issue = event == _bind.lib.TLSCTL_EVENT_ISSUE
    holder = holder_ref()
    conn = record.conn() if record is not None else None
    if holder is None or record is None or conn is None:
        # The context's callbacks are gone, or the connection was made
        # before set_ticket_callbacks() (no record): OpenSSL's own choice.
        return None if issue else fallback
    try:
        if issue:
            return _issue(holder, conn)
        return _resume(holder, conn, status, appdata, key_name, key_index)
    except BaseException as exc:  # re-raised by the proxy, never lost
        if record.exc is None:
            record.exc = exc
        return False if issue else int(TicketDecision.ABORT)


def _issue(holder: _Callbacks, conn: Connection) -> bytes | None:
    if holder.on_issue is None:
        return None
    data = holder.on_issue(conn)
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"on_issue must return bytes or None, not {type(data).__name__}"
        )
    data = bytes(data)
    if len(data) > _MAX_APPDATA:
        raise ValueError(
            f"on_issue returned {len(data)} bytes; ticket appdata is limited "
            f"to {_MAX_APPDATA} (it is sealed into every ticket)"
        )
    return data


def _resume(
    holder: _Callbacks,
    conn: Connection,
    status: int,
    appdata: bytes | None,
    key_name: bytes | None,
    key_index: int,
) -> int:
    code = TicketStatus(status)
    if holder.on_resume is None:  # pragma: no cover - C only calls with one
        raise AssertionError("on_resume dispatched without a callback")
    info = ResumeStatus(
        code=code,
        key_id=_fingerprint(key_name) if key_name and len(key_name) == 16 else None,
        key_index=key_index if key_index >= 0 else None,
        key_name=key_name,
    )
    decision = holder.on_resume(conn, appdata, info)
    if isinstance(decision, bool) or not isinstance(decision, int):
        raise TypeError(
            f"on_resume must return a tlsctl.TicketDecision, not "
            f"{type(decision).__name__}"
        )
    try:
        decision = TicketDecision(decision)
    except ValueError:
        raise ValueError(
            f"on_resume returned {decision}, not a tlsctl.TicketDecision"
        ) from None
    if (
        decision in (TicketDecision.USE, TicketDecision.USE_RENEW)
        and not info.decrypted
    ):
        raise ValueError(
            f"on_resume returned {decision.name} for a ticket that did not "
            f"decrypt (status {code.name}); return IGNORE_RENEW or ABORT"
        )
    return int(decision)


if _bind._INFO.bound:  # symbols bound (the self-test waits for first use)
    _bind.lib.tlsctl_set_dispatcher(id(_dispatch))
