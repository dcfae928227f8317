"""The load benchmark in its tiny mode (CI runs this): requests in flight together, interleaved
and threaded, each equal to its run alone and costing what it costs alone."""

import pytest
import torch

from benchmarks import load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_load_tiny(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    try:
        data = load.main(["--tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = data["rows"]
    assert [(r["n"], r["mode"]) for r in rows] == [(1, "interleaved"), (1, "threaded"),
                                                   (2, "interleaved"), (2, "threaded")]
    alone = data["alone_flops"]  # each request alone (prompt and seed differ between requests)
    assert rows[0]["specdiff"]["flops"] == pytest.approx(alone[:1]) and max(alone) < 1.0  # it cached
    for r in rows:
        assert all(p == float("inf") for p in r["eager"]["psnr"])  # eager in flight = eager alone
        assert all(p > 30 for p in r["specdiff"]["psnr"])
        # every request costs what it costs alone: nothing is recomputed because others are in flight
        assert r["specdiff"]["flops"] == pytest.approx(alone[:r["n"]])
        assert r["specdiff"]["images_per_s"] > 0
    md = load.line(rows[-1])
    assert md.startswith("| 2 | threaded |")
