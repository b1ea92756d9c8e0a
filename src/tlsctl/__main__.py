"""Command line: ``python -m tlsctl {demo,doctor,ticket-key,run}`` (also
installed as the ``tlsctl`` command).

``demo`` runs the bug scenarios on 127.0.0.1 with a stock and a patched
server context side by side and prints a table.  ``doctor`` prints what was
bound and runs one live patched handshake.  ``ticket-key FILE`` writes a
fresh 80-byte session ticket key file (nginx's format, mode 0600, replaced
atomically; ``-`` writes the bytes to stdout) for
``tlsctl.TicketKey.from_file``.  ``run [OPTIONS] -- COMMAND`` runs COMMAND
with tlsctl injected into it and every Python process it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import ssl
import stat
import sys
import tempfile

import tlsctl
from tlsctl import scenarios


def _demo(connections: int, size: int) -> int:
    info = tlsctl.info()
    print(
        f"tlsctl demo: Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"mechanism={info.mechanism}"
    )
    if info.mechanism == "python":  # tlsctl-pymech
        print(
            "the demo's servers are ssl sockets, which are stock with the python "
            "mechanism; `python -m tlsctl doctor` checks a memory-BIO server"
        )
        return 1
    if not info.bound or info.mechanism is None:
        print(f"cannot patch here: {info.reason or 'no defer mechanism'}")
        return 1
    print("generating throwaway certificates (client cert with 400 SANs)...")
    certs = scenarios.make_certs()
    rows: list[tuple[str, ...]] = []

    def server(patched: bool, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = scenarios.server_context(certs, require_client_cert=require_client_cert)
        return tlsctl.patch(ctx) if patched else ctx

    failures = 0
    for label, patched in (("stock", False), ("patched", True)):
        up = scenarios.one_way_uploads(
            server(patched),
            scenarios.client_context(certs),
            connections=connections,
            size=size,
        )
        rows.append(
            (
                f"one-way upload {connections} x {size // 1024} KiB",
                label,
                str(up.connections),
                f"{up.bytes_lost} ({up.lost_connections} conns)",
                "ok",
                "n/a (client never reads)",
            )
        )
        if patched and up.bytes_lost:
            failures += 1
    for label, patched in (("stock", False), ("patched", True)):
        dl = scenarios.write_before_read(
            server(patched, require_client_cert=True),
            scenarios.client_context(certs, with_client_cert=True),
            timeout=3.0,
        )
        rows.append(
            (
                "client cert, 512 KiB before read",
                label,
                "1",
                str(512 * 1024 - dl.received),
                dl.server_outcome,
                str(dl.tickets),
            )
        )
        if patched and not dl.completed:
            failures += 1
    for label, patched in (("stock", False), ("patched", True)):
        rr = scenarios.request_response(
            server(patched), scenarios.client_context(certs)
        )
        rows.append(
            (
                "request/response, reconnect",
                label,
                str(rr.connections),
                "0",
                f"ok, resumed {rr.resumed}/{rr.connections - 1}",
                str(rr.tickets),
            )
        )
    _table(
        (
            "scenario",
            "server",
            "connections",
            "bytes lost",
            "handshake",
            "tickets delivered",
        ),
        rows,
    )
    print(
        "tickets delivered, reconnect rows: 2 after the first full handshake "
        "+ 1 after each resumed one (9 x 1) = 11"
    )
    print(
        "patched: no data lost, no deadlock, resumption as stock"
        if not failures
        else f"{failures} patched scenario(s) FAILED"
    )
    return 1 if failures else 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for cells in (header, None, *rows):
        if cells is None:
            print(line)
        else:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    print(line)


_KEY_ERROR = "tlsctl ticket-key: error:"
_KINDS = (
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


class _Refused(Exception):
    """One line for stderr: why the key was not written."""


def _ticket_key(path: str, force: bool) -> int:
    key = tlsctl.TicketKey.generate()
    try:
        if path == "-":
            _key_to_stdout(key)
            print(f"wrote {key!r} to stdout", file=sys.stderr)
        else:
            _key_to_file(key, path, force)
            print(f"wrote {key!r} to {path}")
    except _Refused as exc:
        print(f"{_KEY_ERROR} {exc}", file=sys.stderr)
        return 1
    return 0


def _key_to_stdout(key: tlsctl.TicketKey) -> None:
    if sys.stdout.isatty():
        raise _Refused(
            "refusing to write the raw key bytes to a terminal; pipe or redirect stdout"
        )
    try:
        sys.stdout.buffer.write(key.export())
        sys.stdout.buffer.flush()
    except OSError as exc:
        raise _Refused(f"cannot write to stdout: {exc.strerror or exc}") from None


def _key_to_file(key: tlsctl.TicketKey, path: str, force: bool) -> None:
    """Write ``key`` to a private temporary file next to ``path`` and move it
    into place atomically: ``path`` is never seen half written, never
    world-readable, and a symbolic link or special file there is refused,
    never followed."""
    shown = repr(path)
    folder = os.path.dirname(path) or os.curdir
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise _Refused(f"cannot write {shown}: {exc.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "special file")
        raise _Refused(
            f"{shown} is a {kind}; not replacing it (--force only replaces "
            f"regular files)"
        )
    if mode is not None and not force:
        raise _Refused(f"{shown} exists; pass --force to replace it")
    try:
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
    except FileNotFoundError:
        raise _Refused(
            f"cannot write {shown}: folder {folder!r} does not exist"
        ) from None
    except OSError as exc:
        raise _Refused(f"cannot write {shown}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # mkstemp's mode already; whatever the umask
            f.write(key.export())
            f.flush()
            os.fsync(fd)
        if force:
            os.replace(tmp, path)  # a symlink put there meanwhile is replaced
        else:
            _link_new(tmp, path)
        _fsync_folder(folder)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, FileExistsError):
            raise _Refused(f"{shown} exists; pass --force to replace it") from None
        if isinstance(exc, OSError):
            raise _Refused(f"cannot write {shown}: {exc.strerror or exc}") from None
        raise


def _link_new(tmp: str, path: str) -> None:
    """Give ``tmp`` the name ``path`` unless something has that name: a hard
    link fails atomically if anything (even a dangling symlink) appeared at
    ``path`` since it was checked."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # A file system without hard links: check again, then rename.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # not syncable here
            raise
    finally:
        os.close(fd)


