"""CI smoke test: host_reads counts each call's reads of tensor values and matches the calls to
the report (SD3 with batched CFG, FLUX with true CFG), and leaves torch as it found it."""

import pytest
import torch

from benchmarks import host_reads


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_reads_are_counted_per_call_kind(model):
    equal, item = torch.equal, torch.Tensor.item
    out = host_reads.measure(model, steps=6, prompts=1, inductor=False)
    assert torch.equal is equal and torch.Tensor.item is item
    kinds = out["kinds"]
    assert sum(v["calls"] for v in kinds.values()) == 6 * (2 if out["sampler"] == "flux_truecfg" else 1)
    assert kinds["full"]["calls"] >= 1 and kinds["full"]["max"] >= 1  # a call reads its sigma, at least
    assert all(v["min"] <= v["median"] <= v["max"] for v in kinds.values())
    assert any(".py:" in w for w in out["where"])  # named by the line of specdiff_fx that read


def test_counter_counts_only_while_active():
    c = host_reads.ReadCounter()
    with c.installed():
        float(torch.ones(()))
        c.active = True
        float(torch.ones(()))
        torch.equal(torch.ones(2), torch.ones(2))
        c.active = False
    assert c.count == 2 and sum(c.where.values()) == 2
