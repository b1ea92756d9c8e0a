"""Send the ACK of the client's Finished at once on memory-BIO servers.

Theory of operation
===================

The stall.  After a TLS 1.3 handshake the client has just written its
Finished (a small segment, not yet acknowledged).  A client without
``TCP_NODELAY`` (plain ``socket`` + ``ssl``, Java's default) then writes its
first request, and Nagle's algorithm holds that request back until the
Finished is acknowledged.  A stock OpenSSL server writes its
NewSessionTickets right after reading the Finished, and that segment carries
the ACK.  A server patched with ``tickets="defer"`` or ``"suppress"`` writes
nothing after the handshake, so the ACK waits for the delayed-ACK timer
(~40 ms on Linux) and so does the client's first request (figures in
docs/performance.md, "On the wire").

The fix.  ``setsockopt(IPPROTO_TCP, TCP_QUICKACK, 1)`` on the server's socket
right after the server's handshake completes makes Linux send the pending
ACK immediately (tcp(7); ``__tcp_sock_set_quickack`` in net/ipv4/tcp.c
calls ``tcp_cleanup_rbuf`` when an ACK is scheduled).  The option is not
permanent (tcp(7)): it acts on the ACK pending now, which is exactly the
Finished's, and the kernel goes back to delayed ACKs by itself.  So the
moment matters: after the server's handshake, before the event loop goes
back to waiting.  Set on the accepted socket before the handshake it does
nothing for this ACK (measured: docs/performance.md, "Behind the design").

Sockets (``ctx.wrap_socket``) are handled in C by tlsctl's info callback.
Memory-BIO servers never hand tlsctl their socket, and an ``ssl.SSLObject``
cannot find it: ``_ssl._SSLSocket`` keeps its two ``MemoryBIO`` objects in
C, unexposed, and a ``MemoryBIO`` refers to nothing.  So the hook has to sit
in the framework, at the point where it has both the finished handshake and
its transport:

* asyncio (``asyncio.sslproto.SSLProtocol``, both implementations): its
  ``_on_handshake_complete(self, handshake_exc)`` is called with ``None``
  right after a successful ``do_handshake()`` and before the application's
  ``connection_made``.  Private, but present with that name and signature in
  both implementations (checked: 3.9.18, 3.10.13, 3.11.7, 3.12.1, 3.13.0);
  ``install()`` checks both before wrapping it and reports the hook
  unavailable otherwise.  The socket comes from the public
  ``transport.get_extra_info("socket")``.
* trio (``trio.SSLStream``): its ``_do_handshake(self)`` coroutine is what
  both the public ``do_handshake()`` and the implicit handshake of
  ``send_all`` / ``receive_some`` run, once, through ``_Once``.  Private,
  checked the same way (checked: trio 0.31.0 and 0.35.0).  The socket comes
  from the public ``transport_stream.socket`` (``trio.SocketStream``).
* uvloop: its ``SSLProtocol`` is a Cython ``cdef class`` whose handshake
  path consists of ``cdef`` methods that cannot be wrapped (uvloop 0.23.0
  sslproto.pxd: ``cdef inline _do_handshake(self)``, ``cdef inline
  _on_handshake_complete(self, handshake_exc)``; sslproto.pyx lines 507-556),
  and it keeps its transport in a C field (``object _transport``).  Its one
  call into Python with both the connection and the socket at hand is the
  application protocol's ``connection_made(app_transport)``, made
  synchronously right after the handshake (line 551; the transport answers
  ``get_extra_info("ssl_object")`` and ``("socket")``).  So tlsctl wraps
  ``connection_made`` of the server protocols it knows: asyncio's
  ``StreamReaderProtocol`` (``asyncio.start_server``, hypercorn's uvloop
  worker), uvicorn's ``H11Protocol`` and ``HttpToolsProtocol``, aiohttp's
  ``RequestHandler`` and websockets' asyncio ``Connection``; the wrapper
  acts only on uvloop's transports (the stdlib loop's hook came first),
  and is installed only once ``uvloop`` itself is imported, so servers on
  the stdlib loop pay nothing for it.
  Another protocol on uvloop calls ``tlsctl.quickack(transport)`` first in
  its ``connection_made``.  STARTTLS on uvloop (``loop.start_tls``,
  ``StreamWriter.start_tls``) calls no ``connection_made`` (uvloop passes
  ``call_connection_made=False``): the application calls
  ``tlsctl.quickack(writer)`` right after ``await start_tls(...)``.

Only connections that need it are touched: server side, a finished TLS 1.3
handshake, and the policy ``defer`` or ``suppress``, as
``tlsctl.connection_state()`` reports it (the policy fixed when the
connection was created, so a connection whose SNI callback switched contexts
is judged by the context it was created from).  Client-side connections,
TLS 1.2 (tlsctl leaves it stock), stock contexts and ``immediate`` return
before any system call.  The check is one call into the binding per
handshake (``quiet``: the policy recorded in the connection's ex_data, its
side, version and handshake state); under the python mechanism
(``TLSCTL_MECHANISM=python``), whose ``defer`` connections the binding
records as policy-less at most, anything but a yes from it is asked again
through ``connection_state()``.  Only TCP sockets take the option (any other
refuses it), and an error from ``setsockopt`` is ignored (the connection
then behaves as without this module).  Without ``socket.TCP_QUICKACK``
(not Linux) nothing is installed.

Lazy installation.  ``install()`` wraps the hooks of frameworks already
imported (``sys.modules``); it never imports a framework itself.  For a
framework imported later, it leaves a finder on ``sys.meta_path`` that
declines every import except the watched module names; for those it lets
the other finders find the module and runs the hook right after the
module's code has executed, then puts the module's own loader back and
removes itself once nothing is left to watch.  A hook that waits for
another module (the uvloop ones wait for ``uvloop``) is installed when
both are imported, in either order.
"""

