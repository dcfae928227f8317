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
from specdiff_fx.signature import ContextMode, Role, VariantKey

MODELS = {"sd3": lambda: tiny_sd3(0), "sd35": lambda: tiny_sd3(0, sd35=True), "flux": lambda: tiny_flux(0)}
SHAPES = {"sd3": [(8, 8), (16, 8)], "flux": [(4, 4), (6, 3)]}  # latent HxW / token grid; square + not


def inputs_for(name, batch, shape):
    if name == "flux":
        return flux_inputs(batch, *shape, seed=batch)
    return sd3_inputs(batch, *shape, seed=batch)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def within_one_rounding(a, b, max_share=0.01):
    """``a`` equals ``b`` up to one rounding step of their dtype, on at most ``max_share`` of the
    elements: two float32 computations that agree to 1e-6 can round a few elements to
    neighbouring bfloat16 values (the K/V caches are stored rounded, ``kv_dtype="auto"``), while
    a systematic difference (another rounding mode, a wrong value) moves far more of them."""
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    step = b.abs() * torch.finfo(torch.bfloat16).eps + 1e-6 * b.abs().max()
    return bool((diff <= step).all()) and (diff > 0).float().mean().item() <= max_share


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
        assert extras[key].dtype == value.dtype, key
        if value.dtype == torch.bfloat16:  # the K/V caches of this float32 model, rounded as stored
            assert within_one_rounding(extras[key], value), key
        else:
            assert rel_err(extras[key], value) <= 1e-4, key


@pytest.mark.inductor
def test_inductor_sparse_variant_matches_fx(captured, monkeypatch):
    """FLUX: the sparse variant compiled by Inductor equals the plain FX run, and its in-place
    cache writes survive compilation, with the default caches (bfloat16 for this float32
    model, ``kv_dtype="auto"``: read, widened and written in place). One context mode, ``SUBSET`` (the default under CFG: a
    share of the text tokens computed, their rows written into the text caches too): each
    mode is one more Inductor compile (tens of seconds on CPU). The other modes are checked on
    the plain FX path (test_sparse_semantics.py against the oracle, test_text_subset.py,
    test_passes.py); SD3's subset variant under Inductor inside a pipeline in
    test_pipelines_specdiff.py::test_default_options_with_inductor_sd3."""
    c = captured("flux")
    plan = analyze_dit(c.gm)
    k, k_txt = 7, 3
    # the score too; K/V extrapolated (default)
    cfg = SpecDiffConfig(score_queries=0, score="attention")
    key = VariantKey.sparse(k, ContextMode.SUBSET, extrapolate=True, k_txt=k_txt)
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
    n, m = plan.num_image_tokens, plan.num_text_tokens

    def value(i):
        if i.port.role is Role.IDX:
            return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(2)])
        if i.port.role is Role.TEXT_IDX:
            return torch.stack([torch.randperm(m, generator=g)[:k_txt] for _ in range(2)])
        if i.port.role in (Role.KV_RATIO, Role.TEXT_TOKEN_RATIO):
            return torch.rand(i.shape, generator=g) * 1.5
        return torch.randn(i.shape, generator=g).to(i.dtype)  # the caches: bfloat16 (kv_dtype="auto")

    values = [value(i) for i in compiled.new_inputs]
    c1 = [t.clone() for t in values]
    c2 = [t.clone() for t in values]
    with torch.no_grad():
        _, a = compiled.split(compiled(*c.example_inputs, *c1))
        _, b = plain.split(plain(*c.example_inputs, *c2))
    assert {"tokens", "subset", "score"} <= b.keys() and a.keys() == b.keys()
    assert not any(name.startswith("kt") for name in b)  # fresh text K/V only with REFRESH
    for name in b:
        assert rel_err(a[name], b[name]) <= 1e-4, name
    written: dict = {}  # role -> positions of the inputs the variant writes
    for j, i in enumerate(compiled.new_inputs):
        if i.updated_in_place:
            written.setdefault(i.port.role, []).append(j)
    # image K/V and their previous, text K/V and their previous: per attention, K and V
    assert {r: len(js) for r, js in written.items()} == {
        r: 2 * len(plan.attention) for r in (Role.KV, Role.KV_PREV, Role.TEXT_KV, Role.TEXT_KV_PREV)}
    for x, y, before in ((c1[j], c2[j], values[j]) for js in written.values() for j in js):
        # a bfloat16 cache row may round the two graphs' fresh keys one unit apart
        assert x.dtype == torch.bfloat16 and within_one_rounding(x, y) and not torch.equal(x, before)


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
                           for e in (True, False)} | {VariantKey.skip()}  # the controller's skip calls
    ex.variant(VariantKey.skip())
    ex.variant(VariantKey.sparse(k, ContextMode.CACHED, True))
    assert ex.example_inputs is not None
    fallback = ex.variant(VariantKey.sparse(k, ContextMode.COMPUTE, False))
    assert not any(i.name.startswith(("specdiff_kp", "specdiff_kt")) for i in fallback.new_inputs)
    ex.variant(VariantKey.sparse(k, ContextMode.CACHED, False))
    ex.variant(VariantKey.sparse(k, ContextMode.COMPUTE, True))
    assert ex.example_inputs is None  # every variant this config may need is built
    # without the cap one sparse variant and the skip variant are all
    plain = cfg.replace(max_cache_bytes=None)
    assert variants_needed(plain, make_policy(plain, plan.num_image_tokens), plan) == {
        VariantKey.sparse(k, ContextMode.CACHED, True), VariantKey.skip()}
