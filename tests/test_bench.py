"""bench/bench.py runs end to end (--smoke: tiny sizes).  No timing is
asserted here: the benchmark's numbers are read by people, not tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tlsctl

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    tlsctl.info().mechanism is None, reason="needs a defer mechanism"
)


def test_bench_smoke_prints_every_metric_and_writes_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--smoke",
            "--plot-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for metric in (
        "full handshakes/s",
        "resumed handshakes/s ",
        "resumed handshakes/s, shared keys",
        "1 KiB writes/s",
        "bulk MB/s",
        "junk-PSK hellos/s, on_resume (CPU)",
        "RSS per 1,000 idle conns",
        "256 KiB, read delay",
    ):
        assert metric in proc.stdout, metric
    # The references by hand need SSL_new_session_ticket (OpenSSL 3.0+).
    for metric in (
        "full handshakes/s, technique by hand",
        "resumed handshakes/s, technique by hand",
    ):
        assert (metric in proc.stdout) == tlsctl.info().native_tickets, metric
    for name in ("ratios.png", "scaling.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The one-way scenario itself: patched never loses an upload.
    losses = [
        line for line in proc.stdout.splitlines() if "patched" in line and "KiB" in line
    ]
    assert losses and all(line.rstrip().endswith("patched    0%") for line in losses)
