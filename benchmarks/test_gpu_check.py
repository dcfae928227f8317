"""``benchmarks/gpu_check.py``: its dry run (CPU, plain FX) passes through ``scripts/gpu_session.sh
--dry-run check``, and a mode that deviates from eager is reported as a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_session_job_check_dry(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(HERE.parent / "scripts" / "gpu_session.sh"), "--dry-run", "check"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: every check passed" in proc.stdout
    table = (tmp_path / "check.md").read_text()
    for model in ("SD3", "FLUX"):
        row = next(line for line in table.splitlines() if f"| {model} tiny | float32 | specdiff every token |" in line)
        cells = [c.strip() for c in row.split("|")]
        assert cells[-2] == "ok" and float(cells[4]) == 0.0, row  # the sparse variant, every token: exact
        full, cached, skipped = (int(n) for n in cells[6].split("/"))
        assert cached > 0 and full + cached + skipped == 8, row
        assert f"| {model} tiny | float32 | specdiff r=0 |" in table


def test_a_deviating_mode_fails(monkeypatch) -> None:
    sys.path.insert(0, str(HERE))
    import gpu_check

    # the defaults leave tokens out: they do not give eager's latents, and the check must say so
    monkeypatch.setitem(gpu_check.SPECDIFF_MODES, "specdiff every token", {})
    rows = gpu_check.run_model(gpu_check.gl.TINY_SPECS["sd3"], torch.device("cpu"), torch.float32, 8,
                               inductor=False, fx_only=True)
    row = next(r for r in rows if r.mode == "specdiff every token")
    assert row.verdict.startswith("FAIL"), row
    assert next(r for r in rows if r.mode == "specdiff r=0").verdict == "ok"
    assert "FAIL" in gpu_check.format_table(rows)


def test_a_fallback_fails(monkeypatch) -> None:
    """A graph the backend did not rewrite (a fallback to plain Inductor) fails every specdiff mode,
    whatever its latents: the check is about the rewritten graphs."""
    import types

    sys.path.insert(0, str(HERE))
    import gpu_check

    fallback = types.SimpleNamespace(status="fallback", reason="rewrite failed: boom")
    monkeypatch.setattr(gpu_check.specdiff_fx, "last_record", lambda: fallback)
    rows = gpu_check.run_model(gpu_check.gl.TINY_SPECS["flux"], torch.device("cpu"), torch.float32, 4,
                               inductor=False, fx_only=True)
    verdicts = {r.mode: r.verdict for r in rows}
    assert all(verdicts[m] == "FAIL (fallback: rewrite failed: boom)" for m in gpu_check.SPECDIFF_MODES), verdicts
