"""The sweep script in its tiny mode, so it cannot rot (CI runs this). Run in process, as the
other benchmark smoke tests run theirs: a subprocess only added its imports (~8 s)."""

from benchmarks import sweep


def test_sweep_tiny_runs(capsys):
    sweep.main(["--tiny", "--no-inductor"])
    out = capsys.readouterr().out
    assert "| eager |" in out and "| specdiff |" in out and "taylorseer" in out
