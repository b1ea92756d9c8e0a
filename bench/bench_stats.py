"""Measurement primitives of ``bench.py`` (its docstring says how every row
is measured): the run's ``Plan``, the statistics and the verdict rule, the
paired rounds of the wall-clock rows, callgrind's total and the progress
bar."""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Callable, NamedTuple

HANDSHAKES = 60  # per side and round


@dataclasses.dataclass
class Plan:
    """How much of everything one run measures (``--quick``, ``--smoke``)."""

    rounds: int = 41  # wall-clock and server-CPU rounds
    latency_pairs: int = 41  # connections per side, per client kind
    latency_warm: int = 3
    idle: int = 1000  # N: RSS runs hold N and 3N idle connections
    idle_warm: int = 20
    rss_repeats: int = 7
    import_runs: int = 15  # fresh processes per side
    strace_connections: int = 5
    repeats: int = 3  # callgrind repetitions
    server_instr_n: int = 20  # N of the N / 11N server-process runs
    # server CPU on sockets: process pairs, rounds each, connections a round
    socket_cpu_pairs: int = 5
    socket_cpu_rounds: int = 10
    socket_cpu_connections: int = 100
    work_scale: float = 1.0  # of the in-process callgrind work (bench_inprocess.WORK)
    # --scaling: upload sizes, the server's read delays, uploads per point
    sizes: tuple[int, ...] = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
    delays: tuple[float, ...] = (0.0, 0.002, 0.01, 0.05)
    scaling_connections: int = 20

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            rounds=9,
            latency_pairs=15,
            rss_repeats=3,
            import_runs=7,
            socket_cpu_pairs=2,
            socket_cpu_rounds=8,
            socket_cpu_connections=50,
        )

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            rounds=2,
            latency_pairs=3,
            latency_warm=1,
            idle=50,
            idle_warm=2,
            rss_repeats=1,
            import_runs=2,
            strace_connections=2,
            repeats=1,
            server_instr_n=1,
            socket_cpu_pairs=1,
            socket_cpu_rounds=2,
            socket_cpu_connections=2,
            work_scale=0.05,
            sizes=(4 << 10, 256 << 10),
            delays=(0.0, 0.01),
            scaling_connections=3,
        )


# ------------------------------------------------------------ statistics

BOOTSTRAP = 2000


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[Sequence[float]], float] = statistics.median,
    resamples: int = BOOTSTRAP,
) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of ``stat(values)``
    (fixed seed: the same data give the same interval)."""
    rng = random.Random(0)
    n = len(values)
    return _percentile_interval(
        [stat(rng.choices(values, k=n)) for _ in range(resamples)]
    )


def _percentile_interval(stats: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of a bootstrap's statistics."""
    stats = sorted(stats)
    return stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]


def cluster_bootstrap_ci(
    groups: Sequence[Sequence[float]],
    stat: Callable[[Sequence[float]], float] = statistics.median,
    resamples: int = BOOTSTRAP,
) -> tuple[float, float]:
    """Two-stage percentile bootstrap 95% confidence interval of
    ``stat`` of the pooled ``groups``, for values that come in correlated
    groups (the rounds of one pair of server processes, which share a
    memory layout): each resample draws the groups with replacement, then
    the values within each drawn group.  So the interval widens with the
    spread between groups, which resampling the pooled values would miss.
    One group: ``bootstrap_ci``'s interval.  Fixed seed."""
    if len(groups) == 1:
        return bootstrap_ci(groups[0], stat, resamples)
    rng = random.Random(0)
    stats = []
    for _ in range(resamples):
        pooled: list[float] = []
        for group in rng.choices(groups, k=len(groups)):
            pooled += rng.choices(group, k=len(group))
        stats.append(stat(pooled))
    return _percentile_interval(stats)


def verdict(lo: float, hi: float, target: float | None, higher_is_better: bool) -> str:
    """Return "meets" / "misses" only when the interval [lo, hi] lies entirely on
    one side of the target, else "inconclusive"; "reference" without one."""
    if target is None:
        return "reference"
    if higher_is_better:
        good, bad = lo >= target, hi < target
    else:
        good, bad = hi <= target, lo > target
    return "meets" if good else "misses" if bad else "inconclusive"