from __future__ import annotations

import _thread
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # (nothing here at run time: import cost, see test_import)
    import importlib.machinery
    from collections.abc import Sequence
    from types import ModuleType
    from typing import Any, Callable

__all__ = ["install", "quickack", "status"]

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_QUIET_POLICIES = ("defer", "suppress")  # policies that send no ticket in the handshake
_MARK = "_tlsctl_quickack"  # set on our wrappers: never wrap twice

# Status words (see status()).
ACTIVE = "active"
NOT_IMPORTED = "not imported"
NOT_INSTALLED = "not installed"

_UVLOOP_REASON = (
    "partial: uvloop's SSLProtocol is Cython; the server protocols marked "
    "'uvloop: ...' are hooked, any other calls tlsctl.quickack(transport) "
    "first in its connection_made"
)

_lock = _thread.allocate_lock()
_installed = False
_results: dict[str, str] = {}  # framework -> "active" or "unavailable: ..."
_pending: dict[str, ModuleType] = {}  # framework -> its module, waiting for uvloop
_connection_state: Callable[[Any], Any] | None = None
_quiet: Callable[[Any], bool | None] | None = None  # the binding's, if bound
_python_mechanism = False  # TLSCTL_MECHANISM=python with the binding


def quickack(obj: Any, /) -> bool:
    """Set ``TCP_QUICKACK`` on the TCP socket behind ``obj``, now.

    ``obj``: a socket (``socket.socket``, asyncio's ``TransportSocket``,
    uvloop's ``PseudoSocket``, a ``trio.socket`` socket), an asyncio or
    uvloop transport or ``StreamWriter`` (anything with
    ``get_extra_info("socket")``), or a ``trio.SocketStream`` (``.socket``).
    The remedy where tlsctl cannot hook in (a protocol of your own on
    uvloop): call it first thing in its ``connection_made(transport)``.
    Public as ``tlsctl.quickack``.

    Returns whether the option was set: ``False`` without
    ``socket.TCP_QUICKACK`` (not Linux), for a non-TCP socket (``AF_UNIX``),
    or when ``setsockopt`` failed; it never raises ``OSError``.
    """
    if _QUICKACK is None:
        return False
    sock = obj
    if hasattr(obj, "get_extra_info"):
        sock = obj.get_extra_info("socket")
    elif not hasattr(obj, "family") and hasattr(obj, "socket"):
        sock = obj.socket  # trio.SocketStream
    try:
        # A socket that is not TCP refuses the option (EOPNOTSUPP from
        # AF_UNIX, ENOPROTOOPT from UDP): that is the test, without the
        # enum conversions of .family and .type (~5 us, cold).
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (AttributeError, OSError):
        return False
    return True


