"""The invariant that guards everything: without caching the backend reproduces eager.

Non-Inductor runs cover every model at batch 1 and 2 and at a square and a non-square
resolution (pairwise: caching on at batch 2 square and batch 1 non-square, ``cache_ratio=0``,
the untouched graph after the same analysis, at batch 2 non-square). Inductor
runs (slow on CPU) cover both rewritten variants: the full one on SD3.5, the sparse one on
FLUX (SD3 runs both under Inductor in test_pipelines_specdiff.py). The untouched graph goes
to Inductor as a fallback does (test_fallback.py).
"""

import pytest
import torch

import specdiff_fx
from oracle import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.signature import ContextMode, VariantKey

MODELS = {"sd3": lambda: tiny_sd3(0), "sd35": lambda: tiny_sd3(0, sd35=True), "flux": lambda: tiny_flux(0)}
SHAPES = {"sd3": [(8, 8), (16, 8)], "flux": [(4, 4), (6, 3)]}  # latent HxW / token grid; square + not


def inputs_for(name, batch, shape):
    if name == "flux":
        return flux_inputs(batch, *shape, seed=batch)
    return sd3_inputs(batch, *shape, seed=batch)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compiled_output(model, inputs, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(**inputs).sample


# (cache_ratio, shape, batch). Batch 2 square is the case with the most coinciding sizes
# (batch = heads = 2, image tokens = hidden width = 16); batch 1 non-square has none and a
# non-square grid (RoPE ids, PatchEmbed crop). cache_ratio=0 analyses the graph as 0.5 does,
# so with it every (batch, shape) pair but (1, square) is analysed. The graphs the pass and
# oracle tests rewrite (conftest.py's captured models) are batch 2 non-square.
MATRIX = [(0.5, 0, 2), (0.5, 1, 1), (0.0, 1, 2)]


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
@pytest.mark.parametrize("cache_ratio, shape_i, batch", MATRIX)
def test_matches_eager_without_inductor(name, batch, shape_i, cache_ratio):
    model = MODELS[name]()
    inputs = inputs_for(name, batch, SHAPES["flux" if name == "flux" else "sd3"][shape_i])
    with torch.no_grad():
        ref = model(**inputs).sample
    backend = specdiff_fx.backend(cache_ratio=cache_ratio, inductor=False)
    out = compiled_output(model, inputs, backend)
    assert rel_err(out, ref) <= 1e-4
    rec = backend.records[-1]
    assert rec.status == ("plain" if cache_ratio == 0 else "specdiff"), rec


@pytest.mark.inductor
def test_inductor_full_variant_matches_eager(captured):
    """SD3.5 config: the full variant (extra outputs added) compiled by Inductor."""
    c = captured("sd35")
    plan = analyze_dit(c.gm)
    full = build_variant(c.gm, c.example_inputs, plan, SpecDiffConfig(score_queries=0), VariantKey.full())
    plain = build_variant(c.gm, c.example_inputs, plan, SpecDiffConfig(score_queries=0, inductor=False),
                          VariantKey.full())
    with torch.no_grad():
        ref = c.model(**c.inputs).sample
        user, extras = full.split(full(*c.example_inputs))
        _, plain_extras = plain.split(plain(*c.example_inputs))
    assert rel_err(user[0], ref) <= 1e-4
    for key, value in plain_extras.items():
        assert rel_err(extras[key], value) <= 1e-4, key


@pytest.mark.inductor
def test_inductor_sparse_variant_matches_fx(captured, monkeypatch):
    """FLUX: the subset variant compiled by Inductor equals the plain FX run, and the
    in-place cache writes survive compilation. One context mode, ``COMPUTE`` (the default
    under CFG): each mode is one more Inductor compile (tens of seconds on CPU). The other
    modes are checked on the plain FX path: ``CACHED`` against the oracle in
    test_sparse_semantics.py::test_context_caching_matches_the_oracle, ``REFRESH`` (the
    fresh text K/V it returns) in test_passes.py::
    test_attend_with_kv_cache_returns_fresh_text_kv_for_context_refresh and in a pipeline in
    test_pipelines_specdiff.py::test_context_interval_in_a_pipeline."""
    context = ContextMode.COMPUTE
    c = captured("flux")
    plan = analyze_dit(c.gm)
    k = 7
    # the score too; K/V extrapolated (default)
    cfg = SpecDiffConfig(score_queries=0, score="attention")
    key = VariantKey.sparse(k, context, extrapolate=True)
    import torch._inductor.compile_fx as inductor_compile

    inner, patches = inductor_compile.compile_fx, []

    def recording(*args, **kwargs):
        patches.append(kwargs.get("config_patches") or {})
        return inner(*args, **kwargs)

    monkeypatch.setattr(inductor_compile, "compile_fx", recording)
    compiled = build_variant(c.gm, c.example_inputs, plan, cfg, key)
    # compiled so that Inductor writes the caches in place (variants.IN_PLACE_CACHES: with its
    # locality reordering it copied every cache, wrote the copy and copied it back, each call)
    assert patches and patches[0].get("reorder_for_locality") is False
    plain = build_variant(c.gm, c.example_inputs, plan, cfg.replace(inductor=False), key)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(plan.num_image_tokens, generator=g)[:k] for _ in range(2)])
    rest = compiled.new_inputs[1:]  # history, weights, K/V ratio, K/V caches (current and previous)
    caches = [torch.rand(i.shape, generator=g) * 1.5 if i.name.startswith("specdiff_kv_ratio")
              else torch.randn(i.shape, generator=g) for i in rest]
    c1 = [t.clone() for t in caches]
    c2 = [t.clone() for t in caches]
    with torch.no_grad():
        _, a = compiled.split(compiled(*c.example_inputs, idx, *c1))
        _, b = plain.split(plain(*c.example_inputs, idx, *c2))
    assert {"tokens", "subset", "score"} <= b.keys() and a.keys() == b.keys()
    assert any(name.startswith("kt") for name in b) == (context is ContextMode.REFRESH)
    for name in b:
        assert rel_err(a[name], b[name]) <= 1e-4, name
    written = [j for j, i in enumerate(rest) if i.port.updated_in_place]
    assert len(written) == 4 * len(plan.attention)
    for x, y, before in ((c1[j], c2[j], caches[j]) for j in written):  # the K/V caches, written in place
        assert rel_err(x, y) <= 1e-5 and not torch.equal(x, before)


