"""A TLS server process for bench.py's server-only rows (real sockets).

    python bench/tlsserver.py SIDE N CERTFILE [--mark] [--rounds K] [--cpu C]
                              [--pad B] [--asyncio] [--idle [--warm W]]
                              [--tracemalloc]

``SIDE`` is ``stock`` (a plain ``PROTOCOL_TLS_SERVER`` context; tlsctl is
not even imported), ``patched`` (``tlsctl.patch(ctx)``; the mechanism is
whatever ``TLSCTL_MECHANISM`` in this process's environment selects) or
``byhand`` (the technique with no tlsctl code: ``num_tickets = 0`` and the
tickets, two or one after a resumed handshake, queued with
``SSL_new_session_ticket`` right before the response, through tlsctl's
private binding, whose few Python calls are the only glue; OpenSSL 3.0+)
or ``imported`` (stock, in a process that has imported and bound tlsctl:
a control for the CPU rows).
``CERTFILE`` holds the server's key and certificate chain (PEM).  It listens
on 127.0.0.1, prints its port on one line, and then:

* by default serves ``N`` connections one at a time: handshake (in
  ``wrap_socket``), read one request line, ``sendall`` one response
  (``RESPONSE``), close.  bench.py runs it under callgrind (instructions
  per connection) and strace (``--mark``: around each connection's first
  application write it writes ``MARK_BEGIN<fd>`` and ``MARK_END`` to
  /dev/null, so the write calls on the connection in between can be
  counted in the trace); with ``--rounds K`` it prints, after every ``K``
  connections, the CPU time in ns its thread spent on them
  (``time.thread_time_ns``: user and system time, the kernel's work for
  its syscalls included) and the minor page faults it took meanwhile, on
  one line, for bench.py's server CPU rows on sockets, and
  ``--cpu C`` pins it to CPU ``C`` first, ``--pad B`` holds about ``B``
  bytes from the start (a different heap layout per value); ``--asyncio``
  serves the same exchanges with ``asyncio.start_server`` instead (memory
  BIOs);
* with ``--idle``: serves ``W`` warm-up connections as above, then accepts
  ``N`` connections, completes their handshakes and keeps them open
  without reading or writing; prints one line ``rss=<bytes> py=<bytes>
  held=<bytes> waiting=<count>`` (growth of the resident set, of the bytes
  tracemalloc traces with ``--tracemalloc``, else -1; bytes tlsctl's stash
  holds back, -1 when unknown; connections whose tickets wait for their
  first write) and waits for stdin to close.

Stdlib only, plus tlsctl on the patched side.  The peer is bench.py, in
another process, so nothing of the client is counted here.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import ssl
import sys
import time

REQUEST = b"GET /index.html HTTP/1.1 Host: localhost\n"  # one line
RESPONSE = b"HTTP/1.1 200 OK " + b"x" * 83 + b"\n"  # 100 bytes
MARK_BEGIN = b"tlsctl-bench:begin:"
MARK_END = b"tlsctl-bench:end"
LOCALHOST = "127.0.0.1"


def recv_line(conn: socket.socket) -> bytes:
    """Read up to and including the first newline (or what came before EOF).
    Not ``tlsctl.scenarios.recv_line``: the stock side never imports tlsctl,
    so its figures carry none of tlsctl's memory or import cost."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            break
        line += chunk
    return line


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _held_bytes(conns: list[ssl.SSLSocket]) -> tuple[int, int]:
    """(bytes the stash holds back in total or -1, connections waiting for
    their first write), from tlsctl's private stash accessor (a measuring
    aid: tlsctl.connection_state says only whether tickets wait)."""
    import tlsctl

    waiting = sum(tlsctl.connection_state(c).waiting_for_write for c in conns)
    try:
        from tlsctl import _bind, _policy

        held = 0
        for conn in conns:
            ptr = _bind.sslobj_pointer(_policy._real_sslobj(conn))
            held += _policy._stash_state_of(ptr)[0]
    except (AttributeError, ImportError):  # the private accessor moved
        held = -1
    return held, waiting


def queue_by_hand(conn: ssl.SSLSocket | ssl.SSLObject) -> None:
    """The technique by hand (the ``byhand`` side, and bench.py's in-process
    reference rows): queue the tickets stock would have sent (2, or 1 after
    a resumed handshake) with ``SSL_new_session_ticket``, for the next write
    to send (tlsctl's private binding, unchecked pointer: a measuring aid
    only)."""
    from tlsctl._bind import lib

    ssl_ptr = lib.tlsctl_ssl_of(id(conn._sslobj))  # type: ignore[union-attr]
    if lib.tlsctl_queue_tickets(ssl_ptr, 2, 1, 0) < 1:
        raise RuntimeError("SSL_new_session_ticket failed (OpenSSL 3.0+ only)")


