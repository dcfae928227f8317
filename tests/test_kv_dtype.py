"""K/V caches stored in a narrower dtype than the model computes in (``kv_dtype``).

The option only changes what the caches hold: the full variant rounds the keys and values it
returns, a sparse variant takes caches of that dtype, widens them where it reads them
(extrapolation in the model's dtype) and rounds the fresh rows it writes into them. So a
sparse variant reading bfloat16 caches must equal the float32 variant fed the same values
widened, and leave its caches equal to the float32 variant's rounded. Checked on real Dynamo
graphs of tiny SD3 and FLUX with a text subset and K/V extrapolation (every cache role), and
through a generation of the backend with a fixed schedule.
"""

import pytest
import torch

import specdiff_fx
from oracle import sd3_inputs, tiny_sd3
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.signature import ContextMode, Role, VariantKey
from test_text_subset import kv_inputs, text_attentions

CFG = SpecDiffConfig(inductor=False, score_queries=0, score="attention", kv_dtype="model")
BF16 = CFG.replace(kv_dtype="bfloat16")
CACHES = (Role.KV, Role.KV_PREV, Role.TEXT_KV, Role.TEXT_KV_PREV)
TOL = dict(atol=1e-5, rtol=1e-4)


def test_the_option_and_what_it_stores():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert SpecDiffConfig().kv_dtype == "auto"
    assert SpecDiffConfig(kv_dtype="model").kv_cache_dtype(f32) == f32
    assert SpecDiffConfig(kv_dtype="bfloat16").kv_cache_dtype(f32) == bf16
    assert SpecDiffConfig(kv_dtype="bfloat16").kv_cache_dtype(f16) == bf16
    assert SpecDiffConfig(kv_dtype="auto").kv_cache_dtype(f32) == bf16
    assert SpecDiffConfig(kv_dtype="auto").kv_cache_dtype(f16) == f16  # never less mantissa than the model's
    assert SpecDiffConfig(kv_dtype="auto").kv_cache_dtype(bf16) == bf16
    with pytest.raises(ValueError, match=r"'kv_dtype': got 'float16'.*'model' or 'bfloat16' or 'auto'"):
        SpecDiffConfig.from_options({"kv_dtype": "float16"})
    with pytest.raises(ValueError, match="kv_dtype"):
        SpecDiffConfig(kv_dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_full_variant_returns_rounded_caches(captured, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    wide = build_variant(c.gm, c.example_inputs, plan, CFG, VariantKey.full())
    narrow = build_variant(c.gm, c.example_inputs, plan, BF16, VariantKey.full())
    def casts(v):
        return [n for n in v.gm.graph.nodes if n.op == "call_method" and n.target == "to" and n.args[1:] == (torch.bfloat16,)]

    assert len(casts(narrow)) == 2 * len(plan.attention) + 2 * len(text_attentions(plan))  # image and text K, V
    assert not casts(wide)
    with torch.no_grad():
        wu, wx = wide.split(wide(*c.example_inputs))
        nu, nx = narrow.split(narrow(*c.example_inputs))
    assert torch.equal(nu[0], wu[0])  # the model's output is untouched
    kv = [key for key in wx if key[0] in "kv" and key != "tokens"]
    assert len(kv) == len(casts(narrow))
    for key in kv:
        assert nx[key].dtype == torch.bfloat16 and torch.equal(nx[key], wx[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_sparse_variant_reads_and_writes_narrow_caches(captured, reference, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, m, k, k_txt = plan.num_image_tokens, plan.num_text_tokens, 7, 3
    key = VariantKey.sparse(k, ContextMode.SUBSET, True, k_txt=k_txt)
    wide = build_variant(c.gm, c.example_inputs, plan, CFG, key)
    narrow = build_variant(c.gm, c.example_inputs, plan, BF16, key)
    dtypes = {i.name: i.dtype for i in narrow.new_inputs}
    wide_dtypes = {i.name: i.dtype for i in wide.new_inputs}
    assert dtypes.keys() == wide_dtypes.keys()
    for i in narrow.new_inputs:  # only the caches change dtype
        assert i.dtype == (torch.bfloat16 if i.port.role in CACHES else wide_dtypes[i.name]), i.name
    assert dtypes["specdiff_kv_ratio"] == dtypes["specdiff_kv_ratio_txt_tokens"] == torch.float32
    g = torch.Generator().manual_seed(5)
    caches = {key: t.to(torch.bfloat16) for key, t in kv_inputs(plan, reference(name, stale=True),
                                                                 reference(name)).items()}
    assert len(caches) == sum(1 for i in narrow.new_inputs if i.port.role in CACHES)
    named = dict(specdiff_idx=torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(2)]),
                 specdiff_idx_txt=torch.stack([torch.randperm(m, generator=g)[:k_txt] for _ in range(2)]),
                 specdiff_kv_ratio=torch.rand(2, n, generator=g),
                 specdiff_kv_ratio_txt_tokens=torch.rand(2, m, generator=g))
    for i in narrow.new_inputs:
        if i.port.role in (Role.HISTORY, Role.WEIGHTS):
            named[i.name] = torch.zeros(i.shape, dtype=i.dtype)
    narrow_in = {**named, **{key: t.clone() for key, t in caches.items()}}
    wide_in = {**named, **{key: t.float() for key, t in caches.items()}}
    with torch.no_grad():
        nu, nx = narrow.split(narrow(*c.example_inputs, *narrow.extra_inputs(narrow_in)))
        wu, wx = wide.split(wide(*c.example_inputs, *wide.extra_inputs(wide_in)))
    torch.testing.assert_close(nu[0], wu[0], **TOL)
    torch.testing.assert_close(nx["tokens"], wx["tokens"], **TOL)
    for key in caches:  # both written in place: the computed rows shifted, the fresh ones rounded
        assert narrow_in[key].dtype == torch.bfloat16
        assert not torch.equal(narrow_in[key], caches[key]), key
        torch.testing.assert_close(narrow_in[key], wide_in[key].to(torch.bfloat16), atol=1e-5, rtol=8e-3)


def _generate(backend, steps=8):
    torch._dynamo.reset()
    model = torch.compile(tiny_sd3(0), backend=backend, fullgraph=True, dynamic=False)
    inputs = sd3_inputs(2, 8, 8, seed=3)
    x = inputs.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = model(hidden_states=x, **{**inputs, "timestep": torch.full((2,), float(sigmas[i]) * 1000)}).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, backend.runtimes[-1]


def test_a_generation_keeps_bfloat16_caches_at_half_the_bytes():
    """The same fixed schedule with both settings: the caches differ in dtype and bytes only,
    and the image by the rounding of the cached keys and values."""
    opts = dict(inductor=False, controller="fixed", warmup_steps=2, refresh_at=(0.5,), cache_ratio=0.5)
    wide, rt_wide = _generate(specdiff_fx.backend(**opts, kv_dtype="model"))
    narrow, rt_narrow = _generate(specdiff_fx.backend(**opts))  # the default: "auto", bfloat16 for this float32 model
    states = [rt.generation.branches[0].state for rt in (rt_wide, rt_narrow)]
    assert states[0].kv.kv and all(t.dtype == torch.float32 for t in states[0].kv.kv + states[0].kv.prev)
    assert all(t.dtype == torch.bfloat16 for t in states[1].kv.kv + states[1].kv.prev)
    assert states[1].kv.nbytes * 2 == states[0].kv.nbytes
    kinds = [[r.kind for r in rt.report.steps] for rt in (rt_wide, rt_narrow)]
    assert kinds[0] == kinds[1] and "cached" in kinds[0]
    err = ((narrow - wide).norm() / wide.norm()).item()
    assert 0 < err < 1e-2
