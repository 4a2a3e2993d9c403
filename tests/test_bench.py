"""bench/match_speed.py runs end to end on a tiny configuration (its numbers are for humans; here only
that it runs, compares the variants and reports what it promises)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_match_speed_bench_runs_and_reports_every_column():
    cmd = [sys.executable, str(REPO / "bench" / "match_speed.py"), "--arch", "dkm_small", "--h", "64", "--w", "96",
           "--repeats", "1", "--rounds", "2", "--variants", "faithful", "fast", "--batches", "1", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "match() on dkm_small at 64x96" in out and "bfloat16" in out and "x 2 round(s)" in out
    rows = {}
    for m in re.finditer(r"^(faithful|fast) +\d.*$", out, re.M):
        rows.setdefault(m.group(1), m.group(0).split())  # the main table comes first
    assert set(rows) == {"faithful", "fast"}, out
    faithful, fast = rows["faithful"], rows["fast"]
    assert faithful[3] == "1.00x" and fast[3].endswith("x") and float(fast[3][:-1]) > 0
    # the fast path's deviation from the faithful one, measured on the same pair
    assert float(faithful[6]) == 0.0 and float(faithful[8]) == 0.0
    assert float(fast[6]) < 0.5 and float(fast[8]) < 1e-2, out
    assert "B=2" in out and "importing torch+dkm alone" in out