def _needs_quickack(sslobj: Any) -> bool:
    """A server-side TLS 1.3 connection whose handshake is done and whose
    tlsctl policy sends no ticket in the handshake.  Never raises.

    One C call (``quiet``) answers for the connections tlsctl's C side
    set up; only under the python mechanism, whose ``defer`` connections
    the binding tracks without their policy (or not at all), does anything
    but a yes go on to ``connection_state()``'s Python (with it for every
    connection, the asyncio hook cost ~19 us per handshake, cold:
    docs/performance.md, "Server CPU")."""
    state_of = _connection_state
    if sslobj is None or state_of is None:
        return False
    quiet = _quiet
    if quiet is not None:
        try:
            answer = quiet(sslobj._sslobj)
        except Exception:  # no _sslobj: not a connection tlsctl set up
            answer = None
        if answer or not _python_mechanism:
            return bool(answer)
    try:
        if not sslobj.server_side or sslobj.version() != "TLSv1.3":
            return False
        return state_of(sslobj).policy in _QUIET_POLICIES
    except Exception:
        return False


# ------------------------------------------------------------------ asyncio


def _asyncio_handshake_done(protocol: Any) -> None:
    """After a successful server handshake in ``asyncio.sslproto``.

    CPython 3.11+ (sslproto.py rewritten): ``_do_handshake`` calls
    ``self._sslobj.do_handshake()`` and then ``self._on_handshake_complete(
    None)`` (3.11.7 lines 555-563, 3.12.1 555-563, 3.13.0 558-566); the
    SSLObject is ``self._sslobj``.  CPython 3.9 / 3.10 (``_SSLPipe``):
    ``_SSLPipe.feed_ssldata`` calls ``self._sslobj.do_handshake()`` then
    ``self._handshake_cb(None)`` (3.9.18 / 3.10.13 lines 188-191), the bound
    ``SSLProtocol._on_handshake_complete`` that ``_process_write_backlog``
    passed (lines 682-683); the SSLObject is ``self._sslpipe.ssl_object``
    (property, line 83).  Both store the socket transport in
    ``self._transport`` in ``connection_made`` (3.9.18 / 3.10.13 line 482,
    3.11.7 / 3.12.1 line 384, 3.13.0 line 387).
    """
    sslobj = getattr(protocol, "_sslobj", None)
    if sslobj is None:
        sslobj = getattr(getattr(protocol, "_sslpipe", None), "ssl_object", None)
    if _needs_quickack(sslobj):
        transport = getattr(protocol, "_transport", None)
        if transport is not None:
            quickack(transport)


def _hook_asyncio(module: ModuleType) -> str:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def _on_handshake_complete(self: Any, handshake_exc: Any) -> Any:
            if handshake_exc is None:
                try:
                    _asyncio_handshake_done(self)
                except Exception:  # never let the nudge break a handshake
                    pass
            return original(self, handshake_exc)

        return _on_handshake_complete

    return _wrap_method(
        module, "SSLProtocol", "_on_handshake_complete", ("self", "handshake_exc"), wrap
    )


# --------------------------------------------------------------------- trio


def _trio_handshake_done(stream: Any) -> None:
    """After ``trio.SSLStream._do_handshake`` returned: it awaits
    ``self._retry(self._ssl_object.do_handshake, is_handshake=True)``
    (trio 0.35.0 trio/_ssl.py lines 647-652); ``__init__`` made the SSLObject
    with ``ssl_context.wrap_bio`` into ``self._ssl_object`` (lines 378-383)
    and keeps the public ``transport_stream`` (line 372)."""
    if _needs_quickack(getattr(stream, "_ssl_object", None)):
        transport = getattr(stream, "transport_stream", None)
        sock = getattr(transport, "socket", None)
        if sock is not None:
            quickack(sock)


def _hook_trio(module: ModuleType) -> str:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        async def _do_handshake(self: Any) -> None:
            await original(self)
            try:
                _trio_handshake_done(self)
            except Exception:  # never let the nudge break a handshake
                pass

        return _do_handshake

    return _wrap_method(
        module, "SSLStream", "_do_handshake", ("self",), wrap, where="trio.SSLStream"
    )


# ------------------------------------------------------------------- uvloop


def _uvloop_connection_made(transport: Any) -> None:
    """In a hooked protocol's ``connection_made``: on uvloop's TLS transport
    (``uvloop.loop._SSLProtocolTransport``) of a quiet server connection,
    the socket gets the option.  The stdlib loop's transports are left to
    the ``asyncio`` hook, which already ran."""
    if type(transport).__module__ != "uvloop.loop":
        return
    if _needs_quickack(transport.get_extra_info("ssl_object")):
        quickack(transport)


