"""Patch every stdlib ``ssl.SSLContext`` made in this process with tlsctl.

For running other projects' test suites (CPython's ``test_ssl``, trio's
``test_ssl``) with tlsctl in every server context: put this folder first on
the child process's ``PYTHONPATH`` and set ``TLSCTL_PATCH_ALL`` to a policy
(``defer``, ``suppress`` or ``immediate``).  Python's ``site`` module imports
this file at start-up (``python -S`` and ``python -I`` skip it).

* The ssl module's real ``SSLContext`` class (``tlsctl._bind.STDLIB_CONTEXT``,
  which truststore's swap of ``ssl.SSLContext`` cannot hide) gets a
  ``__new__`` that passes each new context to ``tlsctl.patch(ctx,
  tickets=policy)``, right after ``_ssl`` made its ``SSL_CTX``.  Subclasses
  are covered too (they inherit it).
* Contexts tlsctl refuses by design stay stock and are counted by reason:
  ``client`` (``PROTOCOL_TLS_CLIENT``: ``ValueError``) and ``fixed-version``
  (``PROTOCOL_TLSv1`` .. ``PROTOCOL_TLSv1_2``: ``BindingError``).  Any other
  refusal is counted as ``unexpected`` with its exception, which the tests
  reading the summary treat as a failure.
* At exit the process prints one line to stderr::

      tlsctl-patch-all: pid=123 policy=defer patched=120 \
server_connections=410 stock=352 client=340 fixed-version=12 unexpected=0

  and, with ``TLSCTL_PATCH_ALL_REPORT=FILE``, appends the same counts as a JSON
  line to FILE (plus the first unexpected errors), so that a test can assert
  that patching really happened.  Only the process that imported this file
  prints: a ``fork()`` child inherits the counts but not the duty.
* An existing ``sitecustomize`` further along ``sys.path`` (Debian's
  ``/etc/python3.X/sitecustomize.py``, a distribution's or a tool's) is
  imported after this one, as ddtrace's and opentelemetry's bootstrap
  ``sitecustomize`` modules do: this folder leaves ``sys.path``, the next
  ``sitecustomize`` is imported, and this module stays reachable as
  ``tlsctl_patch_all``.
* Server-side connections made on a patched context are counted too
  (``server_connections``): ``SSLSocket._create`` and ``SSLObject._create``
  (which ``wrap_socket`` / ``wrap_bio`` call, before tlsctl's hooks apply the
  context's policy) count them, so a run whose patched contexts never served
  is visible as such.

Known artefact: a warning that ``SSLContext.__new__`` or ``_ssl`` emits with
``stacklevel=2`` (``SSLContext()`` without a protocol, a deprecated
protocol constant) is attributed to this file instead of the caller, because
the wrapper is one more Python frame.  The warning itself (category, text)
is unchanged.

Without ``TLSCTL_PATCH_ALL`` (or with it empty) nothing is patched and
nothing is printed; an unknown policy stops the interpreter at start-up.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from typing import Any

ENV = "TLSCTL_PATCH_ALL"
REPORT_ENV = "TLSCTL_PATCH_ALL_REPORT"
TAG = "tlsctl-patch-all:"
REASONS = ("client", "fixed-version", "unexpected")
_MAX_ERRORS = 20  # unexpected refusals kept verbatim for the report

_lock = threading.Lock()
_counts: dict[str, int] = {
    "patched": 0,
    "server_connections": 0,
    **dict.fromkeys(REASONS, 0),
}
_errors: list[str] = []
_owner_pid = os.getpid()
_policy = ""


def _count(key: str, error: str | None = None) -> None:
    with _lock:
        _counts[key] += 1
        if error is not None and len(_errors) < _MAX_ERRORS:
            _errors.append(error)


def _fixed_version_protocols() -> frozenset[Any]:
    import ssl

    names = [f"PROTOCOL_TLSv1{v}" for v in ("", "_1", "_2")]
    names += ["PROTOCOL_SSLv2", "PROTOCOL_SSLv3"]
    return frozenset(getattr(ssl, n) for n in names if hasattr(ssl, n))


def install(policy: str) -> None:
    """Wrap the stdlib ``SSLContext.__new__`` so that every new context is
    patched with ``policy`` (or counted as left stock)."""
    global _policy
    import ssl

    import tlsctl
    from tlsctl import _bind

    if policy not in tlsctl.POLICIES:
        raise ValueError(f"{ENV}={policy!r}: expected one of {tlsctl.POLICIES}")
    if not tlsctl.info().bound:
        raise RuntimeError(f"{ENV}: tlsctl is not bound: {tlsctl.info().reason}")
    cls = _bind.STDLIB_CONTEXT
    if getattr(cls.__new__, "_tlsctl_patch_all", False):
        return  # imported twice (a sys.modules reset): wrap once only
    _policy = policy
    original = cls.__new__
    fixed = _fixed_version_protocols()
    patch = tlsctl.patch
    binding_error = tlsctl.BindingError

    def __new__(klass: type[Any], *args: Any, **kwargs: Any) -> Any:
        ctx = original(klass, *args, **kwargs)
        try:
            patch(ctx, tickets=policy)
        except ValueError as exc:
            if ctx.protocol == ssl.PROTOCOL_TLS_CLIENT:
                _count("client")
            else:
                _count("unexpected", f"{type(exc).__name__}: {exc}")
        except binding_error as exc:
            if ctx.protocol in fixed:
                _count("fixed-version")
            else:
                _count("unexpected", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            _count("unexpected", f"{type(exc).__name__}: {exc}")
        else:
            _count("patched")
        return ctx

    __new__.__doc__ = original.__doc__
    __new__.__qualname__ = original.__qualname__
    __new__._tlsctl_patch_all = True  # type: ignore[attr-defined]
    __new__.__wrapped__ = original  # type: ignore[attr-defined]
    # A function assigned to __new__ after the class was made is not turned
    # into a staticmethod by type(): do it here.
    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    from tlsctl import _wrap

    for conn_cls in (ssl.SSLSocket, ssl.SSLObject):
        _count_server_connections(conn_cls, _wrap.PLAN_ATTR)
    atexit.register(_report)


def _count_server_connections(conn_cls: type[Any], plan_attr: str) -> None:
    """Wrap ``conn_cls._create`` (a classmethod, called with keywords by
    ``wrap_socket`` / ``wrap_bio`` on 3.9 .. 3.14) to count the server-side
    connections of contexts that tlsctl will apply a policy to."""
    create = conn_cls.__dict__["_create"].__func__

    def _create(klass: type[Any], *args: Any, **kwargs: Any) -> Any:
        conn = create(klass, *args, **kwargs)
        context = kwargs.get("context")
        if kwargs.get("server_side") and plan_attr in getattr(context, "__dict__", ()):
            _count("server_connections")
        return conn

    _create.__doc__ = create.__doc__
    _create.__qualname__ = create.__qualname__
    _create.__wrapped__ = create  # type: ignore[attr-defined]
    conn_cls._create = classmethod(_create)


def summary() -> dict[str, Any]:
    """The counts so far (``stock`` is the sum of the refusals)."""
    with _lock:
        counts = dict(_counts)
        errors = list(_errors)
    stock = sum(counts[r] for r in REASONS)
    return {
        "pid": os.getpid(),
        "policy": _policy,
        **counts,
        "stock": stock,
        "errors": errors,
    }


def format_summary(data: dict[str, Any]) -> str:
    fields = ["pid", "policy", "patched", "server_connections", "stock", *REASONS]
    return TAG + " " + " ".join(f"{k}={data[k]}" for k in fields)


def _report() -> None:
    if os.getpid() != _owner_pid:
        return  # a fork() child: its parent reports
    data = summary()
    sys.stderr.write(format_summary(data) + "\n")
    for error in data["errors"]:
        sys.stderr.write(f"{TAG} unexpected: {error}\n")
    sys.stderr.flush()
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")


def _import_next_sitecustomize() -> None:
    """Import the ``sitecustomize`` this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    kept = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    ours = sys.modules.pop("sitecustomize")
    sys.modules["tlsctl_patch_all"] = ours
    try:
        import sitecustomize  # noqa: F401  (the next one, if any)
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
        sys.modules["sitecustomize"] = ours
    finally:
        sys.path[:] = kept


def _main() -> None:
    policy = os.environ.get(ENV, "")
    if policy:
        try:
            install(policy)
        except Exception as exc:
            # site.py would print one line and go on unpatched: a run that
            # silently patches nothing is worse than one that does not start.
            sys.stderr.write(f"{TAG} cannot patch: {exc}\n")
            sys.stderr.flush()
            os._exit(2)
    _import_next_sitecustomize()


if __name__ == "sitecustomize":
    _main()
