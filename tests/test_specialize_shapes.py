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


def traced_calls(model, inputs, shapes):
    """``(graph, args)`` of each call of ``model`` compiled by a backend that runs Dynamo's
    graphs as they are, called at ``shapes`` in turn."""
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
    return store


def dynamic_graph(name):
    """The graph Dynamo traces after a second resolution, with the real args of that call."""
    make, inputs, shapes = CASES[name]
    model = make()
    return model, inputs(shapes[1]), *traced_calls(model, inputs, shapes)[-1]


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


def _flux_steps(model, inputs, sigmas):
    """A FLUX Euler loop as a generator: one transformer call per ``next``, the latent last."""
    x = inputs["hidden_states"].clone()
    for i in range(len(sigmas) - 1):
        v = model(**dict(inputs, hidden_states=x, timestep=torch.full((1,), float(sigmas[i])))).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        yield x


def test_a_shape_seen_before_keeps_its_runtime():
    """Once Dynamo has a symbolic-shape graph, it routes a shape it had compiled statically
    through that graph. The specialisation for that shape is the static graph again, and the
    backend returns what it compiled for it (configured by a string backend, so each Dynamo
    graph has a backend object of its own): no variant is compiled again, and a generation in
    flight at that shape keeps its state, giving what it gives alone."""
    model = tiny_flux()
    options = {"inductor": False, "controller": "fixed", "warmup_steps": 2, "refresh_at": (0.6,)}
    a, b = flux_inputs(1, 4, 4, seed=1), flux_inputs(1, 4, 6, seed=2)
    sigmas = torch.linspace(1, 0, 9)
    with torch.no_grad():
        specdiff_fx.reset(), torch._dynamo.reset()
        alone = list(_flux_steps(torch.compile(model, backend="specdiff", options=options), a, sigmas))[-1]
        specdiff_fx.reset(), torch._dynamo.reset()
        before = specdiff_fx.compile_records()  # held: their ids stay theirs (the log keeps the last 64)
        compiled = torch.compile(model, backend="specdiff", options=options)
        runs = [_flux_steps(compiled, a, sigmas), _flux_steps(compiled, b, sigmas)]
        for _ in range(len(sigmas) - 1):  # the two generations step by step, interleaved
            out_a, out_b = (next(run) for run in runs)
        records = [r for r in specdiff_fx.compile_records() if all(r is not b for b in before)]
        report = specdiff_fx.last_generation()
    assert [(r.status, r.plan.num_image_tokens) for r in records] == [("specdiff", 16), ("specdiff", 24)]
    torch.testing.assert_close(out_a, alone, atol=0, rtol=0)
    assert report.num_image_tokens == 24 and not report.notes


@pytest.mark.parametrize("name", list(CASES))
def test_fingerprint_tells_equal_static_graphs(name):
    """The symbolic graph specialised back to the first call's shape has the fingerprint of
    the static graph Dynamo traced for that call; another shape, or another model's weights,
    another."""
    from specdiff_fx.graph_utils import graph_fingerprint

    make, inputs, shapes = CASES[name]
    (first, first_args), (symbolic, second_args), (again, third_args) = traced_calls(make(), inputs, shapes + shapes[:1])
    assert again is symbolic and graph_fingerprint(symbolic, second_args) is None  # SymInt inputs
    static, kept = specialize_shapes(symbolic, third_args)
    assert graph_fingerprint(static, [third_args[i] for i in kept]) == graph_fingerprint(first, first_args)
    other, kept2 = specialize_shapes(symbolic, second_args)
    assert graph_fingerprint(other, [second_args[i] for i in kept2]) != graph_fingerprint(first, first_args)
    swapped = [torch.nn.Parameter(a.detach().clone()) if isinstance(a, torch.nn.Parameter) else a for a in first_args]
    assert graph_fingerprint(first, swapped) != graph_fingerprint(first, first_args)
