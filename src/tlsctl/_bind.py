"""Binding to the OpenSSL instance that the interpreter's ``_ssl`` uses.

Invariant: no OpenSSL function is ever called on a pointer taken from a
Python object unless

1. binding succeeded: every required symbol was resolved through ``_ssl``'s
   own shared object (or the global namespace when ``_ssl`` is built in), the
   library's version equals ``ssl.OPENSSL_VERSION_NUMBER``, and the layout
   self-test below passed;
2. the object is a real stdlib object (``ssl.SSLContext``; an
   ``ssl.SSLSocket`` / ``ssl.SSLObject`` whose ``_sslobj`` is exactly
   ``_ssl._SSLSocket``), otherwise ``TypeError``;
3. the ``SSL_CTX`` reached is proven to belong to the bound instance: its
   method pointer is one of the bound ``TLS_*_method()`` results, and for a
   connection, ``SSL_get_SSL_CTX(ssl)`` is that proven context.

Binding happens once, at import (symbols and version); the layout
self-test runs at the first ``info()``, which every function taking a
pointer from a Python object calls first.  If it fails, ``import tlsctl`` still
succeeds, ``info()`` says why, ``defer`` uses the python mechanism for
memory-BIO connections (``_pyhold``), and every call that needs OpenSSL
raises ``NotBoundError`` (a ``BindingError`` and an ``UnsupportedError``).

Environment (read once, at import; testing aids):

* ``TLSCTL_BINDING=off``: do not bind (the compiled module is not even
  loaded), as on an interpreter tlsctl cannot bind (uv's
  python-build-standalone builds, PyPy).
* ``TLSCTL_MECHANISM=native|stash|python``: force ``defer``'s mechanism.
"""

from __future__ import annotations

import _ssl
import os
import ssl
import sys

from tlsctl._errors import (
    BindingError,
    ConnectionStateError,
    NotBoundError,
    OpenSSLError,
)
from tlsctl._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# --- tlsctl-pymech: the binding seam and the non-CPython path -------------
#: ``TLSCTL_BINDING``, read once at import: ``off`` makes binding fail.
BINDING_ENV = os.environ.get("TLSCTL_BINDING", "")
#: ``TLSCTL_MECHANISM``, read once at import.
MECHANISM_ENV = os.environ.get("TLSCTL_MECHANISM", "")
_IMPORT_ERROR: str | None
ffi: Any
lib: Any
if BINDING_ENV == "off":
    ffi = lib = None
    _IMPORT_ERROR = (
        "binding switched off by TLSCTL_BINDING=off (a testing aid: tlsctl "
        "behaves as on an interpreter it cannot bind, such as uv's "
        "python-build-standalone builds)"
    )
elif BINDING_ENV not in ("", "on"):
    ffi = lib = None
    _IMPORT_ERROR = f"TLSCTL_BINDING={BINDING_ENV!r} is not understood (use 'off')"
elif sys.implementation.name != "cpython":
    ffi = lib = None
    _IMPORT_ERROR = (
        f"{sys.implementation.name} is not CPython: tlsctl's compiled module "
        "reads CPython's _ssl objects through the CPython C API, so it is "
        "neither built nor loaded here"
    )
else:
    try:
        from tlsctl._binding import ffi, lib  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - only a broken install
        ffi = lib = None
        _IMPORT_ERROR = f"compiled module tlsctl._binding missing: {exc}"
    else:
        _IMPORT_ERROR = None
# --- end tlsctl-pymech ----------------------------------------------------

__all__ = [
    "SSL_SOCKET_TYPE",
    "STDLIB_CONTEXT",
    "Info",
    "ctx_pointer",
    "fast",
    "ffi",
    "info",
    "is_connection",
    "lib",
    "openssl_errors",
    "require_server_kind",
    "serving_context",
    "sslobj_pointer",
]

_MIN_VERSION = 0x10101000  # OpenSSL 1.1.1


def _find_sslsocket_type() -> Any:
    """``_ssl._SSLSocket``: the type of a connection's ``_sslobj`` (PyPy's
    ``_ssl`` does not export it under that name: found from an object)."""
    found = getattr(_ssl, "_SSLSocket", None)
    if found is None:  # tlsctl-pymech
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        conn: Any = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
        found = type(conn._sslobj)
    return found


SSL_SOCKET_TYPE: Any = _find_sslsocket_type()