def _connection_made_hook(class_name: str) -> Callable[[ModuleType], str]:
    """The hook wrapping ``connection_made(self, transport)`` of the module's
    ``class_name`` (subclasses that call ``super()`` are covered too)."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def connection_made(self: Any, transport: Any) -> Any:
            try:
                _uvloop_connection_made(transport)
            except Exception:  # never let the nudge break a connection
                pass
            return original(self, transport)

        return connection_made

    def hook(module: ModuleType) -> str:
        return _wrap_method(
            module, class_name, "connection_made", ("self", "transport"), wrap
        )

    return hook


def _wrap_method(
    module: ModuleType,
    class_name: str,
    method: str,
    parameters: Sequence[str],
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    where: str | None = None,
) -> str:
    """Replace ``module.<class_name>.<method>`` with ``wrap(original)``
    (``functools.wraps`` and ``_MARK`` applied here), once; ACTIVE, or
    ``"unavailable: ..."`` when it is missing or its signature is not
    exactly ``parameters`` (an ``async def`` for an ``async def`` wrapper)."""
    import functools
    import inspect

    name = f"{where or module.__name__ + '.' + class_name}.{method}"
    cls = getattr(module, class_name, None)
    original = getattr(cls, method, None)
    if cls is None or original is None:
        return f"unavailable: {name} not found"
    if getattr(original, _MARK, False):
        return ACTIVE
    wrapper = wrap(original)
    if not _has_parameters(original, parameters) or inspect.iscoroutinefunction(
        wrapper
    ) != inspect.iscoroutinefunction(original):
        return f"unavailable: {name} has an unexpected signature"
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    setattr(cls, method, wrapper)
    return ACTIVE


def _has_parameters(func: Any, names: Sequence[str]) -> bool:
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return [p.name for p in params] == list(names) and all(
        p.kind is p.POSITIONAL_OR_KEYWORD for p in params
    )


if TYPE_CHECKING:
    # (module holding the hook, the function hooking it, a module that must
    # be imported first or None)
    _Hook = tuple[str, Callable[[ModuleType], str], str | None]


def _on_uvloop(module_name: str, class_name: str) -> _Hook:
    """A server protocol's ``connection_made`` hook, waiting for uvloop."""
    return (module_name, _connection_made_hook(class_name), "uvloop")


# framework -> its _Hook: the uvloop hooks wait for uvloop, so a server on
# the stdlib loop never runs them (the asyncio hook serves it).
_HOOKS: dict[str, _Hook] = {
    "asyncio": ("asyncio.sslproto", _hook_asyncio, None),
    "trio": ("trio._ssl", _hook_trio, None),
    "uvloop: start_server": _on_uvloop("asyncio.streams", "StreamReaderProtocol"),
    "uvloop: uvicorn h11": _on_uvloop("uvicorn.protocols.http.h11_impl", "H11Protocol"),
    "uvloop: uvicorn httptools": _on_uvloop(
        "uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"
    ),
    "uvloop: aiohttp": _on_uvloop("aiohttp.web_protocol", "RequestHandler"),
    "uvloop: websockets": _on_uvloop("websockets.asyncio.connection", "Connection"),
}
# framework -> module whose import means the framework is in use
_UNREACHABLE: dict[str, tuple[str, str]] = {"uvloop": ("uvloop", _UVLOOP_REASON)}


# --------------------------------------------------------- lazy installation


def _loaded(name: str) -> ModuleType | None:
    """``sys.modules[name]`` once its code has run (not while it executes,
    when another thread may be importing it)."""
    module = sys.modules.get(name)
    if module is None or getattr(module.__spec__, "_initializing", False):
        return None
    return module


def _hook(framework: str, module: ModuleType) -> None:
    """Run one framework's hook (caller holds ``_lock``)."""
    if framework in _results:
        return
    try:
        _results[framework] = _HOOKS[framework][1](module)
    except Exception as exc:  # pragma: no cover - a framework we cannot read
        _results[framework] = f"unavailable: {type(exc).__name__}: {exc}"


def _ready(framework: str, module: ModuleType) -> None:
    """The framework's module has run: hook it, or, while the module it
    waits for (uvloop) is not imported, keep it for then (caller holds
    ``_lock``).  That module counts from the start of its import: the
    uvloop hooks act on uvloop's transports only, so being early is
    harmless, and a module whose import is under way is never found again
    by the finder.  Watch first, then look again: that leaves a window of a
    few instructions for an import starting at that moment in another
    thread."""
    requires = _HOOKS[framework][2]
    if requires is None or requires in sys.modules:
        _hook(framework, module)
        return
    _pending[framework] = module
    _finder.watch(requires, requires)
    if requires in sys.modules:  # its import began meanwhile
        _finder.done(requires)
        _imported(requires)


