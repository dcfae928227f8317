"""The sweep script in its tiny mode, so it cannot rot (CI runs this)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_tiny_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--tiny", "--no-inductor"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| eager |" in out and "| specdiff |" in out and "taylorseer" in out