def _find_stdlib_context() -> type[ssl.SSLContext]:
    """The ssl module's own SSLContext class, found once, at import.

    Not ``ssl.SSLContext`` looked up at call time: truststore's
    ``inject_into_ssl()`` replaces that name with its subclass (and
    ``extract_from_ssl()`` puts it back), possibly before tlsctl is
    imported.  The real class is the one in the MRO defined in the ssl
    module directly on top of ``_ssl._SSLContext``."""
    for cls in ssl.SSLContext.__mro__:
        if (
            cls.__module__ == "ssl"
            and cls.__qualname__ == "SSLContext"
            and _ssl._SSLContext in cls.__bases__
        ):
            return cls
    raise ImportError("the ssl module's SSLContext class cannot be found")


STDLIB_CONTEXT = _find_stdlib_context()

# Filled by the C module at binding (tlsctl_fast_init): "FirstWriteProxy",
# the C proxy type; "make_apply", which makes a context's plan; "arm" and
# "report" (see _policy); "quiet" (see _quickack).
fast: dict[str, Any] = {}


def _raise_openssl_error(what: str) -> None:
    """Called by the C per-connection path when an OpenSSL call failed."""
    raise OpenSSLError(what, openssl_errors())


class Info(Record):
    """What tlsctl bound to (``tlsctl.info()``).

    Attributes:
        bound: True when tlsctl can operate on this interpreter's ``ssl``.
        reason: why nothing could be bound (``None`` when bound).
        openssl_version: ``ssl.OPENSSL_VERSION`` of the running interpreter.
        openssl_version_number: the bound library's ``OpenSSL_version_num()``
            (``ssl.OPENSSL_VERSION_NUMBER`` when nothing was bound).
        library: file of the bound libssl (from ``dladdr``), if known.
        via: where the symbols were looked up: the path of ``_ssl``'s shared
            object, or ``"global symbols"`` when ``_ssl`` is built in.
        native_tickets: ``SSL_new_session_ticket`` is available (OpenSSL 3.0+),
            so ``defer`` and ``issue_tickets`` work natively.
        mechanism: what ``defer`` uses: ``"native"`` (OpenSSL 3.0+),
            ``"stash"`` (1.1.1), ``"python"`` (no binding: memory-BIO
            servers are deferred in pure Python, sockets stay stock; see
            ``_pyhold``), or ``None`` when ``TLSCTL_MECHANISM`` names a
            mechanism that is not available.  ``TLSCTL_MECHANISM=stash``
            forces the stash on OpenSSL 3.x too, ``TLSCTL_MECHANISM=python``
            the python mechanism on any interpreter (read once, at import;
            testing aids).
    """

    __slots__ = (
        "bound",
        "library",
        "mechanism",
        "native_tickets",
        "openssl_version",
        "openssl_version_number",
        "reason",
        "via",
    )
    _fields = (
        "bound",
        "reason",
        "openssl_version",
        "openssl_version_number",
        "library",
        "via",
        "native_tickets",
        "mechanism",
    )
    bound: bool
    reason: str | None
    openssl_version: str
    openssl_version_number: int
    library: str | None
    via: str | None
    native_tickets: bool
    mechanism: str | None

    def __init__(
        self,
        bound: bool,
        reason: str | None,
        openssl_version: str,
        openssl_version_number: int,
        library: str | None,
        via: str | None,
        native_tickets: bool,
        mechanism: str | None,
    ) -> None:
        self._set(
            bound=bound,
            reason=reason,
            openssl_version=openssl_version,
            openssl_version_number=openssl_version_number,
            library=library,
            via=via,
            native_tickets=native_tickets,
            mechanism=mechanism,
        )


def _failed(reason: str, **extra: Any) -> Info:
    """What ``info()`` says when nothing could be bound, and why."""
    fields: dict[str, Any] = {
        "bound": False,
        "reason": reason,
        "openssl_version": ssl.OPENSSL_VERSION,
        "openssl_version_number": ssl.OPENSSL_VERSION_NUMBER,
        "library": None,
        "via": None,
        "native_tickets": False,
        # without the binding, only the python mechanism is left
        "mechanism": "python" if MECHANISM_ENV in ("", "python") else None,
    }
    fields.update(extra)
    if fields["mechanism"] is None and "mechanism" not in extra:
        fields["reason"] += (
            f"; TLSCTL_MECHANISM={MECHANISM_ENV!r} needs the binding "
            "(only 'python' works without it)"
        )
    return Info(**fields)


