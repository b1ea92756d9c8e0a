"""Command line: ``python -m tlsctl {demo,doctor,ticket-key}``.

``demo`` runs the bug scenarios on 127.0.0.1 with a stock and a patched
server context side by side and prints a table.  ``doctor`` prints what was
bound and runs one live patched handshake.  ``ticket-key FILE`` writes a
fresh 80-byte session ticket key file (nginx's format, mode 0600) for
``tlsctl.TicketKey.from_file``.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

import tlsctl
from tlsctl import scenarios


def _doctor() -> int:
    info = tlsctl.info()
    print(f"tlsctl {tlsctl.__version__} on Python {sys.version.split()[0]}")
    for name in (
        "bound",
        "reason",
        "openssl_version",
        "openssl_version_number",
        "library",
        "via",
        "native_tickets",
        "stash",
        "mechanism",
    ):
        value = getattr(info, name)
        if name == "openssl_version_number":
            value = f"{value:#x}"
        print(f"  {name:24} {value}")
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
        f"{result.replies_ok}/2, tickets delivered {result.tickets}, resumed "
        f"{result.resumed}/1 -> {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def _demo(connections: int, size: int) -> int:
    info = tlsctl.info()
    print(
        f"tlsctl demo: Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"mechanism={info.mechanism}"
    )
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


def _ticket_key(path: str, force: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        print(f"{path} exists; pass --force to replace it", file=sys.stderr)
        return 1
    key = tlsctl.TicketKey.generate()
    with os.fdopen(fd, "wb") as f:
        f.write(key.export())
    print(f"wrote {key!r} to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlsctl", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show the bugs and the fix side by side")
    demo.add_argument("--connections", type=int, default=200)
    demo.add_argument("--size", type=int, default=256 * 1024, help="upload bytes")
    sub.add_parser("doctor", help="print what was bound and run a live handshake")
    key = sub.add_parser(
        "ticket-key", help="write a fresh 80-byte session ticket key file"
    )
    key.add_argument("file")
    key.add_argument("--force", action="store_true", help="replace FILE")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.connections, args.size)
    if args.command == "ticket-key":
        return _ticket_key(args.file, args.force)
    return _doctor()


if __name__ == "__main__":
    sys.exit(main())