def _run(args: argparse.Namespace) -> int:
    """Exec COMMAND with injection on in its whole process tree: this
    package's ``site-hook`` folder (a ``sitecustomize``) first on
    PYTHONPATH and the settings in ``TLSCTL_INJECT*`` (see ``_inject``)."""
    from tlsctl import _inject, _lifecycle, _policy

    command: list[str] = args.command_args
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(
            "tlsctl run: error: no COMMAND given (tlsctl run -- COMMAND ...)",
            file=sys.stderr,
        )
        return 2
    renew_on_resume = not args.no_renew_on_resume
    try:  # fail here, once, rather than in every process of the tree
        _policy.check_settings(args.tickets, args.count, renew_on_resume)
        if args.ticket_keys and args.ticket_key_master:
            raise ValueError("give --ticket-keys or --ticket-key-master, not both")
        for path in [*(args.ticket_keys or ()), args.ticket_key_master]:
            if path is not None:
                tlsctl.TicketKey.from_file(path)
        if args.rotate_every:
            _lifecycle._int_in(args.rotate_every, "--rotate-every", 0, 2**32 - 1)
        _lifecycle._int_in(args.keep, "--keep", 0, 64)
        if args.ticket_lifetime is not None:
            _lifecycle._int_in(
                args.ticket_lifetime,
                "--ticket-lifetime",
                1,
                _lifecycle.MAX_TICKET_LIFETIME,
            )
    except (OSError, TypeError, ValueError) as exc:
        print(f"tlsctl run: error: {exc}", file=sys.stderr)
        return 2
    ticket_keys: list[str] | None = args.ticket_keys
    env = dict(os.environ)
    hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site-hook")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (hook, env.get("PYTHONPATH")) if p)
    env[_inject.ENV_POLICY] = args.tickets
    env[_inject.ENV_RENEW] = "1" if renew_on_resume else "0"
    optional = {
        _inject.ENV_COUNT: args.count,
        _inject.ENV_KEYS: os.pathsep.join(os.path.abspath(p) for p in ticket_keys)
        if ticket_keys
        else None,
        _inject.ENV_MASTER: os.path.abspath(args.ticket_key_master)
        if args.ticket_key_master
        else None,
        _inject.ENV_ROTATE: args.rotate_every,
        _inject.ENV_KEEP: args.keep,
        _inject.ENV_LIFETIME: args.ticket_lifetime,
    }
    for name, value in optional.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"tlsctl run: error: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - exec does not return


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    """A byte count for argparse: 262144, 256K, 1M (binary units)."""
    number, unit = text.upper().rstrip("IB"), ""
    if number[-1:] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or with K / M / G: 256K, 1M)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be at least 1 byte")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: it must be at least 1")
    return value


