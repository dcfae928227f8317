"""CI smoke test: the ablation script runs end to end in its tiny mode."""

from benchmarks import ablation


def test_ablation_tiny(capsys):
    ablation.main(["--tiny"])
    out = capsys.readouterr().out
    assert "| random | round-robin | drift | oracle |" in out
    assert "| defaults |" in out and "as published" in out


def test_robustness_tiny(capsys):
    ablation.main(["--robustness", "--tiny"])
    assert "| sd3 | defaults |" in capsys.readouterr().out
