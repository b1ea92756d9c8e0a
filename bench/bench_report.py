"""The tables and charts of ``bench.py``: every row printed with its
interval and verdict, and the PNG charts (``ratios.png``, ``scaling.png``;
matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from bench_inprocess import ROTATION_EVERY, TARGETS
from bench_processes import (
    FAULTS_WARN,
    IMPORT_TARGET_MS,
    MODES,
    RSS_TARGET_BYTES,
    SERVER_CONFIGS,
    ImportRow,
    RssRow,
    ServerCpu,
    WriteCalls,
    socket_cpu_target,
)
from bench_sockets import Latency
from bench_stats import CountRow, Plan, Row, verdict

# ------------------------------------------------------------ report


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def _interval(lo: float, hi: float, digits: int = 3) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _report_rows(rows: list[tuple[str, Row, float | None]]) -> None:
    """A table of paired-rounds rows: (metric, row, target or None)."""
    print(
        f"{'metric':40} {'stock':>11} {'patched':>11} {'ratio':>6} {'+/-':>6} "
        f"{'95% CI':>15} {'target':>6}  verdict"
    )
    for metric, row, target in rows:
        shown = "-" if target is None else f"{target:.2f}"
        print(
            f"{metric:40} {row.stock:11.1f} {row.patched:11.1f} {row.ratio:6.3f} "
            f"{row.spread:6.3f} {_interval(row.lo, row.hi):>15} {shown:>6}  "
            f"{verdict(row.lo, row.hi, target, True)}"
        )


def report_wall(results: dict[str, Row], rounds: int) -> None:
    print(
        f"\nin process, {rounds} interleaved rounds (ratio = median of per-round "
        "patched/stock rate ratios; +/- = half their IQR;\n95% CI = bootstrap "
        "CI of that median; verdict from the CI)"
    )
    _report_rows([(m, row, TARGETS[m]) for m, row in results.items()])


def report_latency(rows: dict[str, Latency], pairs: int) -> None:
    print(
        f"\nfirst response, real sockets, {pairs} connections per side alternating "
        "(ms from the client's request to the last byte of the response:\n"
        "median +/- half the IQR; ratio = median of per-pair stock/patched, "
        "above 1: patched sooner; 95% CI bootstrap; no target)"
    )
    print(
        f"{'client':40} {'stock ms':>15} {'patched ms':>15} {'ratio':>6} {'95% CI':>15}"
    )
    for name, r in rows.items():
        print(
            f"{name:40} {r.stock_ms:8.3f} +/-{r.stock_spread:<5.3f}"
            f"{r.patched_ms:8.3f} +/-{r.patched_spread:<5.3f}{r.ratio:6.3f} "
            f"{_interval(r.lo, r.hi):>15}"
        )


def report_server_cpu(cpu: ServerCpu, plan: Plan) -> None:
    print(
        "\nserver process CPU per connection on real sockets, a blocking "
        "server and an asyncio one: stock\nand one configuration serving "
        "alternately, connection by connection, "
        f"{plan.socket_cpu_pairs} pairs of fresh\nprocesses x "
        f"{plan.socket_cpu_rounds} rounds of {plan.socket_cpu_connections} "
        "(servers on one CPU, the client on another, with TCP_NODELAY;\n"
        "glibc's malloc thresholds fixed on both); rate = connections per "
        "server CPU second (user +\nsystem); ratio = median of per-round "
        "stock/patched CPU time; +/- = half their IQR; 95% CI\n"
        "bootstrap over the pairs, then their rounds; A/A = stock against "
        "stock again; imported =\nstock in a process that has imported and "
        "bound tlsctl"
    )
    _report_rows(
        [
            (f"server CPU, {kind}, {mode}, {config}", row, socket_cpu_target(config))
            for (kind, mode, config), row in cpu.rows.items()
        ]
    )
    # FIXED_MALLOC keeps an asyncio server's per-connection buffer mapped;
    # where it did not (another allocator), say so: the rows would then
    # compare heap layouts (docs/performance.md, "Server CPU").
    faulty = [" ".join(key) for key, f in cpu.faults.items() if f >= FAULTS_WARN]
    worst = max(cpu.faults.values(), default=0.0)
    print(
        f"minor page faults per connection, the worse server of each pair: at "
        f"most {worst:.2f}"
        + (
            f"; {FAULTS_WARN:g} or more in {', '.join(faulty)}: those rows "
            "compare heap layouts, not tlsctl"
            if faulty
            else ""
        )
    )


def report_counts(
    title: str, rows: dict[str, CountRow], targets: Mapping[str, float | None]
) -> None:
    print(f"\n{title}")
    print(
        f"{'metric':40} {'stock':>11} {'patched':>11} {'ratio':>7} "
        f"{'range':>17} {'target':>6}  verdict"
    )
    for name, r in rows.items():
        target = targets[name]
        shown = "-" if target is None else f"{target:.2f}"
        print(
            f"{name:40} {r.stock:11.0f} {r.patched:11.0f} {r.ratio:7.4f} "
            f"{_interval(r.lo, r.hi, 4):>17} {shown:>6}  "
            f"{verdict(r.lo, r.hi, target, True)}"
        )


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def report_writes(table: dict[tuple[str, str], list[WriteCalls]]) -> None:
    print(
        "\nwrite calls on the connection per first application write "
        "(strace; min-max over connections; bytes written),\nand in the whole "
        "connection, handshake included"
    )
    configs = sorted({c for _, c in table}, key=list(SERVER_CONFIGS).index)
    print(f"{'first write after':40} " + " ".join(f"{c:>18}" for c in configs))
    for mode in MODES:
        cells = [
            f"{_span([w.first for w in table[mode, c]])} "
            f"({_span([w.written for w in table[mode, c]])} B)"
            for c in configs
        ]
        label = f"a {mode} handshake"
        print(f"{label:40} " + " ".join(f"{c:>18}" for c in cells))
    for mode in MODES:
        cells = [_span([w.total for w in table[mode, c]]) for c in configs]
        label = f"whole connection, {mode}"
        print(f"{label:40} " + " ".join(f"{c:>18}" for c in cells))


def report_rss(rows: dict[str, RssRow], plan: Plan) -> None:
    print(
        f"\nRSS per idle connection, server process (bytes: growth from "
        f"{plan.idle} to {3 * plan.idle} idle connections / {2 * plan.idle}; "
        f"{plan.rss_repeats} repetitions;\ndelta = median of per-repetition "
        f"patched - stock, 95% CI bootstrap; target <= +{RSS_TARGET_BYTES} B)"
    )
    print(
        f"{'mechanism':40} {'stock':>8} {'patched':>8} {'delta':>7} "
        f"{'95% CI':>15} {'target':>6}  verdict"
    )
    for config, r in rows.items():
        name = f"RSS per idle conn, {config}"
        print(
            f"{name:40} {r.stock:8.0f} {r.patched:8.0f} {r.delta:+7.0f} "
            f"{_interval(r.lo, r.hi, 0):>15} {'+' + str(RSS_TARGET_BYTES):>6}  "
            f"{verdict(r.lo, r.hi, RSS_TARGET_BYTES, False)}"
        )
    for config, r in rows.items():
        held = "unknown" if r.held < 0 else f"{r.held:+.0f} B"
        rest = r.delta - r.python - max(r.held, 0.0)
        print(
            f"  breakdown {config}: Python objects {r.python:+.0f} B (tracemalloc), "
            f"ticket bytes held {held}, rest {rest:+.0f} B (inferred); "
            f"{r.waiting}/{plan.idle} waiting for their first write"
        )


def report_import(r: ImportRow, runs: int) -> None:
    print(
        f"\nimport time, -X importtime, min of {runs} fresh processes each "
        "(95% CI: bootstrap of the difference of the minimums)"
    )
    print(
        f"{'metric':40} {'ssl':>8} {'tlsctl':>8} {'added':>7} {'95% CI':>15} "
        f"{'target':>6}  verdict"
    )
    print(
        f"{'import ms added over import ssl':40} {r.ssl_ms:8.2f} {r.tlsctl_ms:8.2f} "
        f"{r.added_ms:+7.2f} {_interval(r.lo, r.hi, 2):>15} "
        f"{'+' + format(IMPORT_TARGET_MS, 'g'):>6}  "
        f"{verdict(r.lo, r.hi, IMPORT_TARGET_MS, False)}"
    )
    print(
        f"{'  cross-check: process CPU ms added':40} {r.cpu_ssl_ms:8.2f} "
        f"{r.cpu_tlsctl_ms:8.2f} {r.cpu_added_ms:+7.2f} "
        f"{_interval(r.cpu_lo, r.cpu_hi, 2):>15}  (whole process, no verdict)"
    )
    top = ", ".join(f"{name} {ms:.1f}" for name, ms in r.top)
    print(f"  largest self times (ms) among modules tlsctl adds: {top}")


def report_scaling(
    scale: dict[str, list[tuple[float, float, float]]], plan: Plan
) -> None:
    print(f"\none-way uploads that lost data ({plan.scaling_connections} per point)")
    for size, s, p in scale["size"]:
        print(
            f"  {int(size) >> 10:6} KiB, no delay:      "
            f"stock {s:5.0%}  patched {p:5.0%}"
        )
    for delay, s, p in scale["delay"]:
        print(
            f"  256 KiB, read delay {delay * 1000:4g} ms: "
            f"stock {s:5.0%}  patched {p:5.0%}"
        )


def report_rotation(rows: list[tuple[float, int, int]], keep: int) -> None:
    print(
        f"\nresumption under key rotation (rotate_ticket_keys every="
        f"{ROTATION_EVERY} s, keep={keep}; a ticket stays usable between "
        f"{keep} and {keep + 1} periods):"
    )
    print("  reconnect after (periods)  resumed")
    for delay, resumed, tried in rows:
        print(f"  {delay:25.2f}  {resumed}/{tried}")


# ------------------------------------------------------------ charts


class ChartRow(NamedTuple):
    name: str
    ratio: float
    lo: float
    hi: float
    target: float | None


def plot_ratios(rows: list[ChartRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    ratios = [r.ratio for r in rows]
    errors = [
        [max(0.0, r.ratio - r.lo) for r in rows],
        [max(0.0, r.hi - r.ratio) for r in rows],
    ]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    colors = [
        "tab:grey"
        if r.target is None
        else {"meets": "tab:green", "misses": "tab:orange"}.get(
            verdict(r.lo, r.hi, r.target, True), "tab:olive"
        )
        for r in rows
    ]
    ax.barh(names, ratios, xerr=errors, color=colors)
    for i, r in enumerate(rows):
        if r.target is not None:
            ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black", lw=2)
    left, right = 0.85, 1.1
    for i, r in enumerate(rows):
        if not left <= r.ratio <= right:  # off the scale: say it in words
            target = "" if r.target is None else f" (target {r.target:.2f})"
            x = left + 0.005 if r.ratio < left else right - 0.1
            ax.text(x, i, f"{r.ratio:.3f}{target}", va="center")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlim(left, right)
    ax.invert_yaxis()
    ax.set_xlabel(
        "stock cost / patched cost (above 1 is better; whiskers: 95% CI or "
        "range; black bar = target;\ngreen meets, orange misses, olive "
        "inconclusive, grey = no target)"
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(
    data: dict[str, list[tuple[float, float, float]]], path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [x / 1024 for x, _, _ in data["size"]]
    left.plot(sizes, [100 * s for _, s, _ in data["size"]], "o-", label="stock")
    left.plot(sizes, [100 * p for _, _, p in data["size"]], "s-", label="patched")
    left.set_xscale("log", base=2)
    left.set_xlabel("upload size (KiB), server reads at once")
    left.set_ylabel("uploads that lost data (%)")
    left.set_ylim(-5, 105)
    left.legend()
    delays = [1000 * x for x, _, _ in data["delay"]]
    right.plot(delays, [100 * s for _, s, _ in data["delay"]], "o-", label="stock")
    right.plot(delays, [100 * p for _, _, p in data["delay"]], "s-", label="patched")
    right.set_xlabel("server read delay after the handshake (ms), 256 KiB uploads")
    right.set_ylim(-5, 105)
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
