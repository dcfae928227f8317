"""``probe_seed_spread.py`` in the protocol's tiny mode, so it cannot rot (CI runs this)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import probe_seed_spread
from benchmarks.test_protocol_smoke import one_thread  # noqa: F401  (autouse: protocol.main sets its --threads)
from specdiff_fx import schedule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_offset_shifts_every_draw_and_is_undone():
    original = schedule.choose_tokens
    score = torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    with probe_seed_spread.probe_seed_offset(5) as seeds:
        idx, probe = schedule.choose_tokens(score, 8, 2, seed=3)
        assert seeds == [8]
    assert schedule.choose_tokens is original
    want_idx, want_probe = original(score, 8, 2, seed=8)
    assert torch.equal(idx, want_idx) and torch.equal(probe, want_probe)
    assert not torch.equal(probe, original(score, 8, 2, seed=3)[1])  # another draw
    with probe_seed_spread.probe_seed_offset(5) as seeds:
        schedule.choose_tokens(score, 8, 0, seed=3)  # no probe: nothing drawn
    assert seeds == []


def test_tiny_runs_and_table(tmp_path):
    got = probe_seed_spread.main(["--offsets", "0,7", "--out", str(tmp_path), "--", "--tiny"])
    assert got["draws"][0] > 0 and got["draws"][7] == got["draws"][0]  # the runtime draws through the patch
    lines = got["table"].splitlines()
    assert lines[0].startswith("| cell | offset_0 | offset_7 | spread")
    row = next(line for line in lines if line.startswith("| sd3 sd3_cfg 6 specdiff defaults |"))
    assert row.count("|") == 5 and lines[-1].startswith("| mean of the 1 cells |")
    again = probe_seed_spread.main(["--merge", f"{tmp_path}/offset_0,{tmp_path}/offset_7"])
    assert again["table"] == got["table"]