def _imported(name: str) -> None:
    """A watched module ran or is running: hook what waits for it (caller
    holds ``_lock``)."""
    for framework, (_, _, requires) in _HOOKS.items():
        if requires == name and framework in _pending:
            _hook(framework, _pending.pop(framework))


class _HookingLoader:
    """The watched module's own loader, plus the hook after its code ran."""

    def __init__(self, loader: Any, framework: str) -> None:
        self._loader = loader
        self._framework = framework  # or the module others wait for

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        # The module sees its own loader, as without tlsctl.
        if spec is not None:
            spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        with _lock:
            _finder.done(self._framework)
            if self._framework in _HOOKS:
                _ready(self._framework, module)
            else:
                _imported(self._framework)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...
        return getattr(self._loader, name)


class _PostImportFinder:
    """Declines every import; for a watched module, asks the finders after
    it and hands back their spec with a loader that hooks after exec."""

    def __init__(self) -> None:
        # module name -> framework, or the name itself for a module that
        # frameworks wait for
        self._watched: dict[str, str] = {}
        self._busy = _thread._local()

    def watch(self, module_name: str, framework: str) -> None:
        self._watched[module_name] = framework
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def done(self, framework: str) -> None:
        for name, fw in list(self._watched.items()):
            if fw == framework:
                del self._watched[name]
        if not self._watched:
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        framework = self._watched.get(fullname)
        if framework is None or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = _find_after(self, fullname, path, target)
        finally:
            self._busy.active = False
        if spec is None or spec.loader is None:
            return spec
        if not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookingLoader(spec.loader, framework)  # type: ignore[assignment]
        return spec


def _find_after(
    me: object, fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    finders: list[object] = list(sys.meta_path)
    start = finders.index(me) + 1 if me in finders else 0
    for finder in finders[start:]:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec: importlib.machinery.ModuleSpec | None = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


_finder = _PostImportFinder()


# ---------------------------------------------------------------- public


def install() -> None:
    """Hook the memory-BIO frameworks so that the server's socket gets
    ``TCP_QUICKACK`` right after a ``defer`` / ``suppress`` handshake.

    Idempotent, thread-safe and cheap after the first call (one global
    read).  Frameworks already imported are hooked now; the others when
    they are imported.  It imports none of them.  Does nothing where
    ``socket.TCP_QUICKACK`` does not exist.  ``tlsctl.patch()`` calls it.
    """
    global _installed, _connection_state, _quiet, _python_mechanism
    if _installed:
        return
    with _lock:
        if _installed:
            return
        if _QUICKACK is not None:
            from tlsctl import _bind
            from tlsctl._policy import connection_state

            _quiet = _bind.fast.get("quiet")
            _python_mechanism = _bind.info().mechanism == "python"
            _connection_state = connection_state
            for framework, (module_name, _, _) in _HOOKS.items():
                module = _loaded(module_name)
                if module is not None:
                    _ready(framework, module)
                else:
                    _finder.watch(module_name, framework)
        _installed = True


def status() -> dict[str, str]:
    """Per hook (``asyncio``, ``trio``, ``uvloop: <server protocol>``) and
    for ``uvloop`` itself, for ``python -m tlsctl doctor``: ``"active"``
    (hooked), ``"unavailable: <reason>"``, ``"not imported"`` (hooked when
    it, and for ``uvloop: ...`` uvloop, is imported, if ``install()`` ran),
    ``"not installed"`` (imported, but ``install()`` has not run);
    ``uvloop``, once imported, is ``"partial: ..."`` (only the hooked
    protocols are reached)."""
    out: dict[str, str] = {}
    with _lock:
        for framework, (module_name, _, _) in _HOOKS.items():
            if _QUICKACK is None:
                out[framework] = "unavailable: no socket.TCP_QUICKACK (Linux only)"
            elif framework in _results:
                out[framework] = _results[framework]
            elif _loaded(module_name) is None or framework in _pending:
                out[framework] = NOT_IMPORTED
            else:
                out[framework] = NOT_INSTALLED
        for framework, (module_name, reason) in _UNREACHABLE.items():
            if _QUICKACK is None:
                out[framework] = "unavailable: no socket.TCP_QUICKACK (Linux only)"
            elif module_name not in sys.modules:
                out[framework] = NOT_IMPORTED
            elif not _installed:
                out[framework] = NOT_INSTALLED
            else:
                out[framework] = reason
    return out
