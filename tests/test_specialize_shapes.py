"""Dynamic (symbolic-shape) graphs: specialise per concrete shape, then rewrite as usual."""

import operator

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


def test_in_place_writes_survive_specialisation():
    """A graph whose values are written in place (``out[..., 0::2] = ...``, a ``setitem``
    node without users, as in Wan's RoPE) keeps those writes, and the value read after
    them, when specialised."""

    class Rope(torch.nn.Module):
        def forward(self, x, cos):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos
            out[..., 1::2] = x2 * cos
            return out + 1

    store = []

    def grab(gm, example_inputs):
        def run(*args):
            store.append((gm, list(args)))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    model, compiled = Rope(), torch.compile(Rope(), backend=grab)
    for n in (3, 5):  # the second length makes the graph dynamic
        x, cos = torch.randn(2, n, 4), torch.randn(n, 2)
        compiled(x, cos)
    gm, args = store[-1]
    static, kept = specialize_shapes(gm, args)
    assert sum(n.target is operator.setitem for n in static.graph.nodes) == 2
    torch.testing.assert_close(static(*[args[i] for i in kept])[0], model(x, cos))
    assert all(p.meta["specdiff_example"]() is args[i] for p, i in zip(static.graph.find_nodes(op="placeholder"), kept))