def _bind() -> Info:
    """Bind the symbols and check the version (the self-test waits for the
    first ``info()``)."""
    failed = _failed
    if _IMPORT_ERROR is not None:
        return failed(_IMPORT_ERROR)
    if ssl.OPENSSL_VERSION.startswith("LibreSSL"):
        return failed(f"{ssl.OPENSSL_VERSION} is not OpenSSL; tlsctl needs OpenSSL")
    if ssl.OPENSSL_VERSION_NUMBER < _MIN_VERSION:
        return failed(f"{ssl.OPENSSL_VERSION} is older than OpenSSL 1.1.1")

    path: str | None = getattr(_ssl, "__file__", None)
    via = path if path else "global symbols"
    err = ffi.new("char[]", 1024)
    if lib.tlsctl_bind(path.encode() if path else ffi.NULL, err, len(err)) != 0:
        return failed(ffi.string(err).decode(errors="replace"), via=via)

    library = ffi.string(lib.tlsctl_library_path()).decode(errors="replace") or None
    number = int(lib.OpenSSL_version_num())
    if number != ssl.OPENSSL_VERSION_NUMBER:
        return failed(
            f"the library reached through {via} reports version {number:#x}, "
            f"but ssl.OPENSSL_VERSION_NUMBER is {ssl.OPENSSL_VERSION_NUMBER:#x}: "
            "not the interpreter's OpenSSL instance",
            via=via,
            library=library,
            openssl_version_number=number,
        )
    raise_error = id(_raise_openssl_error)
    if lib.tlsctl_fast_init(id(fast), id(SSL_SOCKET_TYPE), raise_error) != 1:
        return failed("creating tlsctl's C connection types failed", via=via)

    native = bool(lib.tlsctl_has_symbol(b"SSL_new_session_ticket"))
    mechanism = "native" if native else "stash"
    forced = MECHANISM_ENV
    if forced in ("stash", "python") or (forced == "native" and native):
        mechanism = forced
    elif forced:
        choices = "'native', 'stash' or 'python'" if native else "'stash' or 'python'"
        return failed(
            f"TLSCTL_MECHANISM={forced!r} is not available here (use {choices})",
            via=via,
            library=library,
            mechanism=None,
        )
    return Info(
        bound=True,
        reason=None,
        openssl_version=ssl.OPENSSL_VERSION,
        openssl_version_number=number,
        library=library,
        via=via,
        native_tickets=native,
        mechanism=mechanism,
    )


