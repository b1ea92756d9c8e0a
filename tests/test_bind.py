"""tlsctl._bind: binding to the interpreter's own OpenSSL, and refusing
everything it cannot prove."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tlsctl
from conftest import needs_binding


def _mapped_libssl() -> set[str]:
    """Real paths of every libssl mapped into this process (Linux)."""
    with open("/proc/self/maps") as maps:
        return {
            os.path.realpath(line.split()[-1])
            for line in maps
            if "/libssl" in line.split()[-1]
        }


@needs_binding
def test_bound_to_the_interpreters_own_libssl() -> None:
    info = tlsctl.info()
    print(f"\n[bind] {info}")
    assert info.bound, info.reason
    assert info.reason is None
    assert info.openssl_version == ssl.OPENSSL_VERSION
    assert info.openssl_version_number == ssl.OPENSSL_VERSION_NUMBER
    assert info.via is not None
    if sys.platform.startswith("linux"):
        mapped = _mapped_libssl()
        if mapped:  # _ssl links libssl dynamically
            assert info.library is not None
            assert os.path.realpath(info.library) in mapped
            assert len(mapped) == 1, f"more than one libssl mapped: {mapped}"
    assert info.native_tickets == (ssl.OPENSSL_VERSION_NUMBER >= 0x30000000)
    forced = os.environ.get("TLSCTL_MECHANISM")
    assert info.mechanism == (forced or ("native" if info.native_tickets else "stash"))


def _python(
    code: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter (with ``options``); its stderr is
    the failure message when it fails."""
    proc = subprocess.run(
        [sys.executable, *options, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _run(prelude: str, body: str = "") -> dict[str, object]:
    """Import tlsctl in a fresh interpreter after ``prelude`` and report."""
    code = (
        textwrap.dedent(prelude)
        + textwrap.dedent(
            """
        import json, ssl, tlsctl
        info = tlsctl.info()
        out = {"bound": info.bound, "reason": info.reason, "via": info.via,
               "mechanism": info.mechanism}
        try:
            tlsctl.patch(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tickets="suppress")
            out["patch"] = "ok"
        except tlsctl.TlsctlError as exc:
            out["patch"] = type(exc).__name__ + ": " + str(exc)
        """
        )
        + textwrap.dedent(body)
        + "\nprint(json.dumps(out))\n"
    )
    result: dict[str, object] = json.loads(_python(code).stdout.splitlines()[-1])
    return result


@needs_binding  # (each failure below is reached from a binding that works)
def test_unreachable_ssl_module_fails_cleanly() -> None:
    out = _run("import _ssl\n_ssl.__file__ = '/nonexistent/_ssl.so'\n")
    assert out["bound"] is False
    assert "dlopen(/nonexistent/_ssl.so" in str(out["reason"])
    assert str(out["patch"]).startswith("NotBoundError: tlsctl is not bound")


@needs_binding
def test_hidden_symbols_fail_cleanly() -> None:
    """_ssl without a file (built in) and OpenSSL's symbols not global, as
    in python-build-standalone (uv) builds: nothing is reachable."""
    out = _run("import _ssl\ndel _ssl.__file__\n")
    assert out["bound"] is False
    assert "not reachable from the process's global symbols" in str(out["reason"])
    assert str(out["patch"]).startswith("NotBoundError")


@needs_binding
def test_global_symbols_are_used_when_ssl_is_built_in() -> None:
    """With OpenSSL loaded RTLD_GLOBAL and no _ssl file, binding goes
    through the global namespace and still proves the instance."""
    out = _run(
        "import os, sys\n"
        "sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)\n"
        "import _ssl\ndel _ssl.__file__\n"
    )
    assert out["bound"] is True, out["reason"]
    assert out["via"] == "global symbols"
    assert out["patch"] == "ok"


@pytest.mark.parametrize(
    ("prelude", "reason"),
    [
        (
            "import ssl\nssl.OPENSSL_VERSION_NUMBER += 0x100000\n",
            "not the interpreter's OpenSSL instance",
        ),
        ("import ssl\nssl.OPENSSL_VERSION = 'LibreSSL 3.9.2'\n", "is not OpenSSL"),
        (
            "import ssl\nssl.OPENSSL_VERSION_NUMBER = 0x1010007F\n",
            "older than OpenSSL 1.1.1",
        ),
    ],
    ids=["version-mismatch", "libressl", "too-old"],
)
@needs_binding
def test_unprovable_library_is_refused(prelude: str, reason: str) -> None:
    out = _run(prelude)
    assert out["bound"] is False
    assert reason in str(out["reason"])
    assert str(out["patch"]).startswith("NotBoundError")


@needs_binding
def test_unknown_forced_mechanism_is_refused() -> None:
    out = _run("import os\nos.environ['TLSCTL_MECHANISM'] = 'magic'\n")
    assert out["bound"] is False
    assert "TLSCTL_MECHANISM='magic' is not available" in str(out["reason"])


# An interpreter tlsctl cannot bind, as a user has it: no mechanism forced
# (the suite's stash axis sets TLSCTL_MECHANISM=stash, which needs the
# binding and is refused without it).
_ENV_UNFORCED = {k: v for k, v in os.environ.items() if k != "TLSCTL_MECHANISM"}


@needs_binding
def test_doctor_reports_unbound_reason() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import _ssl, sys; _ssl.__file__ = '/nonexistent/_ssl.so'\n"
            "from tlsctl.__main__ import main; sys.exit(main(['doctor']))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV_UNFORCED,
    )
    # Without the binding the python mechanism still serves memory-BIO
    # servers: doctor says what works and checks it live (exit 0).
    assert proc.returncode == 0, proc.stdout
    assert "dlopen(/nonexistent/_ssl.so" in proc.stdout
    assert "mechanism                python" in proc.stdout
    assert "ssl sockets              stock" in proc.stdout
    assert "live patched memory-BIO exchange" in proc.stdout
    assert "-> OK" in proc.stdout


def test_exception_hierarchy_and_openssl_text() -> None:
    for exc in (
        tlsctl.BindingError,
        tlsctl.UnsupportedError,
        tlsctl.ConnectionStateError,
        tlsctl.OpenSSLError,
    ):
        assert issubclass(exc, tlsctl.TlsctlError)
    err = tlsctl.OpenSSLError("call failed", ("error:0A000126:SSL routines::x",))
    assert str(err) == "call failed (OpenSSL: error:0A000126:SSL routines::x)"
    assert err.openssl_errors == ("error:0A000126:SSL routines::x",)
    assert str(tlsctl.TlsctlError("plain")) == "plain"


# The public names whose modules load with their first use (tlsctl.__init__).
LAZY_MODULES = (
    "tlsctl._inject",
    "tlsctl._keyfiles",
    "tlsctl._keyfork",
    "tlsctl._keysig",
    "tlsctl._lifecycle",
    "tlsctl._pyhold",
    "tlsctl._tickets",
)


def test_a_patching_server_loads_no_key_or_callback_module() -> None:
    """``import tlsctl``, ``patch()``, patched connections (memory BIO and
    socket), ``connection_state`` and ``issue_tickets`` load none of the
    modules behind the lazily loaded names (callbacks, keys, key files,
    injection, the python mechanism where another one serves); the first use
    of such a name loads its module."""
    code = (
        "import ssl, sys\n"
        "import tlsctl\n"
        "from tlsctl import scenarios\n"
        "certs = scenarios.make_certs()\n"
        "server = tlsctl.patch(scenarios.server_context(certs))\n"
        "client = scenarios.client_context(certs)\n"
        "done = scenarios.memory_bio_request_response(server, client)\n"
        "assert done.replies_ok == done.connections == 2, done\n"
        "assert done.early_bytes == 0 and done.tickets > 0, done\n"
        "sockets = scenarios.request_response(server, client, connections=2)\n"
        "assert sockets.replies_ok == 2, sockets\n"
        "conn = server.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)\n"
        "print(tlsctl.connection_state(conn).policy)\n"
        "try:\n"
        "    tlsctl.issue_tickets(conn)\n"
        "except tlsctl.TlsctlError as exc:\n"
        "    print(type(exc).__name__)\n"
        f"lazy = {LAZY_MODULES!r}\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
        "tlsctl.set_ticket_keys\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
    )
    policy, refused, loaded, after = _python(code).stdout.splitlines()
    assert policy == "defer"
    info = tlsctl.info()
    # issue_tickets() before the handshake: refused by the binding's check;
    # a connection of the python mechanism's, or no binding, refused first
    if info.mechanism != "python":
        assert refused == "ConnectionStateError"
    else:
        assert refused == ("UnsupportedError" if info.bound else "NotBoundError")
    # the python mechanism's module comes with a plan of that mechanism
    pyhold = ["tlsctl._pyhold"] if info.mechanism == "python" else []
    assert loaded == repr(pyhold)
    assert after == repr(sorted([*pyhold, "tlsctl._tickets"]))


def test_a_lazily_loaded_warning_class_works_in_a_w_option() -> None:
    """``python -W error::tlsctl.SocketsNotDeferredWarning``: the warnings
    machinery resolves the lazily loaded class at start-up (through
    ``__import__``'s fromlist and the module ``__getattr__``)."""
    import importlib.util

    # tlsctl and cffi's runtime (for the binding) importable before site runs
    paths = [str(Path(tlsctl.__file__).parent.parent)]
    cffi = importlib.util.find_spec("_cffi_backend")
    if cffi is not None and cffi.origin and Path(cffi.origin).is_file():
        paths.append(str(Path(cffi.origin).parent))
    code = (
        "import warnings, tlsctl\n"
        "action, _, category, _, _ = warnings.filters[0]\n"
        "print(action, category is tlsctl.SocketsNotDeferredWarning)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = _python(code, "-W", "error::tlsctl.SocketsNotDeferredWarning", env=env)
    assert "Invalid -W option" not in proc.stderr
    assert proc.stdout.split() == ["error", "True"]


def test_lazily_loaded_names_are_the_modules_own() -> None:
    """Every public name resolves, lazily loaded or not, to the object its
    module defines; ``dir()`` and ``import *`` see them all; an unknown name
    is an AttributeError."""
    import importlib

    namespace: dict[str, object] = {}
    exec("from tlsctl import *", namespace)
    for name in tlsctl.__all__:
        assert name in dir(tlsctl)
        assert namespace[name] is getattr(tlsctl, name)
    for name, module in vars(tlsctl)["_LAZY"].items():
        assert f"tlsctl.{module}" in LAZY_MODULES
        assert getattr(tlsctl, name) is getattr(
            importlib.import_module(f"tlsctl.{module}"), name
        )
    with pytest.raises(AttributeError, match="has no attribute 'nonesuch'"):
        tlsctl.nonesuch  # type: ignore[attr-defined]  # noqa: B018


def test_import_loads_nothing_heavy() -> None:
    """``import tlsctl`` stays within a few ms of ``import ssl`` (the
    benchmark measures it): none of these modules, which ssl does not load,
    may come with it (dataclasses alone pulls in inspect, ast and dis;
    threading and logging wait for the first key-file watcher)."""
    heavy = (
        "dataclasses",
        "inspect",
        "typing",
        "pathlib",
        "hashlib",
        "threading",
        "logging",
        "tempfile",
        "importlib.abc",
        "encodings.idna",
        "weakref",
    )
    code = (
        "import sys, ssl\n"
        f"heavy = {heavy!r}\n"
        "before = {m for m in heavy if m in sys.modules}\n"
        "import tlsctl\n"
        "print(sorted(before))\n"
        "print(sorted({m for m in heavy if m in sys.modules} - before))\n"
    )
    before, added = _python(code).stdout.splitlines()
    if sys.implementation.name == "cpython":  # else ssl may load some itself
        assert before == "[]"  # so that every name is checked
    assert added == "[]"