def test_executor_keeps_example_inputs_while_a_fallback_variant_may_be_needed(captured):
    """With ``max_cache_bytes`` a generation may drop the text caches and the K/V
    extrapolation, so the executor keeps the example inputs until those variants exist."""
    from specdiff_fx.control import make_policy
    from specdiff_fx.runtime import GraphExecutor, variants_needed

    c = captured("flux")
    plan = analyze_dit(c.gm)
    cfg = SpecDiffConfig(inductor=False, context_ratio=1.0, max_cache_bytes=10**12)
    k = cfg.num_computed(plan.num_image_tokens)

    def executor(config):
        return GraphExecutor(c.gm, c.example_inputs, plan, config,
                             may_need=variants_needed(config, make_policy(config, plan.num_image_tokens), plan))

    ex = executor(cfg)
    assert ex.may_need == {VariantKey.sparse(k, ctx, e) for ctx in (ContextMode.CACHED, ContextMode.COMPUTE)
                           for e in (True, False)}
    ex.variant(VariantKey.sparse(k, ContextMode.CACHED, True))
    assert ex.example_inputs is not None
    fallback = ex.variant(VariantKey.sparse(k, ContextMode.COMPUTE, False))
    assert not any(i.name.startswith(("specdiff_kp", "specdiff_kt")) for i in fallback.new_inputs)
    ex.variant(VariantKey.sparse(k, ContextMode.CACHED, False))
    ex.variant(VariantKey.sparse(k, ContextMode.COMPUTE, True))
    assert ex.example_inputs is None  # every variant this config may need is built
    # without the cap one sparse variant is all: its executor drops the inputs once it is built
    plain = cfg.replace(max_cache_bytes=None)
    assert variants_needed(plain, make_policy(plain, plan.num_image_tokens), plan) == {
        VariantKey.sparse(k, ContextMode.CACHED, True)}