def _iqr_half(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


class Row(NamedTuple):
    """One paired-rounds metric: median rates, median ratio, its spread
    (half the IQR of the per-round ratios) and bootstrap 95% CI."""

    stock: float
    patched: float
    ratio: float
    spread: float
    lo: float
    hi: float


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """The median of ``values`` and half their interquartile range."""
    return statistics.median(values), _iqr_half(values)


def ratio_summary(ratios: Sequence[float]) -> tuple[float, float, float, float]:
    """Median, half the IQR and bootstrap 95% CI (lo, hi) of ``ratios``."""
    return (*median_spread(ratios), *bootstrap_ci(ratios))


def row_of(stock: list[float], patched: list[float], ratios: list[float]) -> Row:
    return Row(
        statistics.median(stock), statistics.median(patched), *ratio_summary(ratios)
    )


def grouped_row_of(
    stock: list[float], patched: list[float], ratio_groups: list[list[float]]
) -> Row:
    """``row_of`` for ratios that come in groups (``cluster_bootstrap_ci``):
    the median and spread of all of them, the interval of the groups."""
    ratios = [r for group in ratio_groups for r in group]
    return Row(
        statistics.median(stock),
        statistics.median(patched),
        *median_spread(ratios),
        *cluster_bootstrap_ci(ratio_groups),
    )


class CountRow(NamedTuple):
    """Instructions per operation: medians over repetitions, the median
    stock/patched ratio and the range of the per-repetition ratios."""

    stock: float
    patched: float
    ratio: float
    lo: float
    hi: float


def count_row(stock: list[float], patched: list[float]) -> CountRow:
    ratios = [s / p for s, p in zip(stock, patched)]
    return CountRow(
        statistics.median(stock),
        statistics.median(patched),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def min_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """min(a) - min(b) and a bootstrap 95% CI of it (each side resampled)."""
    rng = random.Random(0)
    boot = [
        min(rng.choices(a, k=len(a))) - min(rng.choices(b, k=len(b)))
        for _ in range(BOOTSTRAP)
    ]
    return (min(a) - min(b), *_percentile_interval(boot))


VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def callgrind_total(stderr: str) -> int:
    """The instructions callgrind counted (its "Collected :" line)."""
    for line in stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"no callgrind total in: {stderr[-500:]}")


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a TTY
    unless forced), so a long run shows it is alive."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {label[:40]:40}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def paired_rounds(
    one_stock: Callable[[], object],
    one_patched: Callable[[], object],
    rounds: int,
    progress: Progress,
    label: str,
    per_round: int = HANDSHAKES,
    setup: Callable[[], None] | None = None,
    self_timed: bool = False,
) -> Row:
    """Inside a round the two sides alternate operation by operation, each
    timed on its own, so both see the same state of the machine; the
    round's ratio is its total stock time / total patched time (= patched
    rate / stock rate).  Rates are operations per second.  ``setup`` runs
    before each round, untimed.  ``self_timed``: each operation returns
    its own time in ns (the part of it that is measured, on its own clock)
    instead of being timed whole with ``perf_counter_ns``."""
    clock = time.perf_counter_ns
    for _ in range(per_round):  # warm-up, discarded
        one_stock()
        one_patched()
    stock, patched, ratios = [], [], []
    for _ in range(rounds):
        if setup is not None:
            setup()
        t_stock = t_patched = 0
        for i in range(per_round):
            stock_first = i % 2 == 0
            first, second = (
                (one_stock, one_patched) if stock_first else (one_patched, one_stock)
            )
            a = clock()
            first_ns = first()
            b = clock()
            second_ns = second()
            c = clock()
            if not self_timed:
                first_ns, second_ns = b - a, c - b
            assert isinstance(first_ns, int) and isinstance(second_ns, int)
            if stock_first:
                t_stock, t_patched = t_stock + first_ns, t_patched + second_ns
            else:
                t_patched, t_stock = t_patched + first_ns, t_stock + second_ns
        stock.append(per_round * 1e9 / t_stock)
        patched.append(per_round * 1e9 / t_patched)
        ratios.append(t_stock / t_patched)
        progress.step(label)
    return row_of(stock, patched, ratios)
