"""Analysis on real Dynamo graphs of tiny SD3, SD3.5 and FLUX configs."""

import pytest
import torch

from oracle import num_attention_calls
from specdiff_fx import NotADiT, analyze_dit
from specdiff_fx.layout import Layout, Seg, op_name


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
    assert plan.moving is None  # the latent input is shaped like the output
    # the module state: every parameter is stamped by storage and version, none by value
    params = [i for i, p in enumerate(placeholders) if "_parameters_" in p.name]
    assert params and set(params) <= set(plan.state_tensors) and plan.state_values == ()
    assert not {plan.timestep_input, plan.sample_input} & set(plan.state_tensors)
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


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_the_text_stream_is_traced_for_text_subsets(captured, name):
    """``text_layouts``: the same layouts as ``layouts`` wherever both have one, and the text
    stream from the text input to the first attention (its norm and projections) as ``(txt M)``."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    assert plan.text_subset_error is None and plan.num_text_tokens == 5
    assert "encoder_hidden_states" in plan.text_start
    assert all(plan.text_layouts[n].layout == info.layout for n, info in plan.layouts.items())
    assert plan.text_layouts[plan.text_start].layout == Layout(1, (Seg("txt", 5),))
    nodes = {n.name: n for n in c.gm.graph.nodes}
    added = [n for n in plan.text_layouts if n not in plan.layouts]
    linears = [n for n in added if op_name(nodes[n]) == "linear"]  # context_embedder, the first text q/k/v
    assert len(linears) == 4 and all(plan.text_layouts[n].layout.segs == (Seg("txt", 5),) for n in added)


def test_text_joined_in_from_elsewhere_refuses_text_subsets():
    """A text-length tensor that is not traced from the text input, joined to the image tokens:
    its rows could not follow a text index, so the graph supports no text subset."""
    from specdiff_fx.families import Family
    from specdiff_fx.passes.analyze_dit import _text_layouts

    class Joint(torch.nn.Module):
        def forward(self, x, encoder_hidden_states, registers):
            text = torch.nn.functional.layer_norm(encoder_hidden_states, (8,))
            return torch.cat([registers, x], dim=1) * 2.0, text

    store = {}

    def grab(gm, ex):
        store["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Joint(), backend=grab, fullgraph=True, dynamic=False)(
        torch.randn(2, 6, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    gm = store["gm"]
    x = next(p for p in gm.graph.find_nodes(op="placeholder") if p.name == "l_x_")
    end = next(n for n in gm.graph.nodes if op_name(n) == "mul")
    family = Family("t", "Joint", (), (), "", "", 1.0, text_input="encoder_hidden_states")
    facts = _text_layouts(gm, family, x, end, 6, Layout(1, (Seg("img", 6),)), [], None)
    assert "joins in text tokens that do not come from the text input" in facts["text_subset_error"]
    assert "text_layouts" not in facts


def test_a_dit_inside_the_compiled_module_is_refused_with_the_fix():
    """A transformer compiled as a submodule of a wrapper (its module paths, inputs and
    parameters named from the wrapper) is refused with the one-line fix, not with a
    misleading "no image-token stream"; the backend then falls back to plain compilation."""
    from conftest import capture
    from oracle import sd3_inputs, tiny_sd3

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    gm, _ = capture(Wrapper(tiny_sd3()), sd3_inputs(2, 8, 12))
    with pytest.raises(NotADiT, match=r"SD3Transformer2DModel is a submodule \('inner'\).*torch.compile\(pipe.transformer"):
        analyze_dit(gm)
