"""tlsctl benchmark: patched / stock ratios, measured in one run.

    python bench/bench.py                  # wall clock, 41 rounds per metric
    python bench/bench.py --quick          # wall clock, 9 rounds per metric
    python bench/bench.py --instructions   # also callgrind instruction counts

Wall clock: each metric runs stock and patched back to back in many short
rounds (alternating which goes first) and reports the median of the
per-round patched/stock ratios with its spread, so slow drift of the machine
cancels out and the noise floor is visible.  Writes rotate over 16
connections per side, because single connections differ from each other by
up to 3% (buffer placement; measured between two stock connections).

Instructions (``--instructions``, needs valgrind): the same work under
``valgrind --tool=callgrind`` with ``PYTHONHASHSEED=0``, counting
instructions for N and 11N operations and taking the difference, so start-up
cancels.  Deterministic; the best view of tlsctl's own overhead.

Everything runs in-process over memory BIOs, so the figures are the CPU
cost of the TLS work plus tlsctl's own Python and C work, with no network
noise:

* full handshakes/s: handshake, then the server's first write (1 byte) and
  the client's read of it, tickets included (stock: 2 sent during the
  handshake; patched: 2 sent with that write);
* 1 KiB writes/s: ``conn.write(1 KiB)`` on established connections whose
  first write is done, output drained;
* bulk MB/s: the same with 64 KiB writes;
* resumed handshakes/s: TLS 1.3 resumption from a saved session, then the
  first byte (the server decrypts the ticket and sends one renewal ticket).
  Here "patched" is a context given shared keys with
  ``tlsctl.set_ticket_keys`` (the key lookup runs in C) and "stock" one with
  OpenSSL's built-in keys.

This is a measuring tool, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from typing import Callable

import tlsctl
from tlsctl import scenarios

TARGETS = {
    "full handshakes/s": 0.98,
    "1 KiB writes/s": 0.98,
    "bulk MB/s": 0.99,
    "resumed handshakes/s": 0.98,
}
BULK = 64 * 1024
CONNECTIONS = 16


class Pair:
    """A server and a client SSLObject over memory BIOs."""

    def __init__(
        self,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (
            ssl.MemoryBIO() for _ in range(4)
        )
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(
            self.c_in, self.c_out, server_hostname="localhost", session=session
        )

    def handshake_and_first_byte(self) -> Pair:
        for _ in range(4):
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.s_in.write(self.c_out.read())
            try:
                self.server.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.c_in.write(self.s_out.read())
        self.server.write(b"!")
        self.c_in.write(self.s_out.read())
        if self.client.read(10) != b"!":
            raise RuntimeError("handshake pair broken")
        return self


def handshakes(server: ssl.SSLContext, client: ssl.SSLContext, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        Pair(server, client).handshake_and_first_byte()
    return n / (time.perf_counter() - start)


def session_of(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLSession:
    session = Pair(server, client).handshake_and_first_byte().client.session
    if session is None or not session.has_ticket:
        raise RuntimeError("no ticket to resume with")
    return session


def resumed_handshakes(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession, n: int
) -> float:
    start = time.perf_counter()
    for _ in range(n):
        pair = Pair(server, client, session).handshake_and_first_byte()
    elapsed = time.perf_counter() - start
    if not pair.client.session_reused:
        raise RuntimeError("the benchmark's handshakes did not resume")
    return n / elapsed


def writes(pairs: list[Pair], size: int, n: int) -> float:
    """``n`` writes of ``size`` bytes, spread over ``pairs``; returns writes/s."""
    data = b"w" * size
    per_pair = max(1, n // len(pairs))
    start = time.perf_counter()
    for pair in pairs:
        conn, drain = pair.server, pair.s_out.read
        for _ in range(per_pair):
            conn.write(data)
            drain()
    return per_pair * len(pairs) / (time.perf_counter() - start)


def _rounds(
    run_stock: Callable[[], float], run_patched: Callable[[], float], rounds: int
) -> tuple[float, float, float, float]:
    """(median stock rate, median patched rate, median per-round ratio,
    half the interquartile range of the ratios), after a discarded warm-up."""
    run_stock(), run_patched()
    stock, patched, ratios = [], [], []
    for i in range(rounds):
        if i % 2 == 0:
            s, p = run_stock(), run_patched()
        else:
            p, s = run_patched(), run_stock()
        stock.append(s)
        patched.append(p)
        ratios.append(p / s)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        statistics.median(stock),
        statistics.median(patched),
        statistics.median(ratios),
        (q3 - q1) / 2,
    )


def _contexts() -> tuple[
    ssl.SSLContext, ssl.SSLContext, ssl.SSLContext, ssl.SSLContext
]:
    """client, stock server, patched server, server with shared keys."""
    certs = scenarios.make_certs(client_sans=1)
    client = scenarios.client_context(certs)
    stock = scenarios.server_context(certs)
    patched = tlsctl.patch(scenarios.server_context(certs))
    keyed = tlsctl.set_ticket_keys(
        scenarios.server_context(certs), [tlsctl.TicketKey.generate()]
    )
    return client, stock, patched, keyed


def wall_clock(rounds: int) -> dict[str, tuple[float, float, float, float]]:
    client, stock_ctx, patched_ctx, keyed_ctx = _contexts()
    stock_pairs = [
        Pair(stock_ctx, client).handshake_and_first_byte() for _ in range(CONNECTIONS)
    ]
    patched_pairs = [
        Pair(patched_ctx, client).handshake_and_first_byte() for _ in range(CONNECTIONS)
    ]
    results = {
        "full handshakes/s": _rounds(
            lambda: handshakes(stock_ctx, client, 60),
            lambda: handshakes(patched_ctx, client, 60),
            rounds,
        ),
        "1 KiB writes/s": _rounds(
            lambda: writes(stock_pairs, 1024, 10000),
            lambda: writes(patched_pairs, 1024, 10000),
            rounds,
        ),
    }
    s, p, r, spread = _rounds(
        lambda: writes(stock_pairs, BULK, 256),
        lambda: writes(patched_pairs, BULK, 256),
        rounds,
    )
    results["bulk MB/s"] = (s * BULK / 1e6, p * BULK / 1e6, r, spread)
    stock_session = session_of(stock_ctx, client)
    keyed_session = session_of(keyed_ctx, client)
    results["resumed handshakes/s"] = _rounds(
        lambda: resumed_handshakes(stock_ctx, client, stock_session, 60),
        lambda: resumed_handshakes(keyed_ctx, client, keyed_session, 60),
        rounds,
    )
    return results


# ------------------------------------------------------------ instructions

_WORK = {
    "full handshakes/s": 20,
    "1 KiB writes/s": 2000,
    "bulk MB/s": 64,
    "resumed handshakes/s": 20,
}


def _worker(metric: str, side: str, n: int) -> None:
    client, stock_ctx, patched_ctx, keyed_ctx = _contexts()
    ctx = stock_ctx if side == "stock" else patched_ctx
    if metric == "resumed handshakes/s":
        ctx = stock_ctx if side == "stock" else keyed_ctx
        resumed_handshakes(ctx, client, session_of(ctx, client), n)
    elif metric == "full handshakes/s":
        handshakes(ctx, client, n)
    else:
        pairs = [Pair(ctx, client).handshake_and_first_byte() for _ in range(4)]
        writes(pairs, 1024 if metric.startswith("1 KiB") else BULK, n)


def _instructions(metric: str, side: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--worker",
            metric,
            side,
            str(n),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in proc.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"no callgrind total in: {proc.stderr[-500:]}")


def instruction_ratios() -> dict[str, tuple[float, float, float]]:
    """Instructions per operation (stock, patched) and patched/stock cost
    expressed as a rate ratio (stock instructions / patched instructions)."""
    out = {}
    for metric, n in _WORK.items():
        per_op = {}
        for side in ("stock", "patched"):
            small = _instructions(metric, side, n)
            large = _instructions(metric, side, 11 * n)
            per_op[side] = (large - small) / (10 * n)
        out[metric] = (
            per_op["stock"],
            per_op["patched"],
            per_op["stock"] / per_op["patched"],
        )
        print(f"  callgrind {metric}: done", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="9 rounds, not 41")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions with callgrind",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        metric, side, n = args.worker
        _worker(metric, side, int(n))
        return 0

    info = tlsctl.info()
    rounds = 9 if args.quick else 41
    print(
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"tlsctl mechanism={info.mechanism}"
    )
    if info.mechanism is None:
        print(f"cannot benchmark defer here: {info.reason or 'no mechanism'}")
        return 1
    print(
        f"\nwall clock, {rounds} interleaved rounds "
        "(ratio = median of per-round patched/stock; +/- = half the IQR)"
    )
    print(
        f"{'metric':20} {'stock':>12} {'patched':>12} {'ratio':>7} "
        f"{'+/-':>6} {'target':>7}  verdict"
    )
    for metric, (stock, patched, ratio, spread) in wall_clock(rounds).items():
        target = TARGETS[metric]
        verdict = "meets" if ratio >= target else "BELOW"
        print(
            f"{metric:20} {stock:12.1f} {patched:12.1f} {ratio:7.3f} "
            f"{spread:6.3f} {target:7.2f}  {verdict}"
        )

    if args.instructions:
        if shutil.which("valgrind") is None:
            print("\n--instructions needs valgrind (apt-get install valgrind)")
            return 1
        print("\ninstructions per operation (callgrind, PYTHONHASHSEED=0)")
        results = instruction_ratios()
        print(
            f"{'metric':20} {'stock':>12} {'patched':>12} {'ratio':>7} "
            f"{'target':>7}  verdict"
        )
        for metric, (stock, patched, ratio) in results.items():
            target = TARGETS[metric]
            verdict = "meets" if ratio >= target else "BELOW"
            print(
                f"{metric:20} {stock:12.0f} {patched:12.0f} {ratio:7.4f} "
                f"{target:7.2f}  {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