def serve_one(
    ctx: ssl.SSLContext, listener: socket.socket, mark: int | None, by_hand: bool
) -> None:
    raw, _ = listener.accept()
    raw.settimeout(None)  # a blocking server
    with ctx.wrap_socket(raw, server_side=True) as conn:
        if not recv_line(conn).endswith(b"\n"):
            raise ConnectionError("the client sent no request line")
        if by_hand:
            queue_by_hand(conn)
        if mark is not None:
            os.write(mark, MARK_BEGIN + str(conn.fileno()).encode())
        conn.sendall(RESPONSE)
        if mark is not None:
            os.write(mark, MARK_END)


def _minor_faults() -> int:
    """The minor page faults of this thread (of the process where the
    system counts no thread's own)."""
    import resource

    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt


class Round:
    """A round of ``--rounds``: ``done()`` prints the thread's CPU ns and
    minor page faults since the round began, and begins the next; the
    printing and the fault count are left out of the CPU time."""

    def __init__(self) -> None:
        self._begin()

    def _begin(self) -> None:
        self.faults = _minor_faults()
        self.ns = time.thread_time_ns()

    def done(self) -> None:
        ns = time.thread_time_ns() - self.ns
        print(ns, _minor_faults() - self.faults, flush=True)
        self._begin()


def serve_asyncio(
    ctx: ssl.SSLContext, listener: socket.socket, n: int, rounds: int, by_hand: bool
) -> None:
    """``n`` connections as an ``asyncio.start_server`` server (memory BIOs,
    one event loop in this thread), each as ``serve_one``'s; with
    ``rounds``, the thread's CPU time printed as in the blocking mode."""
    import asyncio

    async def serve() -> None:
        done = asyncio.Event()
        served = 0
        round_ = Round()

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            nonlocal served
            if not (await reader.readline()).endswith(b"\n"):
                raise ConnectionError("the client sent no request line")
            if by_hand:
                queue_by_hand(writer.get_extra_info("ssl_object"))
            writer.write(RESPONSE)
            writer.close()  # the client closes once it has the response
            served += 1
            if rounds and served % rounds == 0:
                round_.done()
            if served == n:
                done.set()

        server = await asyncio.start_server(handle, sock=listener, ssl=ctx)
        async with server:
            await asyncio.wait_for(done.wait(), 600)

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["stock", "patched", "byhand", "imported"])
    parser.add_argument("connections", type=int)
    parser.add_argument("certfile")
    parser.add_argument("--mark", action="store_true")
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--asyncio", action="store_true")
    parser.add_argument("--pad", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    # --pad: memory held from here on (a large block and small objects), so
    # that fresh processes lay out their heaps differently (bench.py's CPU
    # rows draw it at random per process: their figures then average over
    # layouts instead of depending on one).
    _padding = (bytearray(args.pad), [object() for _ in range(args.pad // 256)])

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.certfile)
    if args.side == "patched":
        import tlsctl

        tlsctl.patch(ctx)
    by_hand = args.side == "byhand"
    if by_hand or args.side == "imported":
        import tlsctl

        tlsctl.info()  # binds the private binding (start-up: cancels out)
    if by_hand:
        ctx.num_tickets = 0
    # The protocol given, as getaddrinfo gives it: asyncio sets TCP_NODELAY
    # only on sockets whose proto says TCP (without it a stock server's
    # response waits ~40 ms behind its unacknowledged tickets: Nagle).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind((LOCALHOST, 0))
    listener.listen(128)
    listener.settimeout(120.0)  # never hang for ever on a lost client
    print(listener.getsockname()[1], flush=True)
    mark = os.open(os.devnull, os.O_WRONLY) if args.mark else None

    if args.asyncio:
        serve_asyncio(ctx, listener, args.connections, args.rounds, by_hand)
        return 0
    if not args.idle:
        round_ = Round()
        for i in range(1, args.connections + 1):
            serve_one(ctx, listener, mark, by_hand)
            if args.rounds and i % args.rounds == 0:
                round_.done()
        return 0

    for _ in range(args.warm):
        serve_one(ctx, listener, None, by_hand)
    gc.collect()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
        py_before = tracemalloc.get_traced_memory()[0]
    before = _rss_bytes()
    idle = []
    for _ in range(args.connections):
        raw, _ = listener.accept()
        raw.settimeout(None)
        idle.append(ctx.wrap_socket(raw, server_side=True))
    gc.collect()
    grown = _rss_bytes() - before
    py = -1
    if args.tracemalloc:
        py = tracemalloc.get_traced_memory()[0] - py_before
    held, waiting = _held_bytes(idle) if args.side == "patched" else (0, 0)
    print(f"rss={grown} py={py} held={held} waiting={waiting}", flush=True)
    sys.stdin.read()  # the client closes its end when it has read the line
    for conn in idle:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