def _self_test() -> str | None:
    """Check the object layouts on throwaway objects before trusting them.

    A context whose ``num_tickets`` was set through Python must read back the
    same through C, its method must be ``TLS_server_method()``, and an
    ``SSL`` made from a client context must point back at that context.
    """
    server = STDLIB_CONTEXT(ssl.PROTOCOL_TLS_SERVER)
    server.num_tickets = 7
    sptr = lib.tlsctl_ctx_of(id(server))
    if lib.tlsctl_ctx_method_kind(sptr) != lib.TLSCTL_KIND_SERVER:
        return "SSLContext does not hold an SSL_CTX from the bound library"
    if lib.SSL_CTX_get_num_tickets(sptr) != 7:
        return "SSL_CTX_get_num_tickets disagrees with SSLContext.num_tickets"
    client = STDLIB_CONTEXT(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # no server_hostname: no IDNA codec import
    conn = client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    cptr = lib.tlsctl_ctx_of(id(client))
    if lib.tlsctl_ctx_method_kind(cptr) != lib.TLSCTL_KIND_CLIENT:
        return "client SSLContext has an unexpected method"
    sslptr = lib.tlsctl_ssl_of(id(conn._sslobj))  # type: ignore[attr-defined]
    if lib.SSL_get_SSL_CTX(sslptr) != cptr or lib.SSL_is_server(sslptr) != 0:
        return "_ssl._SSLSocket does not hold an SSL of its context"
    return None


# Symbols and version at import; the layout self-test (which makes the
# process's first SSL_CTX: OpenSSL's own start-up, which a server pays
# anyway when it makes its context) on the first info() call, which
# every call taking a pointer from a Python object makes first.
_INFO = _bind()
_TESTED = not _INFO.bound


def info() -> Info:
    """Return what tlsctl bound to, or why it could not bind."""
    global _INFO, _TESTED
    if not _TESTED:
        _TESTED = True
        problem = _self_test()
        if problem is not None:
            _INFO = _failed(
                f"layout self-test failed: {problem}",
                via=_INFO.via,
                library=_INFO.library,
            )
    return _INFO


def require_bound(what: str = "this call") -> None:
    """Raise ``NotBoundError`` (a ``BindingError`` and an
    ``UnsupportedError``) unless binding succeeded; ``what`` names the API
    or setting that needs the binding."""
    bound = info()
    if not bound.bound:
        python = (
            " (memory-BIO servers still get tickets='defer' through the python "
            "mechanism)"
            if bound.mechanism == "python"
            else ""
        )
        raise NotBoundError(
            f"tlsctl is not bound to this interpreter's OpenSSL, and {what} "
            f"needs the binding: {bound.reason}{python}"
        )


def openssl_errors() -> tuple[str, ...]:
    """Drain this thread's OpenSSL error queue into text, oldest first."""
    out: list[str] = []
    buf = ffi.new("char[]", 256)
    while True:
        code = lib.ERR_get_error()
        if code == 0:
            return tuple(out)
        lib.ERR_error_string_n(code, buf, len(buf))
        out.append(ffi.string(buf).decode(errors="replace"))


def ctx_pointer(ctx: object) -> tuple[Any, int]:
    """Return ``(SSL_CTX *, method kind)`` for a stdlib ``ssl.SSLContext``.

    Raises ``TypeError`` for anything that is not an ``ssl.SSLContext`` and
    ``BindingError`` when its ``SSL_CTX`` is not proven to come from the bound
    OpenSSL.  Nothing is called on the context before that proof.
    """
    check_context(ctx)
    require_bound()
    ptr = lib.tlsctl_ctx_of(id(ctx))
    kind = int(lib.tlsctl_ctx_method_kind(ptr))
    if kind == lib.TLSCTL_KIND_UNKNOWN:
        raise BindingError(
            "this SSLContext's SSL_CTX does not use TLS_method(), "
            "TLS_server_method() or TLS_client_method() of the bound OpenSSL "
            "(a deprecated fixed-version protocol, or another OpenSSL instance); "
            "it was left untouched"
        )
    return ptr, kind


def check_context(ctx: object) -> None:
    """``TypeError`` unless ``ctx`` is a stdlib ``ssl.SSLContext``."""
    # type(), not isinstance(): a Mock(spec=ssl.SSLContext) fakes __class__.
    if not issubclass(type(ctx), STDLIB_CONTEXT):
        raise TypeError(
            f"expected an ssl.SSLContext, got {type(ctx).__module__}."
            f"{type(ctx).__qualname__} (only the stdlib ssl module's objects "
            "are supported)"
        )


def serving_context(ctx: Any) -> Any:
    """The stdlib context whose ``wrap_socket`` / ``wrap_bio`` make ``ctx``'s
    connections: ``ctx`` itself, or for a truststore ``SSLContext`` (a
    subclass that makes its connections through an inner stdlib context,
    ``_ctx``) that inner context.  Anything else is returned as is, for
    ``ctx_pointer`` to judge."""
    inner = getattr(ctx, "_ctx", None) if type(ctx) is not STDLIB_CONTEXT else None
    if (
        inner is not None
        and type(ctx).__module__.split(".")[0] == "truststore"
        and issubclass(type(inner), STDLIB_CONTEXT)
    ):
        return inner
    return ctx


#: The client method kind where nothing is bound (``ctx.protocol`` is
#: ``PROTOCOL_TLS_CLIENT``), for ``require_server_kind``.
KIND_CLIENT = -1


def require_server_kind(kind: int, what: str) -> None:
    """``ValueError`` unless a context's method ``kind`` (from
    ``ctx_pointer``) can serve; ``what`` names the API that needs it."""
    if kind == (lib.TLSCTL_KIND_CLIENT if lib is not None else KIND_CLIENT):
        raise ValueError(
            f"{what} needs a server context (PROTOCOL_TLS_SERVER or "
            "PROTOCOL_TLS); this one was made with PROTOCOL_TLS_CLIENT"
        )


def is_connection(conn: object) -> bool:
    """True for real ``ssl.SSLSocket`` / ``ssl.SSLObject`` instances (by
    ``type()``, which a mock cannot fake)."""
    return issubclass(type(conn), (ssl.SSLSocket, ssl.SSLObject))


def sslobj_pointer(sslobj: Any) -> Any:
    """Return the ``SSL *`` of a connection's ``_ssl._SSLSocket``.

    Raises ``ConnectionStateError`` when there is none (closed, unwrapped,
    never connected), ``TypeError`` when it is not exactly
    ``_ssl._SSLSocket``, and ``BindingError`` when its ``SSL`` is not proven
    to belong to its (proven) context.
    """
    if sslobj is None:
        raise ConnectionStateError(
            "the connection has no TLS state (closed, unwrapped or not connected)"
        )
    if type(sslobj) is not SSL_SOCKET_TYPE:
        raise TypeError(
            f"conn._sslobj is {type(sslobj).__qualname__}, not _ssl._SSLSocket"
        )
    if info().bound:
        # The whole proof in one C call (it runs once per connection, on
        # its first write); _ssl._SSLSocket.context is always a real
        # _ssl._SSLContext, so its id() is safe to cast.
        ptr = lib.tlsctl_proven_ssl(id(sslobj), id(sslobj.context))
        if ptr != ffi.NULL:
            return ptr
    ctx_pointer(sslobj.context)  # raises the precise reason when it can
    raise BindingError(
        "the connection's SSL does not belong to its SSLContext's SSL_CTX"
    )
