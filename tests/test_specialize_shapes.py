"""Dynamic (symbolic-shape) graphs: specialise per concrete shape, then rewrite as usual."""

import pytest
import torch

import specdiff_fx
from oracle import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from specdiff_fx import analyze_dit
from specdiff_fx.passes import DynamicShapes, specialize_shapes

CASES = {
    "sd3": (tiny_sd3, lambda shape: sd3_inputs(2, *shape), [(8, 8), (8, 12)]),
    "flux": (tiny_flux, lambda shape: flux_inputs(1, *shape), [(4, 4), (4, 6)]),
}


def dynamic_graph(name):
    """The graph Dynamo traces after a second resolution, with the real args of that call."""
    make, inputs, shapes = CASES[name]
    model = make()
    store = []

    def grab(gm, example_inputs):
        def run(*args):
            store.append((gm, list(args)))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab)
    with torch.no_grad():
        for shape in shapes:
            compiled(**inputs(shape))
    return model, inputs(shapes[1]), *store[-1]


@pytest.mark.parametrize("name", list(CASES))
def test_specialize_shapes(name):
    model, inputs, gm, args = dynamic_graph(name)
    assert any(not isinstance(a, torch.Tensor) for a in args)  # SymInt inputs present
    with pytest.raises(DynamicShapes):
        analyze_dit(gm)
    static, kept = specialize_shapes(gm, args)
    assert kept == [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    placeholders = list(static.graph.find_nodes(op="placeholder"))
    assert len(placeholders) == len(kept)
    for node in static.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(s, int) for s in val.shape), node.name
        assert not isinstance(val, torch.SymInt)
    with torch.no_grad():
        out = static(*[args[i] for i in kept])[0]
        torch.testing.assert_close(out, model(**inputs).sample)
    plan = analyze_dit(static)
    assert plan.num_image_tokens == 24


def test_backend_specialises_each_resolution():
    make, inputs, shapes = CASES["sd3"]
    model = make()
    be = specdiff_fx.backend(inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for shape in shapes + [(16, 8)]:
            out = compiled(**inputs(shape)).sample
            torch.testing.assert_close(out, model(**inputs(shape)).sample, atol=1e-5, rtol=1e-4)
    assert [r.status for r in be.records] == ["specdiff"] * 3
    assert [r.plan.num_image_tokens for r in be.records] == [16, 24, 32]
