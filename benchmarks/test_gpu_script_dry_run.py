"""``benchmarks/gpu_latency.py --dry-run --no-inductor --split --device-time`` runs on the CPU, exits 0 and prints
its markdown tables (the same functions as the GPU run, with tiny configs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "gpu_latency.py"


def test_dry_run_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_latency.md"
    # tiny models: one thread (and no Inductor compile workers) is as fast and less disturbed by other load
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--no-inductor", "--split", "--device-time", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    header = "| model | mode | compile s | latency s/gen | peak mem GiB |"
    assert header in proc.stdout
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith("| ") and "tiny (dry run)" in line and len(line.split("|")) == 11]
    modes = sorted((row.split("|")[1].strip(), row.split("|")[2].strip()) for row in rows)
    assert modes == sorted((f"{m} tiny (dry run)", mode) for m in ("SD3", "FLUX") for mode in ("eager", "specdiff"))
    specdiff_rows = [row for row in rows if "| specdiff |" in row]
    assert all("%" in row for row in specdiff_rows), "specdiff rows lack flops_fraction"
    assert out.read_text().startswith(header)
    # --split: every call of each mode timed once more, grouped by kind (4 steps: 4 calls per generation);
    # --device-time: the device's busy time per kind (none on the CPU) and over the generation
    split = [line.split("|") for line in proc.stdout.splitlines()
             if line.startswith("| ") and "tiny (dry run)" in line and len(line.split("|")) == 10]
    assert "median device-busy ms/call |" in proc.stdout
    assert proc.stdout.count("the device busy 0.0 ms over the profiled generation") == 4
    for model in ("SD3", "FLUX"):
        calls = {row[3].strip(): int(row[4]) for row in split if row[1].strip() == f"{model} tiny (dry run)"}
        assert calls.get("eager") == 4, (model, calls)
        assert calls.get("full", 0) >= 1 and sum(v for k, v in calls.items() if k != "eager") == 4, (model, calls)


def test_modes_are_checked() -> None:
    import pytest

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_latency

    for bad in ("eager,bogus", "eager,eager", ","):
        with pytest.raises(SystemExit, match="--modes"):
            gpu_latency.main(["--dry-run", "--modes", bad])


def test_inductor_config_is_checked() -> None:
    """``--inductor-config`` (global Inductor settings for every compiled mode): a non-dict or an
    unknown key is refused before any model is built."""
    import pytest

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_latency

    for bad, match in (('{"no_such_setting": 1}', "no_such_setting does not exist"), ("[1]", "a JSON dict")):
        with pytest.raises(SystemExit, match=match):
            gpu_latency.main(["--dry-run", "--models", "sd3", "--inductor-config", bad])


def test_session_script_runs_its_jobs_dry(tmp_path: Path) -> None:
    """``scripts/gpu_session.sh --dry-run JOB...`` (the prepared command for a lent GPU) runs each
    job's gpu_latency.py on the CPU and leaves its table and log in ``$OUT``; an unknown job is
    refused before anything runs."""
    script = SCRIPT.parent.parent / "scripts" / "gpu_session.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run(["bash", str(script), "--dry-run", "flux", "sd3_whole"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux.log", "flux.md", "sd3_whole.log", "sd3_whole.md"]
    assert "| FLUX tiny (dry run) | specdiff |" in (tmp_path / "flux.md").read_text()
    assert "| SD3 tiny (dry run) | specdiff |" in (tmp_path / "sd3_whole.md").read_text()
    bad = subprocess.run(["bash", str(script), "--dry-run", "sd3", "bogus"], capture_output=True, text=True,
                         timeout=60, env={**env, "OUT": str(tmp_path / "bad")})
    assert bad.returncode == 2 and "unknown job 'bogus'" in bad.stderr
    assert not (tmp_path / "bad").exists()
