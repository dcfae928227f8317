"""LoRA adapters (diffusers' ``add_adapter`` / ``load_lora_weights``, through peft) on a compiled
transformer: the adapters' extra matrix products are per-token ops like the base layers', so the
rewrite covers them, and a scale changed with ``set_adapters`` reaches every later image.

Dynamo guards the adapters' scale; when it changes it recompiles and passes the scale as a 0-d
tensor input read with ``.item()`` (and later changes need no recompile). The rewrite's shape
propagation, and Inductor's tracing of a variant compiled in the middle of a generation, must
take that input: the recompiled graph is rewritten, not compiled plain as a fallback.
"""

import peft  # a test dependency (pyproject's "test" extra): what diffusers loads adapters with
import pytest
import torch

import specdiff_fx
from oracle import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from test_hardening import euler

#: the sparse variant computes every token: the rewritten graphs, adapters included, must give
#: eager's output (gathers, cached K/V and scatters run with nothing left out)
EVERY_TOKEN = dict(controller="fixed", warmup_steps=1, cache_ratio=1e-6, context_ratio=0, hindsight=False,
                   inductor=False)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def with_lora(name):
    model = tiny_sd3(0) if name == "sd3" else tiny_flux(0)
    # init_lora_weights=False: random B as well as A, so the adapter changes the output
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                      adapter_name="style")
    return model, (sd3_inputs(2, 8, 8) if name == "sd3" else flux_inputs(2, 4, 4))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_adapters_are_rewritten_and_follow_set_adapters(name):
    model, inputs = with_lora(name)
    backend = specdiff_fx.backend(**EVERY_TOKEN)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        base = euler(model, inputs)
        assert rel(euler(compiled, inputs), base) <= 1e-5
        for scale in (0.3, 0.7):  # the first change recompiles (scale becomes an input), the second does not
            model.set_adapters(["style"], weights=[scale])
            ref = euler(model, inputs)
            assert rel(ref, base) > 1e-3  # the scale matters
            assert rel(euler(compiled, inputs), ref) <= 1e-5, scale
    assert [r.status for r in backend.records] == ["specdiff", "specdiff"], [r.reason for r in backend.records]
    graph = backend.runtimes[-1].executor.gm
    assert any(n.op == "call_method" and n.target == "item" for n in graph.graph.nodes)  # the scale as an input


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_scale_per_call(name):
    """The scale as the SD3 and FLUX pipelines pass ``lora_scale``: ``joint_attention_kwargs=
    {"scale": s}`` on every call (the transformer scales its adapters inside ``forward``)."""
    model, inputs = with_lora(name)
    backend = specdiff_fx.backend(**EVERY_TOKEN)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for scale in (1.0, 0.5, 0.25):
            kw = {"joint_attention_kwargs": {"scale": scale}}
            assert rel(euler(compiled, inputs, **kw), euler(model, inputs, **kw)) <= 1e-5, scale
    assert [r.status for r in backend.records] == ["specdiff", "specdiff"], [r.reason for r in backend.records]