DESCRIPTION = (
    "tlsctl makes Python's ssl servers send their TLS 1.3 session tickets "
    "with their first application write instead of right after the "
    "handshake (what BoringSSL does): no lost uploads from clients that "
    "close without reading, no handshake deadlock with large client-"
    "certificate tickets, and resumption as before."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlsctl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="show the bugs and the fix side by side",
        description="Run the bug scenarios on 127.0.0.1 with a stock and a "
        "patched server context and print a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--connections",
        type=_positive,
        default=200,
        help="one-way uploads per server",
    )
    demo.add_argument(
        "--size",
        type=_size,
        default="256K",
        help="bytes per one-way upload (256K, 1M, ...)",
    )
    sub.add_parser(
        "doctor",
        help="print what was bound and run a live handshake",
        description="Print what tlsctl bound to on this interpreter and run "
        "one live patched handshake (needs trustme: tlsctl[demo]).",
    )
    key = sub.add_parser(
        "ticket-key",
        help="write a fresh 80-byte session ticket key file",
        description="Write a fresh 80-byte session ticket key (nginx's "
        "ssl_session_ticket_key format) for tlsctl.TicketKey.from_file.",
    )
    key.add_argument(
        "file",
        metavar="FILE",
        help="the key file to write: mode 0600, moved into place atomically "
        "from a temporary file in the same folder.  '-' writes the raw 80 "
        "bytes to stdout instead (refused when stdout is a terminal), e.g. "
        "python -m tlsctl ticket-key - | kubectl create secret generic "
        "tickets --from-file=key=/dev/stdin; write ./- for a file named '-'",
    )
    key.add_argument(
        "--force",
        action="store_true",
        help="replace FILE if it is a regular file (a symbolic link or "
        "special file is always refused)",
    )
    run = sub.add_parser(
        "run",
        help="run COMMAND with tlsctl injected into every server context",
        description="Run COMMAND (a server: uvicorn, hypercorn, gunicorn, "
        "...) with tlsctl.inject_into_ssl() in effect in it and in every "
        "Python process it starts (multiprocessing spawn and fork, "
        "subprocesses of Python), through a sitecustomize module put first "
        "on PYTHONPATH (an existing sitecustomize still runs).",
    )
    run.add_argument(
        "--tickets",
        choices=tlsctl.POLICIES,
        default="defer",
        help="the ticket policy (default: %(default)s)",
    )
    run.add_argument(
        "--count",
        type=int,
        help="tickets after a full handshake (default: each context's "
        "num_tickets, OpenSSL's default 2)",
    )
    run.add_argument(
        "--no-renew-on-resume",
        action="store_true",
        help="no new ticket after a resumed handshake",
    )
    run.add_argument(
        "--ticket-keys",
        nargs="+",
        metavar="FILE",
        help="session ticket key files shared by every process (first "
        "encrypts, all decrypt; make one with 'tlsctl ticket-key FILE'), "
        "reloaded when replaced; default: keys derived from a random master "
        "per process, rotated (see --rotate-every)",
    )
    run.add_argument(
        "--ticket-key-master",
        metavar="FILE",
        help="derive rotating ticket keys from this key file: every process "
        "and machine given the same file shares them (tlsctl."
        "rotate_ticket_keys)",
    )
    run.add_argument(
        "--rotate-every",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="a new derived ticket key every SECONDS (0: one fixed random "
        "key per process; default: %(default)s)",
    )
    run.add_argument(
        "--keep",
        type=int,
        default=2,
        metavar="N",
        help="previous derived keys that still decrypt (default: %(default)s)",
    )
    run.add_argument(
        "--ticket-lifetime",
        type=int,
        metavar="SECONDS",
        help="ticket lifetime, told to clients and enforced (default: "
        "OpenSSL's, 7200; at most 604800)",
    )
    run.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARGS...]",
        help="the server command and its arguments, after -- (required)",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        return _demo(args.connections, args.size)
    if args.command == "ticket-key":
        return _ticket_key(args.file, args.force)
    from tlsctl._doctor import doctor

    return doctor()


if __name__ == "__main__":
    sys.exit(main())
