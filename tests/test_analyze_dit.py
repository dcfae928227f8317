"""Analysis on real Dynamo graphs of tiny SD3, SD3.5 and FLUX configs."""

import pytest
import torch

from oracle import num_attention_calls
from specdiff_fx import NotADiT, analyze_dit
from specdiff_fx.layout import Layout, Seg


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_plan_describes_the_model(captured, name):
    c = captured(name)
    before = [(n.op, n.target, n.args) for n in c.gm.graph.nodes]
    plan = analyze_dit(c.gm)
    assert [(n.op, n.target, n.args) for n in c.gm.graph.nodes] == before  # read-only
    n_img = 4 * 6  # 8x12 latent / patch 2 (SD3), 4x6 packed tokens (FLUX)
    assert plan.num_image_tokens == n_img and plan.batch == 2 and plan.width == 16
    assert len(plan.attention) == num_attention_calls(c.model)
    placeholders = list(c.gm.graph.find_nodes(op="placeholder"))
    assert "timestep" in placeholders[plan.timestep_input].name
    assert "hidden_states" in placeholders[plan.sample_input].name
    if name == "flux":
        assert plan.family == "flux" and plan.timestep_per_sigma == 1.0
        assert [b.kind for b in plan.blocks] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
        assert all(s.layout == Layout(2, (Seg("txt", 5), Seg("img", n_img))) for s in plan.attention)
        assert all(s.img_offset == 5 and not s.image_first for s in plan.attention)
        # RoPE cos/sin meet the subset twice (q and k) per attention call
        assert len(plan.side_inputs) == 2 * 2 * len(plan.attention)
        assert plan.out_channels == 4
    else:
        assert plan.family == "sd3" and plan.timestep_per_sigma == 1000.0
        assert [b.path for b in plan.blocks] == [f"transformer_blocks.{i}" for i in range(3)]
        joint = Layout(2, (Seg("img", n_img), Seg("txt", 5)))
        expected = [joint, joint, joint] if name == "sd3" else [joint, Layout(2, (Seg("img", n_img),)), joint, joint]
        assert [s.layout for s in plan.attention] == expected
        assert plan.side_inputs == ()  # the positional embedding is added before the stream starts
        assert plan.out_channels == 16
    # blocks are contiguous runs in graph order and name real nodes
    names = [n.name for n in c.gm.graph.nodes]
    spans = [(names.index(b.first), names.index(b.last)) for b in plan.blocks]
    assert all(a <= b for a, b in spans) and all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))
    assert "specdiff" in next(n for n in c.gm.graph.nodes if n.name == plan.end).meta


def test_a_plain_mlp_is_not_a_dit():
    from conftest import capture

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    gm, _ = capture(mlp, {"input": torch.randn(2, 4)})
    with pytest.raises(NotADiT, match="no supported DiT"):
        analyze_dit(gm)


def test_dynamic_shapes_are_refused_with_a_reason():
    from oracle import sd3_inputs, tiny_sd3

    store = {}

    def grab(gm, ex):
        store["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_sd3(), backend=grab, dynamic=True)(**sd3_inputs(2, 8, 12))
    with pytest.raises(NotADiT, match="dynamic"):
        analyze_dit(store["gm"])