@pytest.mark.inductor
def test_lora_scale_as_an_input_under_inductor():
    """Under Inductor, with the sparse variant compiled in the middle of a generation (outside
    Dynamo's call of the backend), the scale read from its input tensor: after a change that
    needs no recompile, every token computed, the output is eager's at the new scale."""
    model, inputs = with_lora("flux")
    model.set_adapters(["style"], weights=[0.5])
    backend = specdiff_fx.backend(**{**EVERY_TOKEN, "inductor": True})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        euler(compiled, inputs)
        model.set_adapters(["style"], weights=[0.9])
        euler(compiled, inputs)  # recompiles: the first graph had the scale as a constant
        model.set_adapters(["style"], weights=[0.2])
        ref, out = euler(model, inputs), euler(compiled, inputs)
    assert [r.status for r in backend.records] == ["specdiff", "specdiff"], [r.reason for r in backend.records]
    assert specdiff_fx.last_generation().count("cached") > 0
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_per_call_scale_keeps_caching(name):
    """With the scale changed per call, Dynamo's graph returns the values it writes back to the
    adapters' attributes before the model's output: the runtime must still route, cache and
    correct on the model's output (``DiTPlan.sample_output``), not compute every call in full."""
    model, inputs = with_lora(name)
    backend = specdiff_fx.backend(inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    seen = {}
    with torch.no_grad():
        for scale in (1.0, 0.5):
            kw = {"joint_attention_kwargs": {"scale": scale}}
            ref, out = euler(model, inputs, steps=12, **kw), euler(compiled, inputs, steps=12, **kw)
            seen[scale] = (specdiff_fx.last_generation().flops_fraction, rel(out, ref))
    assert backend.runtimes[-1].plan.sample_output > 0  # the written-back values come first
    # both scales cached alike: the controller decides on each scale's own measured errors, so a
    # call near the tolerance may go either way (at most one call's share of the 12 apart)
    assert max(seen[0.5][0], seen[1.0][0]) < 0.8 and abs(seen[0.5][0] - seen[1.0][0]) <= 1 / 12, seen
    assert seen[0.5][1] < 2 * seen[1.0][1] + 1e-3, seen


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("how", ["per_call", "set_adapters"])
def test_the_scale_after_a_second_resolution(name, how):
    """Once a second resolution made Dynamo trace with symbolic shapes, the backend specialises
    each shape; the scale (a 0-d tensor input of the symbolic graph by then) is baked into each
    specialisation, so each value of the scale is another one: every call equals eager at its own scale,
    with caching and at ``cache_ratio=0`` (whose graphs are kept per shape and scale, as the
    cached ones are: a shape and scale seen before compile nothing)."""
    model = with_lora(name)[0]
    shapes = (sd3_inputs, (8, 8), (8, 12)) if name == "sd3" else (flux_inputs, (4, 4), (6, 6))
    make, first, second = shapes
    calls = [(first, 1.0), (second, 1.0), (second, 0.3), (second, 0.7), (first, 0.7), (first, 0.3), (second, 0.3),
             (first, 0.7), (second, 1.5)]
    for options in ({"inductor": False, "cache_ratio": 0.0}, {"inductor": False}):
        backend = specdiff_fx.backend(**options)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        for shape, scale in calls:
            inputs = make(1, *shape, seed=1)
            kw = {"joint_attention_kwargs": {"scale": scale}} if how == "per_call" else {}
            if how == "set_adapters":
                model.set_adapters(["style"], weights=[scale])
            with torch.no_grad():
                out, ref = compiled(**inputs, **kw).sample, model(**inputs, **kw).sample
            assert rel(out, ref) <= 1e-6, (options, shape, scale)
        # the first shape, the second; then (the scale now an input) one per shape and scale
        assert len(backend.records) == 2 + len(set(calls[2:])), [(r.status, r.reason) for r in backend.records]


def test_a_scale_changed_inside_a_generation_starts_a_new_one():
    """``set_adapters`` in the middle of a generation (a LoRA scale scheduled by a callback), once
    the scale is a graph input (no recompile): the caches were computed at the old scale, so the
    call after the change starts a new generation, as ``specdiff_fx.reset()`` would; before, the
    generation went on and its cached calls returned outputs of the old scale."""
    model, inputs = with_lora("flux")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=specdiff_fx.backend(inductor=False, controller="fixed",
                                                                warmup_steps=2, refresh_at=(0.6,)))

    def loop(reset):
        def on_step(i):
            if i == 4:  # a cached step of the fixed schedule
                model.set_adapters(["style"], weights=[2.0])
                if reset:
                    specdiff_fx.reset()
        model.set_adapters(["style"], weights=[0.2])
        with specdiff_fx.track() as tracked:
            out = euler(compiled, inputs, on_step=on_step)
        return out, tracked.reports

    with torch.no_grad():
        for scale in (0.5, 0.9):  # the scale becomes an input (the first change recompiles)
            model.set_adapters(["style"], weights=[scale])
            compiled(**inputs)
        (changed, reports), (control, _) = loop(False), loop(True)
    assert [len(r.main_steps) for r in reports] == [4, 4]
    assert any("changed since generation" in n for n in reports[1].notes)
    torch.testing.assert_close(changed, control, rtol=0, atol=0)


@pytest.mark.inductor
def test_the_scale_as_an_input_compiled_block_by_block():
    """``regional_compile=True`` (the default on an accelerator) after ``set_adapters``: the
    recompiled graph reads the scale with ``.item()``, which the block-by-block compile, run on
    Dynamo's fake inputs, cannot evaluate; the graph fell back to plain Inductor (no caching
    from then on). It now compiles whole, rewritten, and follows the scale."""
    model = tiny_sd3(0)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False), adapter_name="style")
    inputs = sd3_inputs(1, 8, 8)
    backend = specdiff_fx.backend(regional_compile=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        euler(compiled, inputs, steps=3)
        model.set_adapters(["style"], weights=[0.5])
        ref, out = euler(model, inputs, steps=3), euler(compiled, inputs, steps=3)
    assert [r.status for r in backend.records] == ["specdiff", "specdiff"], [r.reason for r in backend.records]
    assert rel(out, ref) <= 1e-4
